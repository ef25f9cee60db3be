"""The metric report: bootstrap intervals, metric rows from DuckDB tables, md/json/png files."""
from __future__ import annotations

import os

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ[_key] = "1"

import json  # noqa: E402
import math  # noqa: E402

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from srec import report  # noqa: E402
from srec.report import bootstrap_ci, compute_metric_rows, markdown_table, write_report  # noqa: E402
from srec.tables import create_table_sql  # noqa: E402

CAT = "beauty"
METRICS = ("HR@10", "NDCG@10", "MRR@10", "AUC")


def lg(r: float) -> float:
    return 1.0 / math.log2(r + 1)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    v = np.random.default_rng(0).random(500)
    lo, hi = bootstrap_ci(v, n_boot=500, seed=1)
    assert lo < v.mean() < hi
    assert bootstrap_ci(v, n_boot=500, seed=1) == (lo, hi)
    assert bootstrap_ci(v, n_boot=500, seed=2) != (lo, hi)


def test_bootstrap_ci_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = (rng.random(100) < 0.3).astype(float)
    large = (rng.random(10_000) < 0.3).astype(float)
    w_small = np.subtract(*bootstrap_ci(small, n_boot=400)[::-1])
    w_large = np.subtract(*bootstrap_ci(large, n_boot=400)[::-1])
    assert w_large < w_small / 5  # width ~ 1/sqrt(n): 10x narrower expected


def test_bootstrap_ci_width_matches_normal_theory():
    # Bernoulli(0.3), n = 2000: standard error sqrt(0.3*0.7/2000) = 0.01025, 95% half width ~ 0.0201
    v = (np.random.default_rng(5).random(2000) < 0.3).astype(float)
    lo, hi = bootstrap_ci(v, n_boot=2000, seed=0)
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(v.mean() * (1 - v.mean()) / 2000), rel=0.1)


def test_bootstrap_chunking_does_not_change_the_result(monkeypatch):
    v = np.random.default_rng(1).random(1000)
    full = report.bootstrap_means(v, n_boot=300, seed=3)
    monkeypatch.setattr(report, "_BOOT_CHUNK_ELEMENTS", 5000)  # 5 resamples per chunk
    chunked = report.bootstrap_means(v, n_boot=300, seed=3)
    np.testing.assert_allclose(chunked, full, rtol=0, atol=1e-12)
    # and it equals the textbook resample-then-average with the same index stream
    idx = np.random.default_rng(3).integers(0, 1000, size=(300, 1000))
    np.testing.assert_allclose(v[idx].mean(axis=1), full, rtol=0, atol=1e-12)


def test_bootstrap_ci_degenerate():
    assert bootstrap_ci(np.full(50, 0.25)) == (0.25, 0.25)
    assert bootstrap_ci(np.array([0.7])) == (0.7, 0.7)
    lo, hi = bootstrap_ci(np.array([]))
    assert math.isnan(lo) and math.isnan(hi)


# ---------------------------------------------------------------- a small database with known answers


def _candidates(con, protocol: str, users: list[str], n_neg: int) -> None:
    rows = [(CAT, "test", protocol, u, slot, f"{u}_item{slot}", slot == 0) for u in users for slot in range(1 + n_neg)]
    _insert(con, "eval_candidates", rows)


def _scores(con, table: str, model: str, protocol: str, user: str, scores: list[float]) -> None:
    rows = [(CAT, model, "test", protocol, user, slot, f"{user}_item{slot}", float(s)) for slot, s in enumerate(scores)]
    _insert(con, table, rows)


def _insert(con, table: str, rows: list[tuple]) -> None:
    """One INSERT ... VALUES statement per call (row-by-row inserts are slow in DuckDB)."""
    width = len(rows[0])
    values = ", ".join("(" + ", ".join(["?"] * width) + ")" for _ in rows)
    con.execute(f"INSERT INTO {table} VALUES {values}", [v for r in rows for v in r])


def _ranked(rank: int, n_neg: int) -> list[float]:
    """Slot 0 (the positive) at 1-based ``rank``, no ties: rank - 1 negatives above it."""
    neg = [2.0] * (rank - 1) + [0.0] * (n_neg - (rank - 1))
    return [1.0] + neg


