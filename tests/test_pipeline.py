"""Materialize the real assets on the bundled beauty sample, checks included."""
from __future__ import annotations

import json
import re

import dagster as dg
import duckdb
import pytest

from srec_assets.assets.baselines import baseline_scores
from srec_assets.assets.ingest import raw_items, raw_reviews
from srec_assets.assets.report import metric_report
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.checks import ALL_CHECKS
from srec_assets.definitions import ALL_ASSETS

FAST_BASELINES = {"ops": {"baseline_scores": {"config": {"max_epochs": 3, "patience": 2}}}}
# The direct (one long prompt) summaries are covered on a smaller category in test_mllm_assets.
# One short epoch of the main variant and the zero-shot base: the wiring, not the quality (tests/test_recommender*).
FAST_RECOMMENDER = {"config": {"variants": ["lora:fused+recurrent", "zero-shot"], "epochs": 1, "valid_users": 50}}
FAST_RUN = {"ops": {**FAST_BASELINES["ops"], "user_preferences": {"config": {"modes": ["recurrent"]}},
                    "sft_examples": FAST_RECOMMENDER, "lora_adapter": FAST_RECOMMENDER,
                    "recommender_scores": FAST_RECOMMENDER}}


def _check_results(result) -> dict[str, bool]:
    return {
        e.event_specific_data.check_name: e.event_specific_data.passed
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    }


@pytest.mark.slow
def test_whole_graph_on_the_sample(storage, model_resources, tmp_path):
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS + ALL_CHECKS,
            partition_key="beauty",
            resources={"storage": storage, **model_resources},
            instance=instance,
            run_config=FAST_RUN,
        )
        assert result.success
        checks = _check_results(result)
        assert len(checks) == len(ALL_CHECKS), checks
        # Every blocking check passes; the hallucination warning is evaluated (random CLIP weights may trip it).
        warnings = {"caption_hallucination", "report_has_no_summary_row"}
        assert all(v for k, v in checks.items() if k not in warnings), checks
        # This run's variants leave out the no-summary row (the demo's defaults have it): the report warns.
        assert checks["report_has_no_summary_row"] is False

        mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
        for key in ("raw_reviews", "interactions", "eval_candidates", "item_images", "item_captions",
                    "user_preferences", "sft_examples", "lora_adapter", "recommender_scores", "baseline_scores",
                    "metric_report"):
            assert key in mats
        images_md = result.asset_materializations_for_node("item_images")[0].metadata
        assert images_md["synthetic"].value == images_md["items"].value == 2596  # placeholders, and says so
        captions_md = result.asset_materializations_for_node("item_captions")[0].metadata
        assert (captions_md["new"].value, captions_md["failed"].value) == (2596, 0)
        prefs_md = result.asset_materializations_for_node("user_preferences")[0].metadata
        # users x (last train positive, valid, test), recurrent
        assert prefs_md["rows"].value == prefs_md["ok"].value == 1065 * 3
        sft_md = result.asset_materializations_for_node("sft_examples")[0].metadata
        assert sft_md["rows"].value == 1065 * 2 and sft_md["negatives_sampled"].value == 1065
        cut = re.fullmatch(r"(\d+) of (\d+) items \(max_item_chars 240\)", sft_md["candidate_texts_cut"].value["fused+recurrent"])
        assert cut and 0 < int(cut.group(1)) < int(cut.group(2)), sft_md["candidate_texts_cut"].value
        assert prefs_md["caption_snapshot"].value == captions_md["caption_snapshot"].value
        ingest_md = result.asset_materializations_for_node("raw_reviews")[0].metadata
        assert ingest_md["rows_read"].value == ingest_md["rows_kept"].value + ingest_md["rows_quarantined"].value
        # The sample: 2,000 users, 18,041 interactions, all of them read and kept.
        assert ingest_md["rows_read"].value == 18041

        # DataVersions are content hashes, recorded on the instance.
        record = instance.get_latest_data_version_record(dg.AssetKey("interactions"), partition_key="beauty")
        assert record is not None

    report_dir = tmp_path / "reports" / "beauty"
    rows = json.loads((report_dir / "metric_report.json").read_text())
    assert {"model", "protocol", "metric", "value", "ci_low", "ci_high", "n_users"} <= set(rows[0])
    llm = {r["model"] for r in rows if r["model"].startswith("LLM ")}
    assert llm == {"LLM lora:fused+recurrent @ tiny-llava (tiny, random weights)",
                   "LLM zero-shot:fused+recurrent @ tiny-llava (tiny, random weights)"}
    assert {r["model"] for r in rows} - llm == {"popularity", "sasrec", "gru4rec", "title_overlap"}
    # The text-only reference: the titles the LLM's prompt lists rank the sample's candidates well (0.70 measured).
    text_auc = next(r["value"] for r in rows if (r["model"], r["protocol"], r["metric"]) == ("title_overlap", "1+20", "AUC"))
    assert text_auc > 0.65, text_auc
    assert {r["protocol"] for r in rows} == {"1+20", "1+99", "full_ranking"}
    assert {r["protocol"] for r in rows if r["model"] in llm} == {"1+20"}
    assert (report_dir / "metric_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report_dir / "metric_report.md").read_text()
    assert "full_ranking" in md or "Full ranking" in md
    assert "`title_overlap`: TEXT ONLY, no interactions" in md and "last 10 items" in md
    # The report explains popularity's AUC: its pair share, computed in SQL from the counts, is that AUC.
    share = re.search(r"`1\+20`: positives median [^;]*higher count in ([\d.]+)% of a user's", md)
    pop_auc = next(r["value"] for r in rows if (r["model"], r["protocol"], r["metric"]) == ("popularity", "1+20", "AUC"))
    assert share is not None and abs(float(share.group(1)) / 100 - pop_auc) < 0.0006, (share, pop_auc)

    con = duckdb.connect(storage.database, read_only=True)
    n_users = con.execute("SELECT count(DISTINCT user_id) FROM interactions WHERE category='beauty'").fetchone()[0]
    for row in rows:
        assert row["n_users"] == n_users, row
    con.close()


def test_failed_blocking_check_stops_downstream(storage, tmp_path, monkeypatch):
    """Plant a leak (a test target copied into training history): the invariant fails, candidates never run."""
    import srec_assets.assets.sequences as seq_assets

    real_build = seq_assets.build_interactions

    def leaky_build(con, category, settings):
        stats = real_build(con, category, settings)
        con.execute(
            "INSERT INTO interactions SELECT category, user_id, item_id, rating, timestamp, position, label, "
            "-1, 'train' FROM interactions WHERE category = ? AND split = 'test' LIMIT 3",
            [category],
        )
        return stats

    monkeypatch.setattr(seq_assets, "build_interactions", leaky_build)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [raw_reviews, raw_items, interactions, eval_candidates, baseline_scores, metric_report]
            + [c for c in ALL_CHECKS if all(k.asset_key.path[0] in {"raw_reviews", "raw_items", "interactions",
                                                                   "eval_candidates", "baseline_scores", "metric_report"}
                                            for k in c.check_keys)],
            partition_key="beauty",
            resources={"storage": storage},
            instance=instance,
            raise_on_error=False,
            selection=dg.AssetSelection.assets(raw_reviews, interactions, eval_candidates),
        )
    assert not result.success
    checks = _check_results(result)
    assert checks["targets_not_in_history"] is False
    materialized = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert "interactions" in materialized and "eval_candidates" not in materialized
