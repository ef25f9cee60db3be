"""sft_examples -> lora_adapter -> recommender_scores -> metric_report through Dagster, on 25 real users."""
import json
import shutil

import dagster as dg
import duckdb
import pytest
from peft import PeftModel

import resources.models as resources_models
from srec.models.runner import LoadedModel, RunnerSettings
from srec.recommender import artifacts, pipeline
from srec.recommender.pipeline import sft_examples_version
from srec.recommender.settings import Variant
from srec_assets.assets.baselines import baseline_scores
from srec_assets.assets.ingest import raw_items, raw_reviews
from srec_assets.assets.mllm import item_captions, item_images, user_preferences
from srec_assets.assets.recommender import lora_adapter, recommender_scores, sft_examples
from srec_assets.assets.report import metric_report
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.checks import ALL_CHECKS
from tests.test_mllm_assets import scientific_with_images  # noqa: F401 (fixture)

ASSETS = [raw_reviews, raw_items, interactions, eval_candidates, item_images, item_captions, user_preferences,
          sft_examples, lora_adapter, recommender_scores, baseline_scores, metric_report]
NAMES = {a.key.path[0] for a in ASSETS}
CHECKS = [c for c in ALL_CHECKS if all(k.asset_key.path[0] in NAMES for k in c.check_keys)]
VARIANTS = ["lora:fused+recurrent", "lora:text+none", "zero-shot"]
REC = {"variants": VARIANTS, "epochs": 2, "batch_size": 4, "patience": 0}
RUN_CONFIG = {"ops": {
    "sft_examples": {"config": REC}, "lora_adapter": {"config": REC}, "recommender_scores": {"config": REC},
    "user_preferences": {"config": {"modes": ["recurrent"]}},
    "baseline_scores": {"config": {"max_epochs": 1, "models": ["popularity"]}},
}}


def _checks(result) -> dict[str, bool]:
    return {e.event_specific_data.check_name: e.event_specific_data.passed for e in result.all_events
            if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION}


def _scoring(database) -> dict:
    """recommender_scores' rows and, per variant, the run that scored them and the scoring key."""
    with duckdb.connect(database, read_only=True) as con:
        runs = con.execute("SELECT variant, scored_run_id, scoring_key FROM recommender_runs ORDER BY 1").fetchall()
        scores = [r[0] for r in con.execute("SELECT score FROM recommender_scores ORDER BY model, split, protocol, "
                                            "user_id, slot").fetchall()]
    return {"runs": {v: r for v, r, _ in runs}, "keys": {v: k for v, _, k in runs}, "scores": scores}


def _expected_scoring(runs: dict, scored: artifacts.AdapterSet, serving: artifacts.AdapterSet) -> dict:
    """Per variant, the run expected to have scored it after recommender_scores runs on ``serving``: the one in
    ``runs`` where its adapter files equal those of ``scored`` (what that run used) and for zero-shot; None (this
    run) where they changed."""
    return {v: r if v not in serving.manifest["variants"] or artifacts.adapter_files_hash(scored.adapter_path(v))
            == artifacts.adapter_files_hash(serving.adapter_path(v)) else None for v, r in runs.items()}


def _materialize_scores(resources, instance, config) -> tuple[str, dg.AssetMaterialization]:
    done = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                          run_config={"ops": {"recommender_scores": {"config": config}}},
                          selection=dg.AssetSelection.assets(recommender_scores))
    assert done.success
    return done.run_id, done.asset_materializations_for_node("recommender_scores")[0]


