"""raw_reviews, raw_items: one reader per source format; bad rows quarantined with file, line and reason."""

import dagster as dg

from resources import SrecStorage
from srec.db import partition_content_hash
from srec.ingest import IngestStats, ingest_items, ingest_reviews
from srec.raw_files import raw_files_fingerprint
from srec_assets.partitions import category_config, category_partitions


def _ingest_metadata(stats: IngestStats, cfg) -> dict:
    return {
        "format": cfg.format,
        # What the raw-files sensor compares with: the same files, byte for byte, need no new run.
        "raw_files_sha256": raw_files_fingerprint(cfg),
        "source_files": dg.MetadataValue.json(stats.files),
        "rows_read": stats.rows_read,
        "rows_kept": stats.rows_kept,
        "rows_quarantined": sum(stats.quarantined.values()),
        "quarantined_by_reason": dg.MetadataValue.json(dict(sorted(stats.quarantined.items()))),
        "reconciles": stats.reconciles(),
    }


@dg.asset(
    pool="duckdb",
    partitions_def=category_partitions,
    group_name="ingest",
    kinds={"duckdb"},
    code_version="1",
    description="Interactions as read from the category's source file, normalised; bad rows go to ingest_quarantine.",
)
def raw_reviews(context: dg.AssetExecutionContext, storage: SrecStorage) -> dg.MaterializeResult:
    cfg = category_config(context)
    with storage.connect() as con:
        stats = ingest_reviews(con, cfg)
        version = partition_content_hash(con, "raw_reviews", cfg.name)
    context.log.info(f"{cfg.name}: read {stats.rows_read}, kept {stats.rows_kept}, quarantined {stats.quarantined}")
    return dg.MaterializeResult(metadata=_ingest_metadata(stats, cfg), data_version=dg.DataVersion(version))


@dg.asset(
    pool="duckdb",
    partitions_def=category_partitions,
    group_name="ingest",
    kinds={"duckdb"},
    code_version="1",
    description="Item metadata (title, description, brand, categories, image URL/path), normalised.",
)
def raw_items(context: dg.AssetExecutionContext, storage: SrecStorage) -> dg.MaterializeResult:
    cfg = category_config(context)
    with storage.connect() as con:
        stats = ingest_items(con, cfg)
        version = partition_content_hash(con, "raw_items", cfg.name)
    return dg.MaterializeResult(metadata=_ingest_metadata(stats, cfg), data_version=dg.DataVersion(version))
