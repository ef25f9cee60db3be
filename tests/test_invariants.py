"""Each invariant passes on pipeline output and detects a planted violation."""
from __future__ import annotations


import duckdb
import pandas as pd
import pytest

from srec import invariants as inv
from srec.candidates import draw_eval_candidates
from srec.config import FilterSettings
from srec.db import ensure_tables
from srec.sequences import build_interactions
from srec.tables import TABLES
from srec.paths import SHARED_DATA_DIR

BEAUTY = SHARED_DATA_DIR / "amazon-beauty" / "user_sequence.txt"
CAT = "b"


@pytest.fixture(scope="module")
def pipeline_tables() -> dict[str, pd.DataFrame]:
    """A Beauty cut through ingest-like tables, interactions and candidates, all consistent (built once)."""
    c = duckdb.connect()
    c.execute("SET enable_progress_bar = false")
    ensure_tables(c)
    lines = [ln.split() for ln, _ in zip(open(BEAUTY), range(120))]
    users = [p[0] for p in lines for _ in p[1:]]
    items = [i for p in lines for i in p[1:]]
    raw = pd.DataFrame({"user_id": users, "item_id": items, "position": range(len(users))})
    c.execute(
        "INSERT INTO raw_reviews SELECT ?, user_id, item_id, NULL, NULL, position, 'user_sequence.txt', position + 1 "
        "FROM raw",
        [CAT],
    )
    c.execute(
        "INSERT INTO raw_items SELECT DISTINCT ?, item_id, NULL, NULL, NULL, NULL, NULL, NULL, 'item_titles.csv', 1 "
        "FROM raw",
        [CAT],
    )
    n_items = c.execute("SELECT count(*) FROM raw_items WHERE category = ?", [CAT]).fetchone()[0]
    c.execute(
        "INSERT INTO ingest_quarantine VALUES (?, 'raw_reviews', 'user_sequence.txt', 7, 'empty_line', NULL, ''), "
        "(?, 'raw_items', 'item_titles.csv', 3, 'missing_item', NULL, ',title')",
        [CAT, CAT],
    )
    c.execute(
        "INSERT INTO ingest_log VALUES (?, 'raw_reviews', 'user_sequence.txt', ?, ?, ?, 1), "
        "(?, 'raw_items', 'item_titles.csv', ?, ?, ?, 1)",
        [CAT, "a" * 64, len(raw) + 1, len(raw), CAT, "b" * 64, n_items + 1, n_items],
    )
    build_interactions(c, CAT, FilterSettings(user_k_core=5, item_k_core=1))
    draw_eval_candidates(c, CAT, seed=2024)
    tables = {t: c.execute(f"SELECT * FROM {t}").fetch_df() for t in TABLES}
    c.close()
    return tables


@pytest.fixture
def con(pipeline_tables):
    """A fresh database holding the pipeline tables (each test may corrupt its own copy)."""
    c = duckdb.connect()
    c.execute("SET enable_progress_bar = false")
    ensure_tables(c)
    for table, df in pipeline_tables.items():
        if len(df):
            c.execute(f"INSERT INTO {table} BY NAME SELECT * FROM df")
    yield c
    c.close()


ALL = [inv.targets_not_in_history, inv.one_positive_per_candidate_set, inv.eval_users_have_history,
       inv.interactions_reconcile, inv.ingest_reconciles]


def first_user(con) -> str:
    return con.execute("SELECT min(user_id) FROM interactions WHERE category = ?", [CAT]).fetchone()[0]


def assert_detected(out: inv.InvariantOutcome, problem: str) -> None:
    assert not out.passed and out.n_violations >= 1
    assert 1 <= len(out.examples) <= inv.MAX_EXAMPLES
    assert out.examples["problem"].str.contains(problem, regex=False).any(), out.examples.to_string()
    assert problem in out.description


@pytest.mark.parametrize("check", ALL, ids=lambda f: f.__name__)
def test_passes_on_consistent_pipeline_output(con, check):
    out = check(con, CAT)
    assert out.passed, out.description
    assert out.n_violations == 0 and out.examples.empty and CAT in out.description


