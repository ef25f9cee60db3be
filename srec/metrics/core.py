"""Ranking metrics for one held-out positive per user: the single home of the metric math.

Every user is described by three counts about the positive (the target item):

- ``n_greater`` (g): negatives scored strictly above the positive,
- ``n_ties`` (t): negatives scored exactly equal to the positive,
- ``n_negatives`` (n): all negatives the positive competes with.

Ties are resolved as the *expectation* under uniformly random tie-breaking: the
positive's rank is uniform on ``g+1 .. g+t+1`` (``t+1`` equally likely values). Hence

- ``HR@K = P(rank <= K) = clip(K - g, 0, t+1) / (t+1)``
- ``NDCG@K = (1/(t+1)) * sum_{r=g+1}^{min(g+t+1, K)} 1/log2(r+1)`` (IDCG = 1 with one positive)
- ``MRR@K = (1/(t+1)) * sum_{r=g+1}^{min(g+t+1, K)} 1/r``
- ``Recall@K = HR@K`` (one relevant item)
- ``AUC = (n - g - t + t/2) / n`` (share of negatives below the positive, ties count half)

``NDCG`` and ``MRR`` without ``@K`` mean no cut-off. The sums are differences of a
precomputed cumulative table, so large tie blocks (thousands of tied items in full
ranking) stay exact and vectorised.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

DEFAULT_METRICS: tuple[str, ...] = (
    "AUC",
    "HR@1",
    "HR@5",
    "HR@10",
    "NDCG@5",
    "NDCG@10",
    "MRR@5",
    "MRR@10",
    "Recall@10",
)

_METRIC_RE = re.compile(r"^(HR|NDCG|MRR|Recall)@([1-9][0-9]*)$")


def parse_metric(name: str) -> tuple[str, int | None]:
    """'NDCG@10' -> ('NDCG', 10); 'AUC' -> ('AUC', None); 'MRR' / 'NDCG' -> no cut-off."""
    if name in ("AUC", "MRR", "NDCG"):
        return name, None
    m = _METRIC_RE.match(name)
    if m is None:
        raise ValueError(
            f"unknown metric {name!r}: expected 'AUC', 'MRR', 'NDCG' or one of HR@K, NDCG@K, MRR@K, Recall@K"
        )
    return m.group(1), int(m.group(2))


def _as_counts(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold whole numbers")
    return arr.astype(np.int64, copy=False)


def _cumulative(weights_of_rank, upto: int) -> np.ndarray:
    """table[k] = sum_{r=1}^{k} w(r), table[0] = 0."""
    ranks = np.arange(1, upto + 1, dtype=np.float64)
    table = np.empty(upto + 1, dtype=np.float64)
    table[0] = 0.0
    np.cumsum(weights_of_rank(ranks), out=table[1:])
    return table


def per_user_metrics(n_greater, n_ties, n_negatives, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, np.ndarray]:
    """Per-user metric values (float64 arrays, one entry per user), ties in expectation.

    Raises ``ValueError`` for unknown metric names, negative counts, ``g + t > n`` or ``n < 1``.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    parsed = [(m, *parse_metric(m)) for m in metrics]
    g = _as_counts(n_greater, "n_greater")
    t = _as_counts(n_ties, "n_ties")
    n = _as_counts(n_negatives, "n_negatives")
    if not (g.shape == t.shape == n.shape):
        raise ValueError(f"count arrays differ in length: {g.shape}, {t.shape}, {n.shape}")
    if g.size:
        bad = np.flatnonzero((g < 0) | (t < 0) | (n < 1) | (g + t > n))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"invalid rank counts for user {i}: n_greater={g[i]}, n_ties={t[i]}, n_negatives={n[i]} "
                f"(need counts >= 0, n_negatives >= 1 and n_greater + n_ties <= n_negatives); "
                f"{bad.size} invalid user(s) in all"
            )

    lo = g  # ranks g+1 .. g+t+1: table[hi] - table[lo]
    hi = g + t + 1
    width = (t + 1).astype(np.float64)
    max_rank = int(hi.max()) if hi.size else 1

    tables: dict[tuple[str, int], np.ndarray] = {}

    def table(kind: str, upto: int) -> np.ndarray:
        key = (kind, upto)
        if key not in tables:
            if kind == "NDCG":
                tables[key] = _cumulative(lambda r: 1.0 / np.log2(r + 1.0), upto)
            else:
                tables[key] = _cumulative(lambda r: 1.0 / r, upto)
        return tables[key]

    out: dict[str, np.ndarray] = {}
    for name, kind, k in parsed:
        if kind == "AUC":
            out[name] = (n - g - t + 0.5 * t) / n.astype(np.float64)
        elif kind in ("HR", "Recall"):
            out[name] = np.clip(k - g, 0, t + 1) / width
        else:  # NDCG / MRR, optionally cut at K
            cut = max_rank if k is None else k
            tab = table(kind, cut)
            out[name] = (tab[np.minimum(hi, cut)] - tab[np.minimum(lo, cut)]) / width
    return out


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray, row_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 2-D of the same shape, got {scores.shape} and {labels.shape}")
    if labels.size and not np.all((labels == 0) | (labels == 1)):
        row = int(np.flatnonzero(~np.all((labels == 0) | (labels == 1), axis=1))[0]) + row_offset
        raise ValueError(f"labels must be 0/1; row {row} holds another value")
    nan_rows = np.flatnonzero(np.isnan(scores).any(axis=1))
    if nan_rows.size:
        raise ValueError(f"NaN score in row {int(nan_rows[0]) + row_offset} ({nan_rows.size} row(s) with NaN in all)")
    labels = labels.astype(bool)
    n_pos = labels.sum(axis=1)
    bad = np.flatnonzero(n_pos != 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"row {i + row_offset} has {int(n_pos[i])} positives; exactly one positive per row is required "
            f"({bad.size} such row(s) in all)"
        )
    return scores, labels


