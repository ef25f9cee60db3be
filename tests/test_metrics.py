"""Ranking metrics against hand-computed cases: srec.metrics.core and the local evaluate module."""
from __future__ import annotations

import os

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ[_key] = "1"

import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from srec.metrics import (  # noqa: E402
    DEFAULT_METRICS,
    RANKING_METRICS_PATH,
    load_ranking_metrics,
    per_user_metrics,
    rank_counts_from_ragged,
    rank_counts_from_scores,
)


def lg(r: float) -> float:
    """The NDCG gain of rank r: 1 / log2(r + 1)."""
    return 1.0 / math.log2(r + 1)


def one(g, t, n, metrics=DEFAULT_METRICS) -> dict[str, float]:
    out = per_user_metrics([g], [t], [n], metrics)
    return {k: float(v[0]) for k, v in out.items()}


# ---------------------------------------------------------------- hand-computed cases


def test_positive_ranked_second():
    # candidates: 0.9 (positive), 0.8, 0.95, 0.1 -> one negative (0.95) above, no ties
    scores = np.array([[0.9, 0.8, 0.95, 0.1]])
    labels = np.array([[1, 0, 0, 0]])
    g, t, n = rank_counts_from_scores(scores, labels)
    assert (g.tolist(), t.tolist(), n.tolist()) == ([1], [0], [3])
    m = one(1, 0, 3, ["HR@1", "HR@5", "NDCG@5", "NDCG@10", "MRR@5", "MRR@10", "Recall@10", "AUC"])
    # rank = g + 1 = 2
    assert m["HR@1"] == 0.0  # 2 > 1
    assert m["HR@5"] == 1.0  # 2 <= 5
    assert m["Recall@10"] == 1.0  # = HR@10 with one positive
    assert m["NDCG@5"] == pytest.approx(1 / math.log2(3))  # 1/log2(2+1) = 0.6309...
    assert m["NDCG@5"] == pytest.approx(0.6309297535714575)
    assert m["NDCG@10"] == pytest.approx(0.6309297535714575)
    assert m["MRR@5"] == pytest.approx(0.5)  # 1/2
    assert m["MRR@10"] == pytest.approx(0.5)
    assert m["AUC"] == pytest.approx(2 / 3)  # 2 of 3 negatives below: (3 - 1 - 0 + 0)/3


def test_all_scores_equal_rank_uniform_over_all_positions():
    # 1 positive + 3 negatives, every score 0.5: g = 0, t = 3, rank uniform on 1..4
    scores = np.full((1, 4), 0.5)
    labels = np.array([[0, 0, 1, 0]])
    g, t, n = rank_counts_from_scores(scores, labels)
    assert (g[0], t[0], n[0]) == (0, 3, 3)
    m = one(0, 3, 3, ["HR@1", "HR@2", "HR@5", "NDCG@2", "NDCG@5", "MRR@10", "AUC"])
    assert m["HR@1"] == pytest.approx(1 / 4)  # only rank 1 of 4
    assert m["HR@2"] == pytest.approx(2 / 4)  # ranks 1, 2
    assert m["HR@5"] == pytest.approx(1.0)  # all four ranks <= 5
    # NDCG@2 = (1/log2 2 + 1/log2 3) / 4 = (1 + 0.63093) / 4
    assert m["NDCG@2"] == pytest.approx((1 + 0.6309297535714575) / 4)
    # NDCG@5 = (1/log2 2 + 1/log2 3 + 1/log2 4 + 1/log2 5) / 4 = (1 + 0.63093 + 0.5 + 0.43068) / 4
    assert m["NDCG@5"] == pytest.approx((1 + 0.6309297535714575 + 0.5 + 0.43067655807339306) / 4)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)  # = 25/48
    assert m["MRR@10"] == pytest.approx(25 / 48)
    assert m["AUC"] == pytest.approx(0.5)  # (3 - 0 - 3 + 1.5) / 3


