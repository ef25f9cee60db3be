"""Storage resource: the DuckDB file every table lives in, and the folders reports are written to."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from srec.db import ensure_tables
from srec.db_lock import writer_lock
from srec.paths import ARTIFACTS_DIR, DATA_DIR, DEFAULT_DATABASE, REPORTS_DIR


class SrecStorage(dg.ConfigurableResource):
    """One DuckDB database for all tables (a ``category`` column partitions them) plus the report folder.

    Memory and threads are capped so a 10-million-row ingest spills to ``temp_directory``
    instead of growing without bound.
    """

    database: str = str(DEFAULT_DATABASE)
    reports_dir: str = str(REPORTS_DIR)
    artifacts_dir: str = str(ARTIFACTS_DIR)   # image cache, adapters: files that are not tables
    temp_directory: str = str(DATA_DIR / "tmp")
    memory_limit: str = "1500MB"
    threads: int = 2
    lock_timeout_s: float = 6 * 3600   # how long a writer waits for another run's writer (srec.db_lock)

    def _duckdb(self) -> DuckDBResource:
        return DuckDBResource(
            database=self.database,
            connection_config={
                "memory_limit": self.memory_limit,
                "threads": self.threads,
                "temp_directory": self.temp_directory,
                # Keep scan order == file order: ingest relies on it for line numbers and positions.
                "preserve_insertion_order": True,
            },
        )

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection with every srec table created; waits while another process writes."""
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        Path(self.temp_directory).mkdir(parents=True, exist_ok=True)
        log = dg.get_dagster_logger()
        with writer_lock(self.database, self.lock_timeout_s, on_wait=log.info), self._duckdb().get_connection() as con:
            # dagster_duckdb closes the connection only when the block ends without an exception: after a failed
            # step it stayed open until garbage collection, holding DuckDB's file lock (other processes could not
            # open the database) and refusing this process a connection with another configuration.
            try:
                ensure_tables(con)
                yield con
            finally:
                con.close()

    def artifact_dir(self, *parts: str) -> Path:
        path = Path(self.artifacts_dir).joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def report_dir(self, category: str) -> Path:
        path = Path(self.reports_dir) / category
        path.mkdir(parents=True, exist_ok=True)
        return path
