"""metric_report: every model on the same candidates, by protocol, with bootstrap intervals; md + json + png."""

import base64
import json
from datetime import datetime, timezone

import dagster as dg
import pandas as pd

from resources import SrecStorage
from srec.captions import caption_snapshot
from srec.baselines.train import describe_baseline
from srec.db import partition_content_hash, replace_partition, scalar_row, table_exists
from srec.recommender.settings import no_summary_comparison
from srec.report import (
    REPORT_COLUMNS,
    candidate_popularity,
    candidate_popularity_note,
    compute_metric_rows,
    llm_variants,
    markdown_table,
    write_report,
)
from srec_assets.assets.baselines import baseline_scores
from srec_assets.assets.mllm import item_captions, item_images
from srec_assets.assets.recommender import recommender_scores
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.partitions import category_config, category_partitions


def _mllm_inputs(con, category: str) -> dict:
    """What the report must say about the MLLM stages' inputs: synthetic images above all."""
    n, ok, synthetic = scalar_row(
        con, "SELECT count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE synthetic) "
        "FROM item_images WHERE category = ?", [category])
    out = {}
    if n:
        out["item_images"] = (
            f"{ok} of {n} items have a usable image; {synthetic} of them are SYNTHETIC placeholders rendered by srec "
            "(the source has no product images), not real product photos" if synthetic
            else f"{ok} of {n} items have a usable image (all from the source)")
    captions = con.execute(
        "SELECT model, model_fingerprint, string_agg(DISTINCT prompt_version, ', '), count(*) FROM item_captions "
        "WHERE category = ? GROUP BY ALL", [category]).fetchall()
    if captions:
        out["item_captions"] = "; ".join(f"{c} captions by {m} (fingerprint {f}), prompts {v}" for m, f, v, c in captions)
        out["caption_snapshot"] = caption_snapshot(con, category)
    runs = con.execute(
        "SELECT model, base_model, base_fingerprint, tiny_random_weights, adapter_version, valid_auc, prompt_version, "
        "scored_run_id FROM recommender_runs WHERE category = ? ORDER BY model", [category]).fetchall()
    variants = llm_variants(con, category)
    if variants:
        out["no_summary_comparison"] = no_summary_comparison(variants)[1]
    if runs:
        tiny_note = (", a TINY model with RANDOM weights: its numbers only show that the code path works, "
                     "not what an MLLM recommender achieves")
        out["llm_models"] = "; ".join(
            f"`{m}`: base {b} (fingerprint {f}{tiny_note if t else ''}), "
            + (f"adapter {a} (best valid AUC {v:.4f})" if a else "no fine-tuning (zero-shot)") + f", prompts {p}"
            + (f", scored in Dagster run {r}" if r else "")  # an earlier run's when its scoring key was unchanged
            for m, b, f, t, a, v, p, r in runs)
    return out


def _baseline_models(con, category: str) -> dict:
    """What each classic baseline row of the report is (from baseline_runs)."""
    if not table_exists(con, "baseline_runs"):
        return {}
    runs = con.execute("SELECT model, settings, epochs_run, best_epoch, trained_run_id FROM baseline_runs "
                       "WHERE category = ? ORDER BY model", [category]).fetchall()
    if not runs:
        return {}
    return {"baseline_models": "; ".join(
        f"`{m}`: {describe_baseline(m, json.loads(s), e, b)}"
        + (f", from Dagster run {r}" if r else "")  # an earlier run's when its inputs were unchanged
        for m, s, e, b, r in runs)}


class ReportConfig(dg.Config):
    split: str = "test"
    n_boot: int = 1000
    seed: int = 0


@dg.asset(
    pool="duckdb",
    partitions_def=category_partitions,
    group_name="report",
    kinds={"duckdb", "markdown"},
    code_version="2",  # 2: the header names the summary / no-summary comparison
    deps=[baseline_scores, recommender_scores, eval_candidates, interactions, item_images, item_captions],
    description="Every model by protocol (1+20, 1+99, full ranking): mean and bootstrap 95% CI over users.",
)
def metric_report(context: dg.AssetExecutionContext, config: ReportConfig, storage: SrecStorage) -> dg.MaterializeResult:
    cfg = category_config(context)
    with storage.connect() as con:
        rows = compute_metric_rows(con, cfg.name, split=config.split, n_boot=config.n_boot, seed=config.seed)
        if not rows:
            raise dg.Failure(f"no model scores found for category '{cfg.name}': materialize baseline_scores first")
        provenance = {
            "category": cfg.name,
            "source": f"{cfg.format}: {cfg.reviews.name}" + (f" + {cfg.items.name}" if cfg.items else ""),
            "description": cfg.description,
            "interactions_version": partition_content_hash(con, "interactions", cfg.name),
            "eval_candidates_version": partition_content_hash(con, "eval_candidates", cfg.name),
            "candidate_seed": cfg.seed,
            "split": config.split,
            "bootstrap": f"{config.n_boot} resamples of users, seed {config.seed}",
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dagster_run_id": context.run.run_id,
            **_mllm_inputs(con, cfg.name),
            **_baseline_models(con, cfg.name),
        }
        popularity = candidate_popularity_note(candidate_popularity(con, cfg.name, config.split), config.split)
        if popularity:
            provenance["candidate_popularity"] = popularity
        paths = write_report(rows, storage.report_dir(cfg.name), category=cfg.name, provenance=provenance)
        frame = pd.DataFrame(rows)[list(REPORT_COLUMNS)]
        con.register("report_rows", frame)
        replace_partition(con, "metric_report", cfg.name, "SELECT * FROM report_rows")
        con.unregister("report_rows")
        version = partition_content_hash(con, "metric_report", cfg.name)

    png = base64.b64encode(paths["png"].read_bytes()).decode()
    tables = "\n\n".join(
        f"**{protocol}**\n\n{markdown_table(rows, protocol)}"
        for protocol in dict.fromkeys(r["protocol"] for r in rows)
    )
    context.log.info(f"metric report written to {paths['md']}")
    return dg.MaterializeResult(
        metadata={
            "report_md": dg.MetadataValue.path(str(paths["md"])),
            "report_json": dg.MetadataValue.path(str(paths["json"])),
            "report_png": dg.MetadataValue.path(str(paths["png"])),
            "metrics": dg.MetadataValue.md(tables),
            "chart": dg.MetadataValue.md(f"![metric report](data:image/png;base64,{png})"),
            "models": dg.MetadataValue.json(sorted({r["model"] for r in rows})),
            "provenance": dg.MetadataValue.json(provenance),
        },
        data_version=dg.DataVersion(version),
    )