def test_large_tie_block_full_ranking():
    # 10000 negatives: 5 strictly above, 9994 tied -> rank uniform on 6..10000 (9995 values)
    g, t, n = 5, 9994, 10000
    m = one(g, t, n, ["HR@10", "NDCG@10", "MRR@10", "AUC", "NDCG", "MRR", "HR@1"])
    assert m["HR@1"] == 0.0
    assert m["HR@10"] == pytest.approx(5 / 9995)  # ranks 6..10 of 9995
    assert m["NDCG@10"] == pytest.approx((lg(6) + lg(7) + lg(8) + lg(9) + lg(10)) / 9995)
    assert m["MRR@10"] == pytest.approx((1 / 6 + 1 / 7 + 1 / 8 + 1 / 9 + 1 / 10) / 9995)
    # AUC = (10000 - 5 - 9994 + 9994/2) / 10000 = 4998 / 10000
    assert m["AUC"] == pytest.approx(0.4998)
    # no cut-off: mean over every rank 6..10000, summed term by term
    assert m["NDCG"] == pytest.approx(math.fsum(lg(r) for r in range(6, 10001)) / 9995, rel=1e-12)
    assert m["MRR"] == pytest.approx(math.fsum(1 / r for r in range(6, 10001)) / 9995, rel=1e-12)


def test_cutoff_boundary():
    # rank exactly K = 10 (g = 9): counts
    m = one(9, 0, 50, ["HR@9", "HR@10", "NDCG@10", "MRR@10"])
    assert m["HR@9"] == 0.0 and m["HR@10"] == 1.0
    assert m["NDCG@10"] == pytest.approx(1 / math.log2(11))
    assert m["MRR@10"] == pytest.approx(1 / 10)
    # rank K + 1 = 11 (g = 10): nothing
    m = one(10, 0, 50, ["HR@10", "NDCG@10", "MRR@10"])
    assert m == {"HR@10": 0.0, "NDCG@10": 0.0, "MRR@10": 0.0}
    # tie block straddling K: g = 8, t = 3 -> ranks 9, 10, 11, 12 equally likely; 9 and 10 count
    m = one(8, 3, 50, ["HR@10", "NDCG@10", "MRR@10", "AUC"])
    assert m["HR@10"] == pytest.approx(2 / 4)
    assert m["NDCG@10"] == pytest.approx((lg(9) + lg(10)) / 4)
    assert m["MRR@10"] == pytest.approx((1 / 9 + 1 / 10) / 4)
    assert m["AUC"] == pytest.approx((50 - 8 - 3 + 1.5) / 50)  # 40.5 / 50
    # tie block entirely beyond K
    assert one(10, 100, 500, ["HR@10", "NDCG@10", "MRR@10"]) == {"HR@10": 0.0, "NDCG@10": 0.0, "MRR@10": 0.0}


def test_top_rank_and_last_rank():
    assert one(0, 0, 20) == {m: 1.0 for m in DEFAULT_METRICS}
    last = one(20, 0, 20)
    assert all(v == 0.0 for v in last.values())


def test_matches_exhaustive_random_tie_breaking():
    """Average over every ordering of tied items (a real random tie-break) equals the closed forms."""
    rng = np.random.default_rng(7)
    metrics = ["HR@1", "HR@2", "HR@3", "NDCG@2", "NDCG@4", "MRR@3", "AUC"]
    for _ in range(25):
        n_c = int(rng.integers(2, 7))
        scores = rng.integers(0, 3, size=n_c).astype(float)  # many ties
        labels = np.zeros(n_c, dtype=int)
        pos = int(rng.integers(n_c))
        labels[pos] = 1
        totals = dict.fromkeys(metrics, 0.0)
        perms = list(itertools.permutations(range(n_c)))
        for perm in perms:  # perm = tie-break priority
            order = sorted(range(n_c), key=lambda i: (-scores[i], perm[i]))
            r = order.index(pos) + 1
            below = sum(1 for i in range(n_c) if i != pos and order.index(i) > order.index(pos))
            totals["HR@1"] += r <= 1
            totals["HR@2"] += r <= 2
            totals["HR@3"] += r <= 3
            totals["NDCG@2"] += lg(r) if r <= 2 else 0.0
            totals["NDCG@4"] += lg(r) if r <= 4 else 0.0
            totals["MRR@3"] += 1 / r if r <= 3 else 0.0
            totals["AUC"] += below / (n_c - 1)
        g, t, n = rank_counts_from_scores(scores[None, :], labels[None, :])
        got = per_user_metrics(g, t, n, metrics)
        for name in metrics:
            assert got[name][0] == pytest.approx(totals[name] / len(perms)), (scores, pos, name)


