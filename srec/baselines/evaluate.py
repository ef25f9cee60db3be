"""Vectorised scoring: full ranking over all items (history excluded) and the stored candidate sets.

Everything works on a batch of users at once with torch ops; there is no per-user Python loop.
The official metrics (with bootstrap intervals) are computed elsewhere from the tables these
results are written to; ``_hr_ndcg`` is only for early stopping and logs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from srec.baselines.data import SplitData
from srec.metrics.core import per_user_metrics

# scorer(split, user_rows) -> [B, n_items + 1] scores for the users at those rows, for that split's target
Scorer = Callable[[str, np.ndarray], torch.Tensor]


def full_ranking_counts(
    scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each target lands among the items outside the user's history.

    scores [B, n_items + 1] (column 0 = padding), targets [B], history [B, H] item indices padded with 0
    (duplicates allowed). Returns int64 tensors [B]: n_greater (non-history items other than the target
    scored strictly above it), n_ties (scored equal), n_negatives (all non-history items other than the
    target: n_items - |history| - 1 when the target is not in the history).

    Same result as masking the history and padding out of ``scores``, without writing to ``scores`` or
    allocating a [B, n_items + 1] mask: count over all columns, then subtract what the excluded columns
    (padding, the distinct history items other than the target) contributed. Two passes over ``scores``.
    """
    n_items = scores.shape[1] - 1
    rows = torch.arange(scores.shape[0], device=scores.device)
    t = scores[rows, targets].unsqueeze(1)
    if not torch.isfinite(t).all():  # a diverged model: NaN targets would count as rank 1
        raise ValueError("non-finite target scores")
    # distinct history items other than the target (0 = nothing): sort each row, zero repeats
    h = history.masked_fill(history == targets.unsqueeze(1), 0).sort(1).values
    h[:, 1:].masked_fill_(h[:, 1:] == h[:, :-1], 0)
    excluded = h > 0
    h_scores = scores.gather(1, h)
    pad = scores[:, :1]
    n_greater = (scores > t).sum(1, dtype=torch.int64) - ((h_scores > t) & excluded).sum(1) - (pad > t).sum(1)
    n_ties = (scores == t).sum(1, dtype=torch.int64) - 1 - ((h_scores == t) & excluded).sum(1) - (pad == t).sum(1)
    return n_greater, n_ties, n_items - 1 - excluded.sum(1)


def sampled_counts(candidate_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """n_greater, n_ties of column 0 (the positive) among the other candidates: [n, 1 + k] -> [n], [n]."""
    pos = candidate_scores[:, :1]
    return (candidate_scores[:, 1:] > pos).sum(1), (candidate_scores[:, 1:] == pos).sum(1)


def _hr_ndcg(n_greater, n_ties, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected HR@k and NDCG@k per user under random tie-breaking (srec.metrics.core)."""
    g, t = np.asarray(n_greater), np.asarray(n_ties)
    m = per_user_metrics(g, t, g + t + 1, (f"HR@{k}", f"NDCG@{k}"))  # n_negatives only matters for AUC
    return m[f"HR@{k}"], m[f"NDCG@{k}"]


@dataclass
class SplitResult:
    """One model on one split: full-ranking counts for every user, candidate scores per protocol."""

    n_greater: np.ndarray       # [n_users]
    n_ties: np.ndarray
    n_negatives: np.ndarray
    candidate_scores: dict[str, np.ndarray]  # protocol -> [n_cand_users, 1 + k] float64

    def quick(self, k: int = 10) -> dict[str, dict[str, float]]:
        out = {}
        hr, ndcg = _hr_ndcg(self.n_greater, self.n_ties, k)
        out["full_ranking"] = {f"hr@{k}": float(hr.mean()), f"ndcg@{k}": float(ndcg.mean())}
        for protocol, s in self.candidate_scores.items():
            hr, ndcg = _hr_ndcg(*sampled_counts(s), k)
            out[protocol] = {f"hr@{k}": float(hr.mean()), f"ndcg@{k}": float(ndcg.mean())}
        return out


def evaluate_split(
    scorer: Scorer,
    data: SplitData,
    split: str,
    candidates: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    batch_users: int = 256,
    device: str | torch.device = "cpu",
) -> SplitResult:
    """Score every user for ``split`` in batches: full-ranking counts, plus the scores of the stored candidates."""
    candidates = {p: c for p, c in (candidates or {}).items() if len(c[0])}
    hist_np = data.history_matrix(split)  # full history (left-padded), for the exclusion
    hist_len = (hist_np != 0).sum(1)
    history = torch.as_tensor(hist_np, device=device)
    targets = torch.as_tensor(data.target(split), device=device)
    n = data.n_users
    g, t, neg = (np.empty(n, np.int64) for _ in range(3))
    cand_row = {p: np.full(n, -1, np.int64) for p in candidates}
    cand_items = {p: torch.as_tensor(items, device=device) for p, (_, items) in candidates.items()}
    cand_scores = {p: np.empty(items.shape, np.float64) for p, (_, items) in candidates.items()}
    for p, (users, _) in candidates.items():
        cand_row[p][users] = np.arange(len(users))
    order = np.argsort(hist_len, kind="stable")  # batches of similar length: little padding to run through
    for start in range(0, n, batch_users):
        rows = order[start:start + batch_users]
        scores = scorer(split, rows).to(device)
        width = max(int(hist_len[rows].max()), 1)
        counts = full_ranking_counts(scores, targets[rows], history[rows][:, -width:])
        for out, c in zip((g, t, neg), counts):
            out[rows] = c.cpu().numpy()
        for p in candidates:
            r = cand_row[p][rows]
            sel = r >= 0
            if sel.any():
                picked = torch.as_tensor(r[sel], device=device)
                cand_scores[p][r[sel]] = scores[torch.as_tensor(sel, device=device)].gather(
                    1, cand_items[p][picked]).double().cpu().numpy()
    return SplitResult(g, t, neg, cand_scores)


def valid_ndcg(scorer: Scorer, data: SplitData, k: int = 10, batch_users: int = 256, device="cpu") -> float:
    """Full-ranking NDCG@k on the valid targets (early stopping)."""
    r = evaluate_split(scorer, data, "valid", None, batch_users, device)
    return float(_hr_ndcg(r.n_greater, r.n_ties, k)[1].mean())
