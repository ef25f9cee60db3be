"""Blocking asset checks: a Pandera schema per table and the protocol's invariants.

A failed check stops everything downstream of its asset in the same run; its metadata
shows the failure cases, so the UI says what was wrong and where.
"""

from collections.abc import Callable

import dagster as dg
import pandas as pd

from resources import SrecStorage
from srec import invariants
from srec.db import scalar_row
from srec.recommender.settings import no_summary_comparison
from srec.report import llm_variants
from srec.schemas import validate_partition
from srec_assets.assets.baselines import baseline_scores
from srec_assets.assets.ingest import raw_items, raw_reviews
from srec_assets.assets.mllm import item_captions, item_images, user_preferences
from srec_assets.assets.recommender import lora_adapter, recommender_scores, sft_examples
from srec_assets.assets.report import metric_report
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.partitions import category_config, category_partitions


def _md(frame: pd.DataFrame, limit: int = 20) -> dg.MetadataValue:
    if frame is None or frame.empty:
        return dg.MetadataValue.md("_none_")
    return dg.MetadataValue.md(frame.head(limit).astype(str).to_markdown(index=False))


def _count(con, table: str, category: str) -> int:
    return scalar_row(con, f"SELECT count(*) FROM {table} WHERE category = ?", [category])[0]


def schema_check(
    asset: dg.AssetsDefinition, table: str, *, may_be_empty: Callable[[object], bool] = lambda cfg: False
) -> dg.AssetChecksDefinition:
    """Validate the partition's rows of ``table`` against its Pandera schema (srec.schemas)."""

    @dg.asset_check(
        asset=asset,
        name=f"{table}_schema",
        blocking=True,
        partitions_def=category_partitions,
        description=f"Pandera schema of table `{table}` (types, nullability, value ranges, keys).",
    )
    def _check(context: dg.AssetCheckExecutionContext, storage: SrecStorage) -> dg.AssetCheckResult:
        cfg = category_config(context)
        with storage.connect() as con:
            if may_be_empty(cfg) and _count(con, table, cfg.name) == 0:
                return dg.AssetCheckResult(passed=True, metadata={"rows": 0, "note": "no rows, as expected"})
            outcome = validate_partition(con, table, cfg.name)
        return dg.AssetCheckResult(
            passed=outcome.passed,
            metadata={
                "table": table,
                "rows": outcome.n_rows,
                "failures": outcome.n_failures,
                "failure_cases": _md(outcome.failure_cases, 50),
            },
        )

    return _check


def invariant_check(
    asset: dg.AssetsDefinition, name: str, fn: Callable[..., invariants.InvariantOutcome]
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name=name,
        blocking=True,
        partitions_def=category_partitions,
        description=(fn.__doc__ or name).strip().splitlines()[0],
    )
    def _check(context: dg.AssetCheckExecutionContext, storage: SrecStorage) -> dg.AssetCheckResult:
        cfg = category_config(context)
        with storage.connect() as con:
            outcome = fn(con, cfg.name)
        return dg.AssetCheckResult(
            passed=outcome.passed,
            description=outcome.description,
            metadata={"violations": outcome.n_violations, "examples": _md(outcome.examples)},
        )

    return _check


ALL_CHECKS = [
    schema_check(raw_reviews, "raw_reviews"),
    schema_check(raw_reviews, "ingest_quarantine", may_be_empty=lambda cfg: True),
    schema_check(raw_reviews, "ingest_log"),
    invariant_check(raw_reviews, "ingest_counts_reconcile", invariants.ingest_reconciles),
    schema_check(raw_items, "raw_items", may_be_empty=lambda cfg: cfg.items is None),
    schema_check(interactions, "interactions"),
    schema_check(interactions, "interactions_funnel"),
    invariant_check(interactions, "interaction_counts_reconcile", invariants.interactions_reconcile),
    invariant_check(interactions, "targets_not_in_history", invariants.targets_not_in_history),
    schema_check(eval_candidates, "eval_candidates"),
    invariant_check(eval_candidates, "one_positive_per_candidate_set", invariants.one_positive_per_candidate_set),
    invariant_check(eval_candidates, "eval_users_have_history", invariants.eval_users_have_history),
    schema_check(baseline_scores, "baseline_scores"),
    schema_check(baseline_scores, "baseline_full_ranking"),
    schema_check(baseline_scores, "baseline_runs"),
    schema_check(metric_report, "metric_report"),
    schema_check(item_images, "item_images"),
    invariant_check(item_images, "item_images_cover_items", invariants.item_images_cover_items),
    schema_check(item_captions, "item_captions"),
    schema_check(item_captions, "caption_cache"),
    invariant_check(item_captions, "captions_cover_items", invariants.captions_cover_items),
    schema_check(user_preferences, "user_preferences"),
    schema_check(user_preferences, "preference_cache"),
    invariant_check(user_preferences, "preferences_use_only_past", invariants.preferences_use_only_past),
    schema_check(sft_examples, "sft_examples", may_be_empty=lambda cfg: True),
    invariant_check(sft_examples, "sft_examples_are_sound", invariants.sft_examples_are_sound),
    schema_check(sft_examples, "sft_example_settings"),
    schema_check(lora_adapter, "lora_adapter_history"),
    schema_check(lora_adapter, "adapter_promotions"),
    schema_check(recommender_scores, "recommender_scores"),
    schema_check(recommender_scores, "recommender_runs"),
    invariant_check(recommender_scores, "recommender_scores_cover_candidates",
                    invariants.recommender_scores_cover_candidates),
]