@pytest.fixture
def con():
    c = duckdb.connect(":memory:")
    for t in ("eval_candidates", "baseline_scores", "baseline_full_ranking"):
        c.execute(create_table_sql(t))
    users = ["u1", "u2", "u3"]
    _candidates(c, "1+20", users, 20)
    _candidates(c, "1+99", users, 99)
    # another category and the valid split must not leak in
    c.execute("INSERT INTO eval_candidates VALUES ('toys', 'test', '1+20', 'u1', 0, 'x', true)")
    c.execute("INSERT INTO baseline_scores VALUES ('toys', 'pop', 'test', '1+20', 'u1', 0, 'x', 1.0)")
    c.execute("INSERT INTO eval_candidates VALUES (?, 'valid', '1+20', 'u1', 0, 'v', true)", [CAT])
    c.execute("INSERT INTO baseline_scores VALUES (?, 'pop', 'valid', '1+20', 'u1', 0, 'v', 1.0)", [CAT])

    # model 'sasrec', 1+20: u1 rank 1, u2 rank 5 (4 negatives above), u3 all 21 scores equal
    _scores(c, "baseline_scores", "sasrec", "1+20", "u1", _ranked(1, 20))
    _scores(c, "baseline_scores", "sasrec", "1+20", "u2", _ranked(5, 20))
    _scores(c, "baseline_scores", "sasrec", "1+20", "u3", [0.5] * 21)
    # model 'pop', 1+20: constant scores for everyone -> rank uniform on 1..21
    for u in users:
        _scores(c, "baseline_scores", "pop", "1+20", u, [3.0] * 21)
    # model 'sasrec', 1+99: always rank 1
    for u in users:
        _scores(c, "baseline_scores", "sasrec", "1+99", u, _ranked(1, 99))
    # full ranking, model 'sasrec': (g, t, n) = (0, 0, 500) rank 1; (9, 0, 500) rank 10; (20, 0, 500) rank 21
    for u, g in zip(users, (0, 9, 20)):
        c.execute("INSERT INTO baseline_full_ranking VALUES (?, 'sasrec', 'test', ?, ?, ?, 0, 500)", [CAT, u, f"{u}_t", g])
    c.execute("INSERT INTO baseline_full_ranking VALUES ('toys', 'sasrec', 'test', 'u1', 'x', 400, 0, 500)")
    yield c
    c.close()


def _by_key(rows):
    return {(r["model"], r["protocol"], r["metric"]): r for r in rows}


def test_compute_metric_rows_known_values(con):
    rows = compute_metric_rows(con, CAT, "test", metrics=METRICS, n_boot=200, seed=0)
    got = _by_key(rows)
    assert set(k[:2] for k in got) == {("pop", "1+20"), ("sasrec", "1+20"), ("sasrec", "1+99"), ("sasrec", "full_ranking")}
    assert all(r["n_users"] == 3 and r["split"] == "test" and r["category"] == CAT for r in rows)
    assert set(rows[0]) == set(report.REPORT_COLUMNS)

    # sasrec 1+20: ranks 1, 5, uniform(1..21)
    s = {m: got[("sasrec", "1+20", m)]["value"] for m in METRICS}
    assert s["HR@10"] == pytest.approx((1 + 1 + 10 / 21) / 3)
    assert s["NDCG@10"] == pytest.approx((1 + lg(5) + sum(lg(r) for r in range(1, 11)) / 21) / 3)
    assert s["MRR@10"] == pytest.approx((1 + 1 / 5 + sum(1 / r for r in range(1, 11)) / 21) / 3)
    # AUC: u1 20/20, u2 16/20, u3 (20 - 20 + 10)/20 = 0.5
    assert s["AUC"] == pytest.approx((1 + 0.8 + 0.5) / 3)

    # pop 1+20: every user rank uniform on 1..21 -> per-user values identical, interval collapses
    p = got[("pop", "1+20", "HR@10")]
    assert p["value"] == pytest.approx(10 / 21)
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((10 / 21, 10 / 21))
    assert got[("pop", "1+20", "AUC")]["value"] == pytest.approx(0.5)

    # sasrec 1+99: rank 1 everywhere
    for m in METRICS:
        r = got[("sasrec", "1+99", m)]
        assert (r["value"], r["ci_low"], r["ci_high"]) == (1.0, 1.0, 1.0)

    # full ranking: ranks 1, 10, 21 among 501
    f = {m: got[("sasrec", "full_ranking", m)]["value"] for m in METRICS}
    assert f["HR@10"] == pytest.approx(2 / 3)
    assert f["NDCG@10"] == pytest.approx((1 + lg(10)) / 3)
    assert f["MRR@10"] == pytest.approx((1 + 1 / 10) / 3)
    assert f["AUC"] == pytest.approx((500 / 500 + 491 / 500 + 480 / 500) / 3)

    for r in rows:
        assert r["ci_low"] - 1e-12 <= r["value"] <= r["ci_high"] + 1e-12

    # order: protocol, then model, then metric
    assert [r["protocol"] for r in rows][:: len(METRICS)] == ["1+20", "1+20", "1+99", "full_ranking"]
    assert [r["metric"] for r in rows[: len(METRICS)]] == list(METRICS)