@pytest.mark.slow
def test_recommender_assets_train_score_and_report(scientific_with_images, storage, model_resources, tmp_path,
                                                  monkeypatch):
    resources = {"storage": storage, **model_resources}
    with dg.instance_for_test() as instance:
        result = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                                run_config=RUN_CONFIG)
        assert result.success
        checks = _checks(result)
        assert all(v for k, v in checks.items() if k != "caption_hallucination"), checks
        assert "adapter_promotion_gate" in checks

        con = duckdb.connect(storage.database, read_only=True)
        n_train = con.execute("SELECT count(*) FROM user_preferences WHERE split = 'train' AND mode = 'recurrent'"
                              ).fetchall()[0][0]
        styles = dict(con.execute("SELECT style, count(*) FROM sft_examples GROUP BY 1").fetchall())
        assert styles == {"fused+recurrent": 2 * n_train, "text+none": 2 * n_train}  # 1:1 negatives
        assert con.execute("SELECT count(*) FROM sft_examples WHERE label = 1 AND answer = 'Yes.' "
                           "AND label_source = 'target'").fetchall()[0][0] == 2 * n_train
        # text+none shows no image and no summary; fused+recurrent shows both
        assert con.execute("SELECT count(*) FROM sft_examples WHERE style = 'text+none' AND "
                           "(image_path IS NOT NULL OR prefix_text LIKE '%Preference summary%')").fetchall()[0][0] == 0
        assert con.execute("SELECT count(*) FROM sft_examples WHERE style = 'fused+recurrent' AND "
                           "prefix_text NOT LIKE '%Preference summary%'").fetchall()[0][0] == 0

        models = [r[0] for r in con.execute("SELECT DISTINCT model FROM recommender_scores ORDER BY 1").fetchall()]
        assert len(models) == 3 and all("tiny, random weights" in m and "tiny-llava" in m for m in models)
        n_test = con.execute("SELECT count(*) FROM eval_candidates WHERE split = 'test' AND protocol = '1+20'"
                             ).fetchall()[0][0]
        assert con.execute("SELECT count(*) FROM recommender_scores").fetchall()[0][0] == 3 * n_test
        con.close()

        # Nothing changed: baseline_scores keeps its stored results (the same rows, the run that trained them);
        # retrain: true trains again.
        for retrain, kept_models in ((False, ["popularity"]), (True, [])):
            baselines = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources,
                                       instance=instance, selection=dg.AssetSelection.assets(baseline_scores),
                                       run_config={"ops": {"baseline_scores": {"config": {
                                           **RUN_CONFIG["ops"]["baseline_scores"]["config"], "retrain": retrain}}}})
            assert baselines.success
            md = baselines.asset_materializations_for_node("baseline_scores")[0]
            assert md.metadata["kept_models"].value == kept_models
            assert md.tags["dagster/data_version"] == result.asset_materializations_for_node(
                "baseline_scores")[0].tags["dagster/data_version"]
            with duckdb.connect(storage.database, read_only=True) as con:
                trained_by = con.execute("SELECT trained_run_id FROM baseline_runs").fetchall()
            assert trained_by == [(baselines.run_id if retrain else result.run_id,)]

        # Nothing changed: sft_examples keeps its rows without loading the base; rebuild: true builds the same rows.
        built = result.asset_materializations_for_node("sft_examples")[0]
        sft_loads = []
        with monkeypatch.context() as patched:
            patched.setattr(resources_models, "LoadedModel",
                            lambda settings: sft_loads.append(settings) or LoadedModel(settings))
            for rebuild in (False, True):
                again = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources,
                                       instance=instance, selection=dg.AssetSelection.assets(sft_examples),
                                       run_config={"ops": {"sft_examples": {"config": {**REC, "rebuild": rebuild}}}})
                assert again.success
                md = again.asset_materializations_for_node("sft_examples")[0]
                assert md.metadata["kept"].value is not rebuild and len(sft_loads) == int(rebuild)
                assert md.metadata["rows"].value == built.metadata["rows"].value
                assert md.tags["dagster/data_version"] == built.tags["dagster/data_version"]

        # Nothing changed: recommender_scores keeps every variant's stored scores (the same rows, the same version)
        # instead of scoring them again; rescore: true scores them all again, to the same values.
        first = _scoring(storage.database)
        assert set(first["runs"].values()) == {result.run_id}
        loads = []
        with monkeypatch.context() as patched:
            patched.setattr(resources_models, "LoadedModel",
                            lambda settings: loads.append(settings) or LoadedModel(settings))
            _, kept = _materialize_scores(resources, instance, REC)
            assert loads == []  # the keys come from the base's files: no weights loaded to keep the scores
            assert kept.metadata["reused_variants"].value == [Variant.parse(v).name for v in VARIANTS]
            assert "reused (run" in kept.metadata["models"].value
            again_scored = _scoring(storage.database)
            assert again_scored["runs"] == first["runs"] and again_scored["scores"] == first["scores"]
            assert kept.tags["dagster/data_version"] == result.asset_materializations_for_node(
                "recommender_scores")[0].tags["dagster/data_version"]
            forced_run, forced = _materialize_scores(resources, instance, {**REC, "rescore": True})
            # Every variant scored again, on one load of the base (their numerics are the same): adapters are
            # attached to it in turn.
            assert forced.metadata["reused_variants"].value == [] and len(VARIANTS) > 1 and len(loads) == 1
        rescored = _scoring(storage.database)
        assert set(rescored["runs"].values()) == {forced_run} and rescored["keys"] == first["keys"]
        assert max(abs(a - b) for a, b in zip(rescored["scores"], first["scores"])) < 1e-6

        # The rows' version does not depend on where the checkout lies: the same rows with the base model and the
        # content-addressed images under another folder keep it; a changed answer does not.
        moved_db = tmp_path / "moved.duckdb"
        shutil.copyfile(storage.database, moved_db)
        with duckdb.connect(str(moved_db)) as moved:
            version = sft_examples_version(moved, "beauty")
            assert moved.execute("SELECT count(*) FROM sft_examples WHERE image_path LIKE ?",
                                 [f"{tmp_path}%"]).fetchall()[0][0] > 0
            moved.execute("UPDATE sft_examples SET model = '/elsewhere/tiny-llava', "
                          "image_path = replace(image_path, ?, '/elsewhere/')", [str(tmp_path)])
            assert sft_examples_version(moved, "beauty") == version
            moved.execute("UPDATE sft_examples SET answer = 'No.' WHERE rowid = (SELECT min(rowid) FROM sft_examples "
                          "WHERE answer = 'Yes.')")
            assert sft_examples_version(moved, "beauty") != version

        # The adapter: stored through the IO manager in PEFT format, with a manifest naming its inputs.
        out = result.output_for_node("lora_adapter")
        assert isinstance(out, artifacts.AdapterSet)
        stored = artifacts.load(tmp_path / "artifacts" / "lora_adapter", "beauty")
        assert stored.version == out.version
        m = stored.manifest
        assert set(m["variants"]) == {"lora:fused+recurrent", "lora:text+none"}
        caps = result.asset_materializations_for_node("item_captions")[0]
        assert m["data"]["caption_snapshot"] == caps.metadata["caption_snapshot"].value
        assert m["captions"][0]["prompt_version"].startswith("caption_")
        assert m["tiny_random_weights"] is True and m["settings"]["lora_r"] == 16
        assert m["settings"]["seed"] == 2024 and "data_seed" in m["settings"]
        assert m["sft_examples_styles"] == ["fused+recurrent", "text+none"] and m["settings"]["history_items"] == 20
        assert m["data"]["sft_examples"] == result.asset_materializations_for_node("sft_examples")[0].tags.get(
            "dagster/data_version")
        assert all(v["epochs_run"] == 2 and len(v["history"]) == 2 for v in m["variants"].values())
        # PeftModel.from_pretrained loads it.
        base = LoadedModel(RunnerSettings(model=model_resources["recommender"].model))
        PeftModel.from_pretrained(base.model, str(stored.adapter_path("lora:text+none")))

        report = json.loads((tmp_path / "reports" / "beauty" / "metric_report.json").read_text())
        llm_rows = [r for r in report if r["model"].startswith("LLM ")]
        assert {r["protocol"] for r in llm_rows} == {"1+20"}
        assert {r["metric"] for r in llm_rows} >= {"AUC", "HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR@5",
                                                    "MRR@10"}
        md = (tmp_path / "reports" / "beauty" / "metric_report.md").read_text()
        assert "RANDOM weights" in md and "zero-shot" in md

        # The first adapter became current: recommender_scores scored it.
        assert artifacts.pointer(tmp_path / "artifacts" / "lora_adapter", "beauty", "current")["version"] == out.version
        assert _checks(result)["adapter_promotion_gate"] is True

        # Retrain with another learning rate: a new version, gated against the current one re-scored on the
        # same validation candidates; the decision follows the figures it records.
        # The inputs and validation settings are those the current adapter was validated under, so the gate takes
        # its recorded AUCs instead of scoring it again; scoring it again here gives the same figures.
        retrain = {**REC, "learning_rate": 0.02, "promotion_margin": 0.0}
        gate_calls = []
        with monkeypatch.context() as patched:
            recorded_aucs = pipeline.current_valid_aucs

            def both_ways(current_variants, keys, rescore, log=print):
                rescored = []
                got = recorded_aucs(current_variants, keys, lambda name: rescored.append(name) or rescore(name), log)
                gate_calls.append((got, rescored, {name: rescore(name) for name in keys}))
                return got

            patched.setattr(pipeline, "current_valid_aucs", both_ways)
            again = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                                   run_config={"ops": {"lora_adapter": {"config": retrain}}},
                                   selection=dg.AssetSelection.assets(lora_adapter))
        assert again.success
        ((got, rescored, fresh),) = gate_calls
        assert rescored == [] and got == {v: e["best_valid_auc"] for v, e in out.manifest["variants"].items()}
        assert all(abs(got[v] - fresh[v]) < 1e-6 for v in got), (got, fresh)
        new = again.output_for_node("lora_adapter")
        assert new.version != out.version
        ev = [e for e in again.all_events if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
              and e.event_specific_data.check_name == "adapter_promotion_gate"][0]
        meta = ev.event_specific_data.metadata
        assert meta["compared_with"].value == out.version and meta["candidate_version"].value == new.version
        con = duckdb.connect(storage.database, read_only=True)
        rows = con.execute("SELECT variant, candidate_valid_auc, current_valid_auc, promoted FROM adapter_promotions "
                           "WHERE candidate_version = ? ORDER BY variant", [new.version]).fetchall()
        con.close()
        assert [r[0] for r in rows] == ["lora:fused+recurrent", "lora:text+none"]
        promoted = all(cand >= cur for _, cand, cur, _ in rows)
        assert all(r[3] == promoted for r in rows) and ev.event_specific_data.passed == promoted
        assert new.manifest["promotion"]["promoted"] == promoted
        current = artifacts.pointer(tmp_path / "artifacts" / "lora_adapter", "beauty", "current")["version"]
        assert current == (new.version if promoted else out.version)
        assert artifacts.pointer(tmp_path / "artifacts" / "lora_adapter", "beauty", "latest")["version"] == new.version
        # Scoring the serving adapter: a variant whose adapter files changed is scored again, the rest kept.
        serving = artifacts.load(tmp_path / "artifacts" / "lora_adapter", "beauty", current)
        # (``out`` names the staging folder the IO manager moved into place: the stored set is read back.)
        scored = artifacts.load(tmp_path / "artifacts" / "lora_adapter", "beauty", out.version)
        expected = _expected_scoring(_scoring(storage.database)["runs"], scored, serving)
        assert any(r is None for r in expected.values()), "the retrained adapter must change a variant's files"
        run_id, _ = _materialize_scores(resources, instance, REC)
        assert _scoring(storage.database)["runs"] == {v: r or run_id for v, r in expected.items()}

        # Run config that differs from what built the rows the adapter learned from is an error naming the
        # setting, not validation (or test) prompts silently built another way.
        other = {**REC, "history_items": 5}
        for asset, says in ((lora_adapter, "differ from those sft_examples"), (recommender_scores, "other settings")):
            bad = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                                 run_config={"ops": {asset.key.path[0]: {"config": other}}},
                                 selection=dg.AssetSelection.assets(asset), raise_on_error=False)
            assert not bad.success
            message = bad.failure_data_for_node(asset.key.path[0]).error.message
            assert says in message and "history_items: 20 -> 5" in message, message

        # The base model changed since the current adapter was trained (simulated: its manifest names another
        # fingerprint, as after switching models or re-saving one with another library version). It cannot
        # serve this base, so a retrain replaces it whatever the figures, and recommender_scores runs again.
        root = tmp_path / "artifacts" / "lora_adapter"
        current = artifacts.load_current(root, "beauty")
        before_replace = _scoring(storage.database)["runs"]
        manifest_file = current.folder / "manifest.json"
        manifest_file.write_text(json.dumps({**json.loads(manifest_file.read_text()), "base_fingerprint": "0" * 16}))
        replaced = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                                  run_config={"ops": {"lora_adapter": {"config": {**REC, "learning_rate": 1e-7}},
                                                      "recommender_scores": {"config": REC}}},
                                  selection=dg.AssetSelection.assets(lora_adapter, recommender_scores))
        assert replaced.success
        newest = replaced.output_for_node("lora_adapter")
        assert newest.manifest["promotion"]["promoted"] is True
        assert "cannot serve" in newest.manifest["promotion"]["reason"], newest.manifest["promotion"]["reason"]
        assert artifacts.pointer(root, "beauty", "current")["version"] == newest.version
        # A variant whose adapter files changed was scored in this run; the others (zero-shot always) were kept.
        expected = _expected_scoring(before_replace, serving, artifacts.load(root, "beauty", newest.version))
        assert _scoring(storage.database)["runs"] == {v: r or replaced.run_id for v, r in expected.items()}

        # One more variant: its style's rows are added, the others' rows stay, so their finished runs are reused
        # (the same weights, no epoch trained again) and only the new variant trains.
        more = {**REC, "learning_rate": 1e-7, "variants": [*VARIANTS, "lora:text+recurrent"]}
        added = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                               run_config={"ops": {"sft_examples": {"config": more}, "lora_adapter": {"config": more}}},
                               selection=dg.AssetSelection.assets(sft_examples, lora_adapter))
        assert added.success
        grown = artifacts.load(root, "beauty", added.output_for_node("lora_adapter").version)
        before = artifacts.load(root, "beauty", newest.version)
        runs = grown.manifest["variants"]
        assert [runs[v]["resumed_from_epoch"] for v in ("lora:fused+recurrent", "lora:text+none",
                                                        "lora:text+recurrent")] == [2, 2, 0]
        # The manifest names the run that trained each adapter: the earlier one for a reused run.
        assert [(runs[v]["reused"], runs[v]["trained_run_id"]) for v in ("lora:fused+recurrent", "lora:text+none",
                "lora:text+recurrent")] == [(True, replaced.run_id), (True, replaced.run_id), (False, added.run_id)]
        assert runs["lora:text+recurrent"]["trained_at"] > runs["lora:text+none"]["trained_at"]
        for v in ("lora:fused+recurrent", "lora:text+none"):
            assert runs[v]["seconds"] == 0.0, runs[v]  # finished runs: nothing encoded, validated or trained
            assert ((grown.adapter_path(v) / "adapter_model.safetensors").read_bytes()
                    == (before.adapter_path(v) / "adapter_model.safetensors").read_bytes()), v



def test_a_step_visits_variants_by_base_numerics_so_its_shared_base_loads_once_per_kind():
    """QLoRA variants mixed among LoRA ones in the config: scoring and the promotion gate visit the variants on the
    resource's numerics first, then the 4-bit ones, each group in the config's order, so ``shared_base`` (which
    releases one copy before loading another) loads each base once instead of once per switch."""
    from srec_assets.assets.recommender import _in_base_order

    names = ["qlora:fused+recurrent", "lora:fused+recurrent", "zero-shot", "qlora:text+none", "lora:text+none"]
    variants = [Variant.parse(n) for n in names]
    order = [v.name for v in _in_base_order(resources_models.ModelRunner(role="recommender"), variants)]
    assert order == ["lora:fused+recurrent", "zero-shot:fused+recurrent", "lora:text+none", "qlora:fused+recurrent",
                     "qlora:text+none"]
    on_4bit = resources_models.ModelRunner(role="recommender", quantization="4bit")  # every variant on one base
    assert [v.name for v in _in_base_order(on_4bit, variants)] == [v.name for v in variants]