class HallucinationCheckConfig(dg.Config):
    low_score: float = 0.2          # a caption whose CLIP cosine with its image is below this counts as low
    max_low_share: float = 0.25     # warn when more than this share of scored captions is low


@dg.asset_check(
    asset=item_captions,
    name="caption_hallucination",
    partitions_def=category_partitions,
    description="Warns when too many captions score low on CLIP image-caption cosine (MLLM-SRec's hallucination measure).",
)
def caption_hallucination(
    context: dg.AssetCheckExecutionContext, config: HallucinationCheckConfig, storage: SrecStorage
) -> dg.AssetCheckResult:
    cfg = category_config(context)
    with storage.connect() as con:
        scored, low, synthetic, clip_model = scalar_row(
            con,
            "SELECT count(clip_score), count(*) FILTER (WHERE clip_score < ?), "
            "count(*) FILTER (WHERE clip_score IS NOT NULL AND image_synthetic), any_value(clip_model) "
            "FROM item_captions WHERE category = ?",
            [config.low_score, cfg.name],
        )
        worst = con.execute(
            "SELECT item_id, round(clip_score, 3) AS clip_score, left(caption, 120) AS caption FROM item_captions "
            "WHERE category = ? AND clip_score IS NOT NULL ORDER BY clip_score LIMIT 10",
            [cfg.name],
        ).fetch_df()
    share = low / scored if scored else 0.0
    note = " Scores are against synthetic placeholder images." if synthetic else ""
    return dg.AssetCheckResult(
        passed=share <= config.max_low_share,
        severity=dg.AssetCheckSeverity.WARN,
        description=(f"{low} of {scored} scored captions ({share:.1%}) have CLIP cosine < {config.low_score} "
                     f"(limit {config.max_low_share:.0%}).{note}"),
        metadata={"scored": scored, "low": low, "low_share": round(share, 4), "synthetic_scored": synthetic,
                  "clip_model": clip_model or "none", "lowest": _md(worst, 10), **config.model_dump()},
    )


ALL_CHECKS.append(caption_hallucination)


@dg.asset_check(
    asset=lora_adapter,
    name="adapter_promotion_gate",
    partitions_def=category_partitions,
    description=("The promotion gate's decision: passes when the new adapter became the category's current one; "
                 "warns when it scored worse on validation AUC than the current adapter (re-scored on the same "
                 "candidates) by more than the margin, and the current one keeps serving."),
)
def adapter_promotion_gate(context: dg.AssetCheckExecutionContext, storage: SrecStorage) -> dg.AssetCheckResult:
    cfg = category_config(context)
    with storage.connect() as con:
        frame = con.execute(
            "SELECT * FROM adapter_promotions WHERE category = ? AND decided_at = "
            "(SELECT max(decided_at) FROM adapter_promotions WHERE category = ?) ORDER BY variant",
            [cfg.name, cfg.name]).fetch_df()
    if frame.empty:
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   description="no promotion decision recorded yet")
    d = frame.iloc[0]
    table = frame[["variant", "candidate_valid_auc", "current_valid_auc"]].round(4).assign(
        delta=(frame.candidate_valid_auc - frame.current_valid_auc).round(4))
    promoted = bool(d.promoted)
    return dg.AssetCheckResult(
        passed=promoted,
        severity=dg.AssetCheckSeverity.WARN,
        description=str(d.reason),
        metadata={"promoted": promoted, "candidate_version": str(d.candidate_version),
                  "current_version": str(d.candidate_version if promoted else d.current_version),
                  "compared_with": str(d.current_version) if d.current_version else "none",
                  "margin": float(d.margin), "decided_in_run": str(d.run_id), "comparison": _md(table)},
    )


ALL_CHECKS.append(adapter_promotion_gate)


@dg.asset_check(
    asset=metric_report,
    name="report_has_no_summary_row",
    partitions_def=category_partitions,
    description=("Warns when the report's LLM rows read a preference summary but none shows the chronological "
                 "item list alone (preference 'none'): DESIGN.md asks for that comparison in every report."),
)
def report_has_no_summary_row(context: dg.AssetCheckExecutionContext, storage: SrecStorage) -> dg.AssetCheckResult:
    cfg = category_config(context)
    with storage.connect() as con:
        variants = llm_variants(con, cfg.name)
    holds, description = no_summary_comparison(variants)
    return dg.AssetCheckResult(passed=holds, severity=dg.AssetCheckSeverity.WARN, description=description,
                               metadata={"llm_variants": dg.MetadataValue.json(variants)})


ALL_CHECKS.append(report_has_no_summary_row)