def rank_counts_from_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_greater, n_ties, n_negatives) per row of ``[n_users, n_cands]`` scores with exactly one positive per row."""
    scores, labels = _check_scores_labels(scores, labels)
    rows = np.arange(scores.shape[0])
    pos = scores[rows, labels.argmax(axis=1)][:, None]
    neg = ~labels
    n_greater = ((scores > pos) & neg).sum(axis=1).astype(np.int64)
    n_ties = ((scores == pos) & neg).sum(axis=1).astype(np.int64)
    n_negatives = neg.sum(axis=1).astype(np.int64)
    return n_greater, n_ties, n_negatives


def rank_counts_from_ragged(scores: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`rank_counts_from_scores` for rows of differing lengths (grouped by length, vectorised per group)."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} score rows but {len(labels)} label rows")
    n_rows = len(scores)
    lengths = np.fromiter((len(s) for s in scores), dtype=np.int64, count=n_rows)
    label_lengths = np.fromiter((len(x) for x in labels), dtype=np.int64, count=n_rows)
    mismatch = np.flatnonzero(lengths != label_lengths)
    if mismatch.size:
        i = int(mismatch[0])
        raise ValueError(f"row {i} has {lengths[i]} scores but {label_lengths[i]} labels")
    out = [np.zeros(n_rows, dtype=np.int64) for _ in range(3)]
    for length in np.unique(lengths):
        idx = np.flatnonzero(lengths == length)
        s = np.asarray([scores[i] for i in idx], dtype=np.float64).reshape(len(idx), int(length))
        lab = np.asarray([labels[i] for i in idx]).reshape(len(idx), int(length))
        try:
            counts = rank_counts_from_scores(s, lab)
        except ValueError as e:  # name the row in the caller's numbering
            m = re.search(r"row (\d+)", str(e))
            if m is None:
                raise
            raise ValueError(str(e).replace(m.group(0), f"row {int(idx[int(m.group(1))])}", 1)) from None
        for dst, src in zip(out, counts):
            dst[idx] = src
    return out[0], out[1], out[2]


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.mean(v)) if len(v) else float("nan") for name, v in per_user.items()}
