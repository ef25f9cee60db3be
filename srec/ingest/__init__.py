"""Ingest: read a category's source files into ``raw_reviews`` / ``raw_items``.

One reader per source format (``srec.config.FORMATS``), all normalising to the columns in
``srec.tables``. Rows that cannot be kept go to ``ingest_quarantine`` with a reason from
``QUARANTINE_REASONS``; problems with a whole file raise ``IngestError`` naming the file. Each
call replaces the category's rows (of that table only) and writes one ``ingest_log`` row per
file, and checks ``rows_read == rows_kept + rows_quarantined`` before it returns.

Interaction files are streamed in line batches and parsed in DuckDB SQL (bounded memory, no
per-line Python); item metadata is parsed per line in Python.
"""
from __future__ import annotations

import duckdb

from srec.config import FORMATS, CategoryConfig
from srec.ingest.common import QUARANTINE_REASONS, IngestError, IngestStats, ReconciliationError
from srec.ingest.items import ITEM_READERS
from srec.ingest.reviews import REVIEW_READERS
from srec.ingest.source import SourceFile
from srec.ingest.stage import Stage, publish, publish_nothing

__all__ = [
    "QUARANTINE_REASONS",
    "IngestError",
    "IngestStats",
    "ReconciliationError",
    "ingest_reviews",
    "ingest_items",
]

_WRONG_FORMAT_HINT = "; is the category's format ({fmt}) the file's format?"


def _reader(readers: dict, cfg: CategoryConfig, path) -> object:
    if cfg.format not in readers:
        raise IngestError(
            f"{path}: unknown format {cfg.format!r} for category '{cfg.name}'; known formats: {', '.join(FORMATS)}"
        )
    return readers[cfg.format]


def _ingest(con: duckdb.DuckDBPyConnection, cfg: CategoryConfig, table: str, path, readers: dict) -> IngestStats:
    read = _reader(readers, cfg, path)
    src = SourceFile(path)
    stage = Stage(con, table)
    try:
        read(stage, src, cfg)
        stats = publish(con, cfg.name, stage, src, hint=_WRONG_FORMAT_HINT.format(fmt=cfg.format))
    finally:
        stage.drop()
    if not stats.reconciles():  # publish checks this inside its transaction too
        raise ReconciliationError(f"{path}: ingest does not reconcile: {stats}")
    return stats


def ingest_reviews(con: duckdb.DuckDBPyConnection, cfg: CategoryConfig) -> IngestStats:
    """Read ``cfg.reviews`` into ``raw_reviews`` (replacing the category's rows)."""
    return _ingest(con, cfg, "raw_reviews", cfg.reviews, REVIEW_READERS)


def ingest_items(con: duckdb.DuckDBPyConnection, cfg: CategoryConfig) -> IngestStats:
    """Read ``cfg.items`` into ``raw_items`` (replacing the category's rows); no file: zero rows."""
    if cfg.items is None:
        _reader(ITEM_READERS, cfg, cfg.reviews)  # an unknown format fails here too
        return publish_nothing(con, cfg.name, "raw_items")
    return _ingest(con, cfg, "raw_items", cfg.items, ITEM_READERS)