def test_missing_source_tables_are_skipped(con):
    con.execute("DROP TABLE baseline_full_ranking")
    rows = compute_metric_rows(con, CAT, metrics=("HR@10",), n_boot=50)
    assert {r["protocol"] for r in rows} == {"1+20", "1+99"}
    con.execute("DROP TABLE baseline_scores")
    assert compute_metric_rows(con, CAT, metrics=("HR@10",), n_boot=50) == []


def test_another_score_source_is_picked_up_by_name(con):
    # a recommender_scores table (same columns as baseline_scores) joins the report without code changes
    con.execute(create_table_sql("baseline_scores").replace("baseline_scores", "recommender_scores"))
    for u in ("u1", "u2"):  # scored a subset of users: allowed, n_users says so
        _scores(con, "recommender_scores", "mllm", "1+20", u, _ranked(2, 20))
    rows = compute_metric_rows(con, CAT, metrics=("HR@1", "MRR@10"), n_boot=50)
    got = _by_key(rows)
    assert got[("mllm", "1+20", "HR@1")]["value"] == 0.0
    assert got[("mllm", "1+20", "MRR@10")]["value"] == pytest.approx(0.5)
    assert got[("mllm", "1+20", "MRR@10")]["n_users"] == 2
    assert ("sasrec", "1+20", "HR@1") in got


def test_scores_for_other_items_are_rejected(con):
    con.execute("UPDATE baseline_scores SET item_id = 'other' WHERE model = 'pop' AND user_id = 'u2' AND slot = 3")
    with pytest.raises(ValueError, match="scores item 'other' but the candidate is 'u2_item3'"):
        compute_metric_rows(con, CAT, n_boot=10)


def test_partially_scored_user_is_rejected(con):
    con.execute("DELETE FROM baseline_scores WHERE model = 'pop' AND user_id = 'u3' AND slot = 7")
    with pytest.raises(ValueError, match="user 'u3' has 20 scores for 21 candidates"):
        compute_metric_rows(con, CAT, n_boot=10)


def test_nan_score_names_model_and_user(con):
    con.execute("UPDATE baseline_scores SET score = 'NaN'::DOUBLE WHERE model = 'sasrec' AND user_id = 'u2' AND slot = 4 AND protocol = '1+99'")
    with pytest.raises(ValueError, match=r"baseline_scores model 'sasrec' protocol '1\+99'.*NaN score in user 'u2'"):
        compute_metric_rows(con, CAT, n_boot=10)


# ---------------------------------------------------------------- writing


PROVENANCE = {
    "category": CAT,
    "data_source": "data/samples/beauty (Amazon 2014 Beauty sample)",
    "data_versions": {"interactions": "3f2a1b2c4d5e6f70", "eval_candidates": "9a8b7c6d5e4f3a2b"},
    "seed": 0,
    "n_boot": 200,
    "candidate_protocol": "1+20 and 1+99, negatives uniform over never-interacted items, seed 0",
    "date": "2026-01-01",
}


