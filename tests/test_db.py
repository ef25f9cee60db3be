import re

import duckdb
import pytest

from srec.db import SchemaMigrationError, ensure_tables, partition_content_hash, replace_partition
from srec.tables import TABLES


def _con(tmp_path):
    return duckdb.connect(str(tmp_path / "t.duckdb"))


def _rows(con, category):
    return con.execute(
        "SELECT user_id, item_id FROM raw_reviews WHERE category = ? ORDER BY position", [category]
    ).fetchall()


SELECT = (
    "SELECT ? AS category, u AS user_id, i AS item_id, NULL::DOUBLE AS rating, NULL::BIGINT AS timestamp, "
    "p AS position, 'f' AS source_file, p + 1 AS source_line FROM (VALUES ('u1','a',0), ('u1','b',1)) t(u, i, p)"
)


def test_replace_partition_replaces_only_its_category(tmp_path):
    con = _con(tmp_path)
    assert replace_partition(con, "raw_reviews", "x", SELECT, ["x"]) == 2
    assert replace_partition(con, "raw_reviews", "y", SELECT, ["y"]) == 2
    assert replace_partition(con, "raw_reviews", "x", SELECT, ["x"]) == 2  # replaced, not appended
    assert _rows(con, "x") == [("u1", "a"), ("u1", "b")] and len(_rows(con, "y")) == 2


def test_replace_partition_rolls_back_on_error(tmp_path):
    con = _con(tmp_path)
    replace_partition(con, "raw_reviews", "x", SELECT, ["x"])
    with pytest.raises(duckdb.Error):
        replace_partition(con, "raw_reviews", "x", "SELECT 'x' AS category, NULL AS user_id")
    assert len(_rows(con, "x")) == 2


def test_content_hash_ignores_order_but_counts_repeats(tmp_path):
    con = _con(tmp_path)
    replace_partition(con, "raw_reviews", "x", SELECT, ["x"])
    h1 = partition_content_hash(con, "raw_reviews", "x")
    replace_partition(con, "raw_reviews", "y", SELECT + " ORDER BY p DESC", ["y"])
    # Same rows (but another category) -> another hash; same category re-written in another order -> same hash.
    replace_partition(con, "raw_reviews", "x", SELECT + " ORDER BY p DESC", ["x"])
    assert partition_content_hash(con, "raw_reviews", "x") == h1
    con.execute("INSERT INTO raw_reviews SELECT * FROM raw_reviews WHERE category = 'x' LIMIT 1")
    assert partition_content_hash(con, "raw_reviews", "x") != h1


def test_content_hash_reads_content_addressed_paths_by_file_name(tmp_path):
    con = _con(tmp_path)
    con.execute("CREATE TABLE t (category VARCHAR, item VARCHAR, image_path VARCHAR)")

    def version(*paths):
        con.execute("DELETE FROM t")
        con.executemany("INSERT INTO t VALUES ('x', ?, ?)", [[str(i), p] for i, p in enumerate(paths)])
        return partition_content_hash(con, "t", "x", file_name_columns=("image_path",))

    v = version("/work/a/data/normalized/4a/4abc.png", None)
    assert version("/tmp/moved/data/normalized/4a/4abc.png", None) == v           # the same file, moved
    assert version("C:\\data\\normalized\\4a\\4abc.png", None) == v
    assert version("/work/a/data/normalized/5b/5bcd.png", None) != v              # another image
    assert version("/work/a/data/normalized/4a/4abc.png", "/work/a/x/4abc.png") != v
    assert partition_content_hash(con, "t", "x") != partition_content_hash(con, "t", "x", file_name_columns=["image_path"])


def test_ensure_tables_adds_the_nullable_columns_an_older_database_lacks(tmp_path, monkeypatch):
    """A database written before recommender_runs recorded its scoring key: the columns are added, its row kept
    with NULLs there, and writing the new columns works. A NOT NULL column cannot be added: a clear error."""
    con = _con(tmp_path)
    before = TABLES["recommender_runs"].split("-- Added after the first release")[0]
    old = re.sub(r"--[^\n]*", "", before).strip().rstrip(",")
    assert "scoring_key" not in old
    con.execute(f"CREATE TABLE recommender_runs ({old})")
    con.execute("INSERT INTO recommender_runs VALUES ('beauty', 'm', 'zero-shot', 'b', 'f', true, NULL, NULL, NULL, "
                "'p', 'cpu', 21, 1.5)")
    ensure_tables(con)
    cols = [r[0] for r in con.execute("DESCRIBE recommender_runs").fetchall()]
    assert cols[-3:] == ["scoring_key", "scored_run_id", "scored_at"]
    assert con.execute("SELECT model, rows, scoring_key, scored_at FROM recommender_runs").fetchall() == [
        ("m", 21, None, None)]
    con.execute("CREATE TEMP TABLE old_rows AS SELECT * FROM recommender_runs")
    replace_partition(con, "recommender_runs", "beauty",
                      "SELECT * REPLACE ('k' AS scoring_key, 'r' AS scored_run_id, 1.0 AS scored_at) FROM old_rows")
    assert con.execute("SELECT scoring_key, scored_at FROM recommender_runs").fetchall() == [("k", 1.0)]
    ensure_tables(con)  # nothing more to add
    assert len(con.execute("DESCRIBE recommender_runs").fetchall()) == len(cols)

    monkeypatch.setitem(TABLES, "recommender_runs", TABLES["recommender_runs"] + ",\n        added BIGINT NOT NULL")
    with pytest.raises(SchemaMigrationError, match=r"recommender_runs .*NOT NULL column\(s\) \['added'\]"):
        ensure_tables(con, ["recommender_runs"])


def test_storage_resource_creates_tables_and_folders(storage):
    with storage.connect() as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    assert {"raw_reviews", "interactions", "eval_candidates", "metric_report"} <= tables
    assert storage.report_dir("beauty").is_dir()


# --- the DuckDB writer lock ----------------------------------------------------------------------------

def test_storage_connection_is_closed_when_the_step_fails(storage):
    """A failed step's connection must not outlive it (its traceback keeps a reference, as the local ``con`` does
    here until the test returns): open, it holds DuckDB's file lock and refuses a read-only connection in the same
    process."""
    with pytest.raises(RuntimeError, match="step failed"), storage.connect() as con:
        con.execute("SELECT 1")
        raise RuntimeError("step failed")
    with duckdb.connect(storage.database, read_only=True) as reader:
        assert reader.execute("SELECT count(*) FROM raw_reviews").fetchall() == [(0,)]


def test_writer_lock_serializes_processes_and_is_reentrant(tmp_path):
    import subprocess
    import sys
    import time

    from srec.db_lock import DatabaseLockTimeout, writer_lock

    db = tmp_path / "x.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from srec.db_lock import writer_lock\n"
         f"with writer_lock({str(db)!r}):\n    print('held', flush=True); time.sleep(1.5)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waits = []
    with pytest.raises(DatabaseLockTimeout, match="x.duckdb"):
        with writer_lock(db, timeout_s=0.2, on_wait=waits.append):
            pass
    assert waits and "another run is writing" in waits[0]
    started = time.monotonic()
    with writer_lock(db, timeout_s=30), writer_lock(db, timeout_s=0.01):   # nested: no second lock needed
        assert time.monotonic() - started > 0.3                           # waited for the holder
    holder.wait(timeout=10)
    with writer_lock(db, timeout_s=0.01):                                 # released on exit
        pass
