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
from srec.schemas import validate_partition
from srec_assets.assets.baselines import baseline_scores
from srec_assets.assets.ingest import raw_items, raw_reviews
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
]
