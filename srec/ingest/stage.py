"""Staging and publishing: readers fill a temporary table, ``publish`` writes the partition.

Every row read (kept or not) lands in one stage table with a ``reason`` (NULL = kept). Publishing
marks duplicates, then replaces, in one transaction, the category's rows of the target table,
its quarantine rows for that table and its ingest_log rows for that table, and checks that what
was written reconciles with what was read before it commits.
"""
from __future__ import annotations

import uuid

import duckdb
import pyarrow as pa

from srec.db import ensure_tables
from srec.ingest.common import QUARANTINE_REASONS, IngestError, IngestStats, ReconciliationError
from srec.ingest.source import SourceFile

STAGE_COLUMNS: dict[str, dict[str, str]] = {
    "raw_reviews": {
        "source_line": "BIGINT",
        "sub": "INTEGER",          # index within the line (p5 / json sequences); 0 for one-row lines
        "position": "BIGINT",      # 0-based ordinal of the row among all rows read from the file
        "user_id": "VARCHAR",
        "item_id": "VARCHAR",
        "rating": "DOUBLE",
        "timestamp": "BIGINT",
        "reason": "VARCHAR",       # NULL: kept
        "detail": "VARCHAR",
        "raw_text": "VARCHAR",     # only for quarantined rows
    },
    "raw_items": {
        "source_line": "BIGINT",
        "item_id": "VARCHAR",
        "title": "VARCHAR",
        "description": "VARCHAR",
        "brand": "VARCHAR",
        "categories": "VARCHAR",
        "image_url": "VARCHAR",
        "image_path": "VARCHAR",
        "reason": "VARCHAR",
        "detail": "VARCHAR",
        "raw_text": "VARCHAR",
    },
}

_TARGET_TABLES = ("raw_reviews", "raw_items", "ingest_quarantine", "ingest_log")


class Stage:
    """A temporary table of one connection holding every row read from one source file."""

    def __init__(self, con: duckdb.DuckDBPyConnection, table: str):
        self.con = con
        self.table = table
        self.columns = STAGE_COLUMNS[table]
        self.name = f"_srec_ingest_{table}_{uuid.uuid4().hex[:12]}"
        cols = ", ".join(f"{c} {t}" for c, t in self.columns.items())
        con.execute(f"CREATE TEMP TABLE {self.name} ({cols})")

    def insert_rows(self, rows: dict[str, list]) -> None:
        """Append rows given column-wise (missing columns are NULL)."""
        n = len(next(iter(rows.values()))) if rows else 0
        if not n:
            return
        arrays, names = [], []
        for c, sql_type in self.columns.items():
            if c in rows:
                typ = {"BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64()}.get(sql_type, pa.string())
                arrays.append(pa.array(rows[c], type=typ))
                names.append(c)
        self.insert_arrow(pa.Table.from_arrays(arrays, names=names))

    def insert_arrow(self, tbl: pa.Table) -> None:
        view = f"_srec_rows_{uuid.uuid4().hex[:12]}"
        self.con.register(view, tbl)
        try:
            self.con.execute(f"INSERT INTO {self.name} BY NAME SELECT * FROM {view}")
        finally:
            self.con.unregister(view)

    def insert_sql(self, select_sql: str, batch: pa.Table) -> None:
        """Append what ``select_sql`` yields (by column name); it reads the batch as ``batch``."""
        view = f"_srec_batch_{uuid.uuid4().hex[:12]}"
        self.con.register(view, batch)
        try:
            self.con.execute(f"INSERT INTO {self.name} BY NAME {select_sql.replace('{batch}', view)}")
        finally:
            self.con.unregister(view)

    def drop(self) -> None:
        try:
            self.con.execute(f"DROP TABLE IF EXISTS {self.name}")
        except duckdb.Error:
            pass


def _mark_duplicate_reviews(con: duckdb.DuckDBPyConnection, stage: str) -> None:
    """Kept rows with the same user, item, rating and timestamp as an earlier kept row -> 'duplicate'.

    NULL ratings / timestamps (formats without them) compare equal. Candidates are the rows whose
    hash of the four values repeats (one aggregate on a single integer key); only those are
    partitioned by the values themselves, so a hash collision can never make a false duplicate."""
    con.execute(
        f"""
        UPDATE {stage} AS s
        SET reason = 'duplicate',
            detail = format('same user, item, rating and timestamp as line {{}} (user {{}}, item {{}}, rating {{}}, timestamp {{}})',
                            d.first_line, s.user_id, s.item_id, coalesce(CAST(s.rating AS VARCHAR), 'none'),
                            coalesce(CAST(s.timestamp AS VARCHAR), 'none'))
        FROM (
            SELECT source_line, sub, first_line FROM (
                SELECT r.source_line, r.sub,
                       row_number() OVER w AS rn,
                       first_value(r.source_line) OVER w AS first_line
                FROM {stage} r
                WHERE r.reason IS NULL AND hash(r.user_id, r.item_id, r.rating, r.timestamp) IN (
                    SELECT h FROM (SELECT hash(user_id, item_id, rating, timestamp) AS h FROM {stage} WHERE reason IS NULL)
                    GROUP BY h HAVING count(*) > 1
                )
                WINDOW w AS (PARTITION BY r.user_id, r.item_id, r.rating, r.timestamp ORDER BY r.source_line, r.sub)
            ) WHERE rn > 1
        ) d
        WHERE s.source_line = d.source_line AND s.sub = d.sub
        """
    )


def publish(
    con: duckdb.DuckDBPyConnection, category: str, stage: Stage, src: SourceFile, hint: str = ""
) -> IngestStats:
    """Write the stage's rows as ``category``'s partition of its table; return reconciled stats."""
    table = stage.table
    if table == "raw_reviews":
        _mark_duplicate_reviews(con, stage.name)
    counts = dict(
        con.execute(
            f"SELECT coalesce(reason, ''), count(*) FROM {stage.name} GROUP BY ALL ORDER BY 1"
        ).fetchall()
    )
    kept = int(counts.pop("", 0))
    quarantined = {r: int(counts[r]) for r in QUARANTINE_REASONS if r in counts}
    unknown = set(counts) - set(quarantined)
    if unknown:
        raise ReconciliationError(f"{src.path}: internal error: unknown quarantine reasons {sorted(unknown)}")
    rows_read = kept + sum(quarantined.values())
    if rows_read == 0:
        if src.bytes_out == 0:
            raise IngestError(f"{src.path}: empty file (0 lines)")
        raise IngestError(f"{src.path}: no data rows (the file holds only a header){hint}")
    if kept == 0:
        summary = ", ".join(f"{r}: {n}" for r, n in quarantined.items())
        raise IngestError(
            f"{src.path}: no usable row: all {rows_read} rows read were quarantined ({summary}){hint}"
        )
    stats = IngestStats(
        table=table, files=[str(src.path)], rows_read=rows_read, rows_kept=kept,
        quarantined=quarantined, sha256={str(src.path): src.sha256 or ""},
    )
    if not stats.reconciles():
        raise ReconciliationError(f"{src.path}: internal error: {stats} does not reconcile")

    ensure_tables(con, _TARGET_TABLES)
    if table == "raw_reviews":
        insert_kept = f"""
            INSERT INTO raw_reviews BY NAME
            SELECT $category AS category, user_id, item_id, rating, timestamp,
                   position,
                   $source_file AS source_file, source_line
            FROM {stage.name} WHERE reason IS NULL
        """
        order = "source_line, sub"
    else:
        insert_kept = f"""
            INSERT INTO raw_items BY NAME
            SELECT $category AS category, item_id, title, description, brand, categories, image_url, image_path,
                   $source_file AS source_file, source_line
            FROM {stage.name} WHERE reason IS NULL ORDER BY source_line
        """
        order = "source_line"
    p = {"category": category, "source_file": src.name}
    pt = {"category": category, "table_name": table}
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"DELETE FROM {table} WHERE category = $category", {"category": category})
        con.execute(insert_kept, p)
        con.execute("DELETE FROM ingest_quarantine WHERE category = $category AND table_name = $table_name", pt)
        con.execute(
            f"""
            INSERT INTO ingest_quarantine BY NAME
            SELECT $category AS category, $table_name AS table_name, $source_file AS source_file,
                   source_line, reason, detail, raw_text
            FROM {stage.name} WHERE reason IS NOT NULL ORDER BY {order}
            """,
            {**p, **pt},
        )
        con.execute("DELETE FROM ingest_log WHERE category = $category AND table_name = $table_name", pt)
        con.execute(
            "INSERT INTO ingest_log BY NAME SELECT $category AS category, $table_name AS table_name, "
            "$source_file AS source_file, $sha AS source_sha256, $read AS rows_read, $kept AS rows_kept, "
            "$quarantined AS rows_quarantined",
            {**p, **pt, "sha": src.sha256 or "", "read": rows_read, "kept": kept,
             "quarantined": stats.rows_quarantined},
        )
        _check_written(con, category, stats)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return stats


