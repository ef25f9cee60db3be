"""DuckDB helpers shared by every step that writes or reads a table."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import duckdb

from srec.tables import TABLES, create_table_sql, table_columns


def scalar_row(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple:
    """The single row of ``sql``, fetched to the end: DuckDB 2.0 keeps a result open after
    ``fetchone()`` and then refuses ``register``/``sql`` on the same connection."""
    rows = con.execute(sql, params or []).fetchall()
    if len(rows) != 1:
        raise ValueError(f"expected one row from {sql!r}, got {len(rows)}")
    return rows[0]


def run_key(*parts: object) -> str:
    """A computation's key: the hash of what it depends on (inputs' content hashes, settings, code version), as
    JSON. Equal keys mean stored results of the computation can stand in for running it again."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether ``name`` is a table (or view) of the connection's current database and schema."""
    ((n,),) = con.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_name = ? AND table_schema = current_schema() AND table_catalog = current_database()",
        [name],
    ).fetchall()
    return n > 0


def ensure_tables(con: duckdb.DuckDBPyConnection, names: Iterable[str] | None = None) -> None:
    """Create the tables that do not exist yet, and add the columns a newer srec declares to those that do."""
    names = list(names or TABLES)
    for name in names:
        con.execute(create_table_sql(name))
    have: dict[str, set[str]] = {}
    for table, column in con.execute(  # one query for all of them: this runs on every connection
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_catalog = current_database()").fetchall():
        have.setdefault(table, set()).add(column)
    for name in names:
        add_missing_columns(con, name, have.get(name, set()))


class SchemaMigrationError(RuntimeError):
    """A database table lacks a column that cannot be added in place."""


def add_missing_columns(con: duckdb.DuckDBPyConnection, name: str, have: set[str]) -> list[str]:
    """Add to an existing table the nullable columns its definition declares and it lacks (``have``: its columns;
    a database written by an older srec); their old rows read NULL. A missing NOT NULL column has no value for
    those rows: that is an error naming the table and the column, not a silent default. Returns the columns
    added."""
    missing = [c for c in table_columns(name) if c.name not in have]
    required = [c.name for c in missing if not c.nullable]
    if required:
        raise SchemaMigrationError(
            f"table {name} of this database lacks the NOT NULL column(s) {required}, which this srec writes: it was "
            f"written by an older srec; drop the table (DROP TABLE {name}) and materialize its asset again")
    for c in missing:
        con.execute(f'ALTER TABLE {name} ADD COLUMN "{c.name}" {c.sql_type}')
    return [c.name for c in missing]


def replace_partition(
    con: duckdb.DuckDBPyConnection, table: str, category: str, select_sql: str, params: list | None = None
) -> int:
    """Replace ``category``'s rows of ``table`` with the rows ``select_sql`` yields, in one transaction.

    ``select_sql`` must produce the table's columns by name (``category`` included).
    Returns the number of rows written.
    """
    ensure_tables(con, [table])
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"DELETE FROM {table} WHERE category = ?", [category])
        con.execute(f"INSERT INTO {table} BY NAME {select_sql}", params or [])
        (n,) = scalar_row(con, f"SELECT count(*) FROM {table} WHERE category = ?", [category])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return int(n)


def delete_partition(con: duckdb.DuckDBPyConnection, table: str, category: str) -> None:
    ensure_tables(con, [table])
    con.execute(f"DELETE FROM {table} WHERE category = ?", [category])


def partition_content_hash(
    con: duckdb.DuckDBPyConnection, table: str, category: str, columns: Iterable[str] | None = None, *,
    file_name_columns: Iterable[str] = (), where: dict[str, object] | None = None,
) -> str:
    """Order-independent content hash (a sum, so repeated rows still count) of a table's partition: the
    DataVersion of what was written. ``columns`` limits it to the columns that are the content (leaving out
    bookkeeping such as whether a row came from a cache). ``file_name_columns``: paths of content-addressed
    files, hashed by their file name only, so the same content in a moved data folder keeps its version.
    ``where``: column = value filters within the partition (the rows of one kind)."""
    columns = list(columns) if columns is not None else [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
    names = list(file_name_columns)
    row = ", ".join([*(f'"{c}"' for c in columns if c not in names),
                     *(f"""regexp_extract("{c}", '[^/\\\\]*$')""" for c in names)])
    where = dict(where or {})
    filters = "".join(f' AND "{c}" = ?' for c in where)
    (n, h) = scalar_row(
        con, f"SELECT count(*), coalesce(sum(hash(({row}))::HUGEINT), 0) FROM {table} WHERE category = ?{filters}",
        [category, *where.values()],
    )
    return hashlib.sha256(f"{table}:{','.join(columns)}:{n}:{h}".encode()).hexdigest()[:16]
