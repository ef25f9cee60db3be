"""interactions (labels, k-core, leave-one-out split) and eval_candidates (seeded, stored, shared by every model)."""

from dataclasses import asdict

import dagster as dg
import pandas as pd

from resources import SrecStorage
from srec.candidates import draw_eval_candidates
from srec.db import partition_content_hash
from srec.sequences import build_interactions
from srec_assets.assets.ingest import raw_reviews
from srec_assets.partitions import category_config, category_partitions


@dg.asset(
    pool="duckdb",
    partitions_def=category_partitions,
    group_name="sequences",
    kinds={"duckdb"},
    code_version="1",
    deps=[raw_reviews],
    description=(
        "Deduplicated interactions (earliest kept), rating-threshold labels, iterative k-core on positives, "
        "chronological leave-one-out split (last positive test, second-last valid)."
    ),
)
def interactions(context: dg.AssetExecutionContext, storage: SrecStorage) -> dg.MaterializeResult:
    cfg = category_config(context)
    with storage.connect() as con:
        stats = build_interactions(con, cfg.name, cfg.filtering)
        funnel = con.execute(
            "SELECT step, rows_in, dropped, rows_out, detail FROM interactions_funnel "
            "WHERE category = ? ORDER BY step_order",
            [cfg.name],
        ).df()
        version = partition_content_hash(con, "interactions", cfg.name)
    return dg.MaterializeResult(
        metadata={
            "users": stats.users,
            "items": stats.items,
            "positives": stats.positives,
            "negatives": stats.negatives,
            "train": stats.train,
            "valid": stats.valid,
            "test": stats.test,
            "k_core_iterations": stats.kcore_iterations,
            "filtering": dg.MetadataValue.json(asdict(cfg.filtering)),
            "funnel": dg.MetadataValue.md(funnel.to_markdown(index=False)),
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    pool="duckdb",
    partitions_def=category_partitions,
    group_name="sequences",
    kinds={"duckdb"},
    code_version="1",
    deps=[interactions],
    description=(
        "For every valid and test target: 1 positive + 20 and 1 positive + 99 negatives (nested), "
        "uniform over items the user never interacted with; drawn once with the category's seed."
    ),
)
def eval_candidates(context: dg.AssetExecutionContext, storage: SrecStorage) -> dg.MaterializeResult:
    cfg = category_config(context)
    with storage.connect() as con:
        stats = draw_eval_candidates(con, cfg.name, seed=cfg.seed)
        counts = con.execute(
            "SELECT split, protocol, count(DISTINCT user_id) AS users, count(*) AS rows "
            "FROM eval_candidates WHERE category = ? GROUP BY ALL ORDER BY ALL",
            [cfg.name],
        ).df()
        version = partition_content_hash(con, "eval_candidates", cfg.name)
    return dg.MaterializeResult(
        metadata={
            "seed": cfg.seed,
            "sets": dg.MetadataValue.md(pd.DataFrame(counts).to_markdown(index=False)),
            "stats": dg.MetadataValue.json({k: v for k, v in asdict(stats).items() if isinstance(v, (int, float, str))}),
        },
        data_version=dg.DataVersion(version),
    )