def _check_written(con: duckdb.DuckDBPyConnection, category: str, stats: IngestStats) -> None:
    (kept,) = con.execute(f"SELECT count(*) FROM {stats.table} WHERE category = ?", [category]).fetchone()
    rows = con.execute(
        "SELECT reason, count(*) FROM ingest_quarantine WHERE category = ? AND table_name = ? GROUP BY ALL",
        [category, stats.table],
    ).fetchall()
    (log_read, log_kept, log_q) = con.execute(
        "SELECT sum(rows_read), sum(rows_kept), sum(rows_quarantined) FROM ingest_log "
        "WHERE category = ? AND table_name = ?",
        [category, stats.table],
    ).fetchone()
    problems = []
    if kept != stats.rows_kept:
        problems.append(f"{stats.table} has {kept} rows, expected {stats.rows_kept}")
    if dict(rows) != stats.quarantined:
        problems.append(f"ingest_quarantine has {dict(rows)}, expected {stats.quarantined}")
    if (log_read, log_kept, log_q) != (stats.rows_read, stats.rows_kept, stats.rows_quarantined):
        problems.append(f"ingest_log says {(log_read, log_kept, log_q)}")
    if not stats.reconciles():
        problems.append("rows_read != rows_kept + quarantined")
    if problems:
        raise ReconciliationError(f"{', '.join(stats.files)}: ingest does not reconcile: {'; '.join(problems)}")


def publish_nothing(con: duckdb.DuckDBPyConnection, category: str, table: str) -> IngestStats:
    """A category without a file for ``table``: its partition, quarantine and log rows become empty."""
    ensure_tables(con, _TARGET_TABLES)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"DELETE FROM {table} WHERE category = ?", [category])
        con.execute("DELETE FROM ingest_quarantine WHERE category = ? AND table_name = ?", [category, table])
        con.execute("DELETE FROM ingest_log WHERE category = ? AND table_name = ?", [category, table])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return IngestStats(table=table, files=[], rows_read=0, rows_kept=0, quarantined={})