def test_write_report_three_files(con, tmp_path):
    rows = compute_metric_rows(con, CAT, metrics=("HR@10", "NDCG@10", "AUC"), n_boot=200)
    paths = write_report(rows, tmp_path / "out", category=CAT, provenance=PROVENANCE)
    assert set(paths) == {"md", "json", "png"}
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())

    data = json.loads(paths["json"].read_text())
    assert isinstance(data, list) and len(data) == len(rows)
    required = {"model", "protocol", "metric", "value", "ci_low", "ci_high", "n_users", "split", "category", "data"}
    for r in data:
        assert required <= set(r)
        assert r["data"] == "beauty @ interactions 3f2a1b2c, eval_candidates 9a8b7c6d, test split"
    assert {r["protocol"] for r in data} == {"1+20", "1+99", "full_ranking"}

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    md = paths["md"].read_text()
    for needle in (
        "chronological leave-one-out",
        "1+20",
        "1+99",
        "history excluded",
        "broken at random",
        "n_boot = 200",
        "3f2a1b2c4d5e6f70",
        "Krichene & Rendle",
        "## Protocol `full_ranking`",
    ):
        assert needle in md, needle
    hr = _by_key(rows)[("sasrec", "1+20", "HR@10")]
    assert f"{hr['value']:.4f} [{hr['ci_low']:.4f}, {hr['ci_high']:.4f}]" in md


def test_markdown_table_layout():
    rows = [
        {"model": "pop", "protocol": "1+20", "metric": "NDCG@10", "value": 0.0605, "ci_low": 0.057, "ci_high": 0.064, "n_users": 22},
        {"model": "pop", "protocol": "1+20", "metric": "HR@10", "value": 0.1, "ci_low": 0.09, "ci_high": 0.11, "n_users": 22},
        {"model": "sasrec", "protocol": "1+20", "metric": "HR@10", "value": 0.2, "ci_low": 0.19, "ci_high": 0.21, "n_users": 22},
        {"model": "sasrec", "protocol": "1+99", "metric": "HR@10", "value": 0.05, "ci_low": 0.04, "ci_high": 0.06, "n_users": 22},
    ]
    table = markdown_table(rows, "1+20").splitlines()
    assert table[0] == "| model | users | HR@10 | NDCG@10 |"  # metric columns in DEFAULT_METRICS order
    assert table[2] == "| pop | 22 | 0.1000 [0.0900, 0.1100] | 0.0605 [0.0570, 0.0640] |"
    assert table[3] == "| sasrec | 22 | 0.2000 [0.1900, 0.2100] | n/a |"
    assert "No results" in markdown_table(rows, "full_ranking")


def test_write_report_without_rows(tmp_path):
    paths = write_report([], tmp_path, category=CAT, provenance={"data_source": "nothing"})
    assert json.loads(paths["json"].read_text()) == []
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "No results" in paths["md"].read_text()


def test_caller_connection_with_an_unfinished_result(con):
    # DuckDB 2 keeps a fetchone() result open; the report must still run on that connection
    con.execute("SELECT * FROM eval_candidates").fetchone()
    rows = compute_metric_rows(con, CAT, metrics=("HR@10",), n_boot=20)
    assert len(rows) == 4


def test_duplicate_slot_is_rejected(con):
    con.execute("INSERT INTO baseline_scores VALUES (?, 'pop', 'test', '1+20', 'u1', 4, 'u1_item4', 0.1)", [CAT])
    with pytest.raises(ValueError, match="user 'u1' has duplicate slots"):
        compute_metric_rows(con, CAT, n_boot=10)


def test_same_model_in_two_sources_is_rejected(con):
    con.execute(create_table_sql("baseline_scores").replace("baseline_scores", "recommender_scores"))
    _scores(con, "recommender_scores", "pop", "1+20", "u1", _ranked(2, 20))
    with pytest.raises(ValueError, match="appears in both baseline_scores and recommender_scores"):
        compute_metric_rows(con, CAT, n_boot=10)