# --- targets_not_in_history -------------------------------------------------------------------------

def test_target_in_train_is_detected(con):
    u = first_user(con)
    con.execute(
        "UPDATE interactions SET item_id = (SELECT item_id FROM interactions WHERE category = $1 AND user_id = $2 "
        "AND split = 'valid') WHERE category = $1 AND user_id = $2 AND seq_index = 0",
        [CAT, u],
    )
    out = inv.targets_not_in_history(con, CAT)
    assert_detected(out, "target item already in the user's earlier rows")
    assert out.examples.user_id.iloc[0] == u


def test_test_target_equal_to_valid_target_is_detected(con):
    u = first_user(con)
    con.execute(
        "UPDATE interactions SET item_id = (SELECT item_id FROM interactions WHERE category = $1 AND user_id = $2 "
        "AND split = 'test') WHERE category = $1 AND user_id = $2 AND split = 'valid'",
        [CAT, u],
    )
    assert_detected(inv.targets_not_in_history(con, CAT), "target item already in the user's earlier rows")


def test_history_after_target_is_detected(con):
    u = first_user(con)
    con.execute("UPDATE interactions SET seq_index = 999 WHERE category = ? AND user_id = ? AND seq_index = 0", [CAT, u])
    assert_detected(inv.targets_not_in_history(con, CAT), "at or after the target")


# --- one_positive_per_candidate_set -------------------------------------------------------------------

@pytest.mark.parametrize(
    "sql,problem",
    [
        ("UPDATE eval_candidates SET is_positive = true WHERE category = $1 AND user_id = $2 AND split = 'test' "
         "AND protocol = '1+20' AND slot = 3", "set has 2 positives"),
        ("UPDATE eval_candidates SET is_positive = false WHERE category = $1 AND user_id = $2 AND split = 'test' "
         "AND protocol = '1+20' AND slot = 0", "set has 0 positives"),
        ("UPDATE eval_candidates SET slot = CASE slot WHEN 0 THEN 4 ELSE 0 END WHERE category = $1 AND user_id = $2 "
         "AND split = 'valid' AND protocol = '1+99' AND slot IN (0, 4)", "positive at slot 4"),
        ("UPDATE eval_candidates SET item_id = 'NOT_THE_TARGET' WHERE category = $1 AND user_id = $2 "
         "AND split = 'valid' AND protocol = '1+20' AND slot = 0", "positive is not the user's valid target"),
        ("DELETE FROM eval_candidates WHERE category = $1 AND user_id = $2 AND split = 'test' AND protocol = '1+99' "
         "AND slot = 50", "set has 99 rows, expected 100"),
        ("UPDATE eval_candidates SET slot = 7 WHERE category = $1 AND user_id = $2 AND split = 'test' "
         "AND protocol = '1+20' AND slot = 8", "slots are not 0..20"),
        ("UPDATE eval_candidates SET item_id = (SELECT item_id FROM interactions WHERE category = $1 AND user_id = $2 "
         "AND split = 'train' LIMIT 1) WHERE category = $1 AND user_id = $2 AND split = 'test' AND protocol = '1+20' "
         "AND slot = 5", "negative the user interacted with (train)"),
        ("UPDATE eval_candidates SET item_id = (SELECT item_id FROM eval_candidates WHERE category = $1 AND user_id = $2 "
         "AND split = 'test' AND protocol = '1+20' AND slot = 1) WHERE category = $1 AND user_id = $2 "
         "AND split = 'test' AND protocol = '1+20' AND slot = 2", "item repeated 2 times in set"),
        ("UPDATE eval_candidates SET protocol = '1+7' WHERE category = $1 AND user_id = $2 AND protocol = '1+20'",
         "unknown protocol"),
    ],
)
def test_candidate_set_violations_are_detected(con, sql, problem):
    con.execute(sql, [CAT, first_user(con)])
    assert_detected(inv.one_positive_per_candidate_set(con, CAT), problem)


# --- eval_users_have_history ----------------------------------------------------------------------