def test_vectorised_many_users_fast():
    import time

    rng = np.random.default_rng(0)
    n_users = 1_000_000
    n = rng.integers(1, 50_000, size=n_users)
    g = (rng.random(n_users) * n).astype(np.int64)
    t = ((n - g) * rng.random(n_users)).astype(np.int64)
    start = time.perf_counter()
    out = per_user_metrics(g, t, n, DEFAULT_METRICS + ("NDCG", "MRR"))
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert all(v.shape == (n_users,) for v in out.values())
    i = int(np.argmax(t))  # a user with a huge tie block, checked term by term
    w = t[i] + 1
    assert out["NDCG"][i] == pytest.approx(math.fsum(lg(r) for r in range(g[i] + 1, g[i] + t[i] + 2)) / w, rel=1e-9)
    assert out["HR@10"][i] == pytest.approx(max(0, min(10 - g[i], w)) / w)


def test_rank_counts_two_dimensional():
    scores = np.array(
        [
            [0.5, 0.7, 0.5, 0.1],  # positive 0.5: one above (0.7), one tie (0.5)
            [0.2, 0.3, 0.4, 0.9],  # positive 0.9 (last column): nothing above
            [-np.inf, -np.inf, 0.0, 1.0],  # positive -inf tied with one -inf, two above
        ]
    )
    labels = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    g, t, n = rank_counts_from_scores(scores, labels)
    assert g.tolist() == [1, 0, 2]
    assert t.tolist() == [1, 0, 1]
    assert n.tolist() == [3, 3, 3]


def test_rank_counts_ragged():
    g, t, n = rank_counts_from_ragged([[0.9, 0.8, 0.95, 0.1], [1.0, 2.0], [3.0, 3.0, 3.0]], [[1, 0, 0, 0], [1, 0], [0, 1, 0]])
    assert g.tolist() == [1, 1, 0]
    assert t.tolist() == [0, 0, 2]
    assert n.tolist() == [3, 1, 2]


# ---------------------------------------------------------------- errors


def test_two_positives_names_the_row():
    scores = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    labels = np.array([[1, 0, 0], [1, 1, 0]])
    with pytest.raises(ValueError, match="row 1 has 2 positives"):
        rank_counts_from_scores(scores, labels)


def test_no_positive_names_the_row():
    with pytest.raises(ValueError, match="row 0 has 0 positives"):
        rank_counts_from_scores(np.array([[0.1, 0.2]]), np.array([[0, 0]]))