def test_write_report_provenance_with_per_table_version_keys(tmp_path):
    """Versions given as '<table>_version' keys (as the Dagster asset does) reach every JSON row."""
    rows = [{"category": CAT, "model": "pop", "split": "test", "protocol": "1+20", "metric": "HR@10",
             "value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n_users": 10}]
    prov = {
        "category": CAT,
        "source": "amazon2014: reviews_Beauty_5.json.gz",
        "interactions_version": "aaaabbbbccccdddd",
        "eval_candidates_version": "1111222233334444",
        "candidate_seed": 0,
        "bootstrap": "1000 resamples of users, seed 0",
        "generated_at": "2026-01-01T00:00:00+00:00",
        "dagster_run_id": "abc",
    }
    paths = write_report(rows, tmp_path, category=CAT, provenance=prov)
    data = json.loads(paths["json"].read_text())
    assert data[0]["data"] == "beauty @ interactions aaaabbbb, eval_candidates 11112222, test split"
    md = paths["md"].read_text()
    for needle in ("amazon2014: reviews_Beauty_5.json.gz", "`interactions`: `aaaabbbbccccdddd`",
                   "1000 resamples of users, seed 0", "2026-01-01T00:00:00+00:00", "candidate_seed: 0",
                   "dagster_run_id: abc"):
        assert needle in md, needle


def test_candidate_popularity_counts_the_window_before_the_target():
    """Counts as the popularity baseline makes them (train + valid for test, train for valid); pairs, ties half."""
    c = duckdb.connect(":memory:")
    for t in ("interactions", "eval_candidates"):
        c.execute(create_table_sql(t))
    # item -> splits of its positives (other users'): A 3 train; B 1 train + 1 valid; D 2 train + 1 test; C none.
    # An explicit negative (label 0) of A and another category's rows must not count.
    inter = [("A", "train")] * 3 + [("B", "train"), ("B", "valid"), ("D", "train"), ("D", "train"), ("D", "test")]
    _insert(c, "interactions", [(CAT, f"o{i}", item, None, None, i, 1, 0, split) for i, (item, split) in enumerate(inter)])
    _insert(c, "interactions", [(CAT, "o9", "C", 1.0, None, 9, 0, None, "train"), ("toys", "t", "C", None, None, 0, 1, 0, "train")])
    # u1: positive C (0) vs A (3), B (2): 0, 0. u2: positive B (2) vs D (2), C (0): 0.5, 1.
    cands = [("u1", "C", True), ("u1", "A", False), ("u1", "B", False),
             ("u2", "B", True), ("u2", "D", False), ("u2", "C", False)]
    _insert(c, "eval_candidates", [(CAT, "test", "1+20", u, i % 3, item, pos) for i, (u, item, pos) in enumerate(cands)])
    _insert(c, "eval_candidates", [(CAT, "valid", "1+20", "u1", 0, "B", True), (CAT, "valid", "1+20", "u1", 1, "D", False)])

    (test,) = report.candidate_popularity(c, CAT, "test")
    assert test == {"protocol": "1+20", "positives": 2, "negatives": 4, "positive_median": 1.0,
                    "negative_median": 2.0, "positive_at_most_1": 0.5, "negative_at_most_1": 0.25,
                    "pairs_positive_more": 0.375}
    note = report.candidate_popularity_note([test], "test")
    assert note.startswith("each candidate item's positives in train + valid") and "37.5% of a user's" in note
    assert "popularity ranks below chance" in note
    # valid targets: train counts only (B 1 vs D 2)
    (valid,) = report.candidate_popularity(c, CAT, "valid")
    assert valid["pairs_positive_more"] == 0.0 and valid["positive_median"] == 1.0
    above = {**test, "pairs_positive_more": 0.6}
    assert "below chance" not in report.candidate_popularity_note([above], "test")
    assert report.candidate_popularity(c, CAT, "train") == [] and report.candidate_popularity_note([]) is None