def test_missing_candidate_set_is_detected(con):
    u = first_user(con)
    con.execute("DELETE FROM eval_candidates WHERE category = ? AND user_id = ? AND split = 'test' "
                "AND protocol = '1+20'", [CAT, u])
    out = inv.eval_users_have_history(con, CAT)
    assert_detected(out, "no candidate set")
    assert out.examples[["user_id", "split", "protocol"]].values.tolist() == [[u, "test", "1+20"]]


def test_user_without_train_history_is_detected(con):
    u = first_user(con)
    con.execute("DELETE FROM interactions WHERE category = ? AND user_id = ? AND split = 'train'", [CAT, u])
    assert_detected(inv.eval_users_have_history(con, CAT), "user with a candidate set has 0 train positives")


def test_two_valid_targets_are_detected(con):
    u = first_user(con)
    con.execute("UPDATE interactions SET split = 'valid' WHERE category = ? AND user_id = ? AND seq_index = 0", [CAT, u])
    assert_detected(inv.eval_users_have_history(con, CAT), "user has 2 valid positives")


# --- interactions_reconcile ---------------------------------------------------------------------------

def test_lost_interaction_row_is_detected(con):
    con.execute("DELETE FROM interactions WHERE category = ? AND seq_index = 0 AND user_id = ?", [CAT, first_user(con)])
    assert_detected(inv.interactions_reconcile(con, CAT), "last rows_out <> interactions count")


def test_broken_funnel_chain_is_detected(con):
    con.execute("UPDATE interactions_funnel SET dropped = dropped + 1 WHERE category = ? AND step_order = 2", [CAT])
    out = inv.interactions_reconcile(con, CAT)
    assert_detected(out, "rows_out <> rows_in - dropped")
    con.execute("UPDATE interactions_funnel SET dropped = dropped - 1, rows_in = rows_in + 5, rows_out = rows_out + 5 "
                "WHERE category = ? AND step_order = 3", [CAT])
    con.execute("UPDATE interactions_funnel SET dropped = dropped - 1 WHERE category = ? AND step_order = 2", [CAT])
    assert_detected(inv.interactions_reconcile(con, CAT), "rows_in <> previous step rows_out")


def test_raw_count_mismatch_and_missing_funnel_are_detected(con):
    con.execute("INSERT INTO raw_reviews VALUES (?, 'late', 'x', NULL, NULL, 999999, 'f', 1)", [CAT])
    assert_detected(inv.interactions_reconcile(con, CAT), "first rows_in <> raw_reviews count")
    assert_detected(inv.interactions_reconcile(con, "nothing"), "no funnel rows for the category")


# --- ingest_reconciles ---------------------------------------------------------------------------------

def test_read_not_kept_plus_quarantined_is_detected(con):
    con.execute("UPDATE ingest_log SET rows_read = rows_read + 1 WHERE category = ? AND table_name = 'raw_items'", [CAT])
    out = inv.ingest_reconciles(con, CAT)
    assert_detected(out, "rows_read <> rows_kept + rows_quarantined")
    assert out.n_violations == 1


def test_stored_rows_not_matching_the_log_are_detected(con):
    con.execute("INSERT INTO ingest_quarantine VALUES (?, 'raw_reviews', 'user_sequence.txt', 9, 'duplicate', NULL, NULL)",
                [CAT])
    assert_detected(inv.ingest_reconciles(con, CAT), "logged rows_quarantined 1 <> ingest_quarantine rows 2")
    con.execute("DELETE FROM raw_items WHERE category = ? AND item_id = (SELECT min(item_id) FROM raw_items)", [CAT])
    assert_detected(inv.ingest_reconciles(con, CAT), "raw_items rows")


def test_no_log_and_missing_tables_are_failures(con):
    assert_detected(inv.ingest_reconciles(con, "nothing"), "no ingest_log rows for the category")
    fresh = duckdb.connect()
    out = inv.ingest_reconciles(fresh, CAT)
    assert not out.passed and "missing tables" in out.description
    out = inv.one_positive_per_candidate_set(fresh, CAT)
    assert not out.passed and "missing tables" in out.description