def test_nan_scores_rejected():
    scores = np.array([[0.1, 0.2, 0.3], [0.4, np.nan, 0.6]])
    labels = np.array([[1, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="NaN score in row 1"):
        rank_counts_from_scores(scores, labels)


def test_ragged_errors_name_the_caller_row():
    with pytest.raises(ValueError, match="row 2 has 2 positives"):
        rank_counts_from_ragged([[0.1, 0.2], [0.1, 0.2, 0.3], [0.5, 0.5]], [[1, 0], [0, 1, 0], [1, 1]])


def test_bad_counts_and_names_rejected():
    with pytest.raises(ValueError, match="unknown metric"):
        per_user_metrics([0], [0], [3], ["HR@0"])
    with pytest.raises(ValueError, match="unknown metric"):
        per_user_metrics([0], [0], [3], ["precision@5"])
    with pytest.raises(ValueError, match="invalid rank counts for user 1"):
        per_user_metrics([0, 3], [0, 1], [3, 3], ["HR@1"])  # 3 + 1 > 3
    with pytest.raises(ValueError, match="invalid rank counts"):
        per_user_metrics([0], [0], [0], ["AUC"])  # no negatives


# ---------------------------------------------------------------- the evaluate module


@pytest.fixture(scope="module")
def scores_metric():
    return load_ranking_metrics("scores")


@pytest.fixture(scope="module")
def counts_metric():
    return load_ranking_metrics("rank_counts")


def test_evaluate_scores_config_hand_case(scores_metric):
    # user 0: rank 2 (see test_positive_ranked_second); user 1: rank 1 of 2
    res = scores_metric.compute(
        predictions=[[0.9, 0.8, 0.95, 0.1], [0.3, 0.2]],
        references=[[1, 0, 0, 0], [1, 0]],
        metrics=["HR@1", "MRR@10", "AUC"],
        per_user=True,
    )
    assert res["HR@1"] == pytest.approx((0 + 1) / 2)
    assert res["MRR@10"] == pytest.approx((0.5 + 1) / 2)
    assert res["AUC"] == pytest.approx((2 / 3 + 1) / 2)
    assert res["per_user"]["MRR@10"] == pytest.approx([0.5, 1.0])
    assert set(res) == {"HR@1", "MRR@10", "AUC", "per_user"}


def test_evaluate_both_configs_match_core(scores_metric, counts_metric):
    rng = np.random.default_rng(3)
    n_users, n_c = 300, 21
    scores = np.round(rng.random((n_users, n_c)), 1)  # coarse -> ties
    labels = np.zeros((n_users, n_c), dtype=np.int64)
    labels[np.arange(n_users), rng.integers(0, n_c, n_users)] = 1
    counts = rank_counts_from_scores(scores, labels)
    expected = per_user_metrics(*counts, DEFAULT_METRICS)

    res = scores_metric.compute(predictions=scores.tolist(), references=labels.tolist(), per_user=True)
    res_np = scores_metric.compute(predictions=scores, references=labels)
    res_counts = counts_metric.compute(predictions=np.stack(counts, axis=1).tolist(), per_user=True)
    for name in DEFAULT_METRICS:
        assert res[name] == pytest.approx(float(expected[name].mean()))
        assert res_np[name] == pytest.approx(float(expected[name].mean()))
        assert res_counts[name] == pytest.approx(float(expected[name].mean()))
        assert np.allclose(res["per_user"][name], expected[name])
        assert np.allclose(res_counts["per_user"][name], expected[name])
    assert "per_user" not in res_np


def test_evaluate_rank_counts_hand_case(counts_metric):
    # (g, t, n) = (1, 0, 3): rank 2; (5, 9994, 10000): see test_large_tie_block_full_ranking
    res = counts_metric.compute(predictions=[[1, 0, 3], [5, 9994, 10000]], metrics=["HR@10", "AUC"])
    assert res["HR@10"] == pytest.approx((1 + 5 / 9995) / 2)
    assert res["AUC"] == pytest.approx((2 / 3 + 0.4998) / 2)


def test_evaluate_errors(scores_metric, counts_metric):
    with pytest.raises(ValueError, match="row 1 has 2 positives"):
        scores_metric.compute(predictions=[[0.1, 0.2], [0.3, 0.4]], references=[[1, 0], [1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        scores_metric.compute(predictions=[[0.1, float("nan")]], references=[[1, 0]])
    with pytest.raises(ValueError, match="invalid rank counts"):
        counts_metric.compute(predictions=[[5, 5, 3]])
    with pytest.raises(ValueError):  # rank counts are triples
        counts_metric.compute(predictions=[[1, 2]])


def test_unknown_config_rejected():
    with pytest.raises(ValueError, match="unknown config"):
        load_ranking_metrics("nope")


_FRESH_HOME_SCRIPT = f"""
import json
import evaluate
m = evaluate.load({str(RANKING_METRICS_PATH)!r}, "scores")
r1 = m.compute(predictions=[[0.9, 0.8, 0.95, 0.1]], references=[[1, 0, 0, 0]], metrics=["HR@1", "NDCG@5", "AUC"])
c = evaluate.load({str(RANKING_METRICS_PATH)!r}, "rank_counts")
r2 = c.compute(predictions=[[1, 0, 3]], metrics=["HR@1", "NDCG@5", "AUC"])
d = evaluate.load({str(RANKING_METRICS_PATH)!r})
print(json.dumps({{"scores": r1, "rank_counts": r2, "default_config": d.config_name}}))
"""


@pytest.fixture(scope="module", autouse=True)
def fresh_home_child(tmp_path_factory):
    """A child process loading the module with a fresh HF_HOME and every HF_*_OFFLINE flag.

    Started before this module's first test so its `import evaluate` (seconds: evaluate
    imports transformers) overlaps with the in-process tests; read by the last test.
    """
    home = tmp_path_factory.mktemp("fresh_hf_home")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    for key in ("HF_MODULES_CACHE", "HF_METRICS_CACHE", "HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-c", _FRESH_HOME_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield home, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_evaluate_loads_offline_with_fresh_hf_home(fresh_home_child):
    """evaluate.load of the folder path works offline from an empty HF cache, both configs and the default."""
    home, proc = fresh_home_child
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    expected = {"HR@1": 0.0, "NDCG@5": 1 / math.log2(3), "AUC": 2 / 3}
    for key in ("scores", "rank_counts"):
        assert out[key] == pytest.approx(expected)
    assert out["default_config"] == "scores"  # evaluate.load(path) without a config name
    # the module was copied into the fresh cache
    assert list((home / "modules").rglob("ranking_metrics.py")), "evaluate did not copy the module into HF_HOME"
