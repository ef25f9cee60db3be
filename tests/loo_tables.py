"""Test fixture: ``interactions`` + ``eval_candidates`` rows from plain chronological sequences.

For tests and benchmarks that need the baselines' inputs without the ingest pipeline. Same rules as
the project's protocol: all items positive, leave-one-out (last item test, second last valid, the
rest train), negatives drawn uniformly without replacement over the items the user never interacted
with, seeded, slot 0 the positive. The pipeline's own assets are the source of truth for real runs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from srec.db import ensure_tables
from srec.tables import PROTOCOLS_SAMPLED


def read_p5_sequences(path, limit_users: int | None = None) -> dict[str, list[str]]:
    """``USER ITEM ITEM ...`` lines (oldest item first) -> {user: [items]} in file order."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                out[parts[0]] = parts[1:]
                if limit_users and len(out) >= limit_users:
                    break
    return out


def loo_frames(
    category: str, sequences: dict[str, list[str]], seed: int = 2024,
    protocols: dict[str, int] = PROTOCOLS_SAMPLED,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, eval_candidates) frames with the columns of srec.tables."""
    short = [u for u, s in sequences.items() if len(s) < 3]
    if short:
        raise ValueError(f"users need >= 3 items for leave-one-out, e.g. {short[:3]}")
    users = list(sequences)
    lengths = np.array([len(sequences[u]) for u in users])
    seq_index = np.concatenate([np.arange(n) for n in lengths])
    split = np.where(seq_index == np.repeat(lengths - 1, lengths), "test",
                     np.where(seq_index == np.repeat(lengths - 2, lengths), "valid", "train"))
    inter = pd.DataFrame({
        "category": category,
        "user_id": np.repeat(np.array(users, dtype=object), lengths),
        "item_id": np.concatenate([np.asarray(sequences[u], dtype=object) for u in users]),
        "rating": np.nan,
        "timestamp": pd.array([pd.NA] * int(lengths.sum()), dtype="Int64"),
        "position": np.arange(int(lengths.sum()), dtype=np.int64),
        "label": np.int8(1),
        "seq_index": seq_index.astype(np.int32),
        "split": split,
    })

    vocab = np.array(sorted(set(inter["item_id"])), dtype=object)
    index = {it: i for i, it in enumerate(vocab)}
    rng = np.random.default_rng(seed)
    rows = []
    for split_name, offset in (("valid", 2), ("test", 1)):
        for protocol, k in protocols.items():
            u_col, slot_col, item_col = [], [], []
            for u in users:
                seen = np.fromiter((index[i] for i in sequences[u]), dtype=np.int64)
                if len(vocab) - len(set(seen.tolist())) < k:
                    raise ValueError(f"user {u} has fewer than {k} never-interacted items")
                draw = rng.choice(len(vocab), size=min(len(vocab), k + len(seen)), replace=False)
                neg = draw[~np.isin(draw, seen)][:k]  # a uniformly random k-subset of the unseen items
                u_col.append(np.full(k + 1, u, dtype=object))
                slot_col.append(np.arange(k + 1, dtype=np.int32))
                item_col.append(np.concatenate([[sequences[u][-offset]], vocab[neg]]))
            n = len(users) * (k + 1)
            rows.append(pd.DataFrame({
                "category": category, "split": split_name, "protocol": protocol,
                "user_id": np.concatenate(u_col), "slot": np.concatenate(slot_col),
                "item_id": np.concatenate(item_col).astype(object),
                "is_positive": np.tile(np.arange(k + 1) == 0, len(users)),
            }))
            assert len(rows[-1]) == n
    return inter, pd.concat(rows, ignore_index=True)


def write_loo_tables(con, category: str, sequences: dict[str, list[str]], seed: int = 2024,
                     protocols: dict[str, int] = PROTOCOLS_SAMPLED) -> tuple[int, int]:
    """Replace the category's rows of ``interactions`` and ``eval_candidates``. Returns their row counts."""
    inter, cands = loo_frames(category, sequences, seed, protocols)
    ensure_tables(con, ["interactions", "eval_candidates"])
    con.execute("BEGIN TRANSACTION")
    try:
        for table, frame in (("interactions", inter), ("eval_candidates", cands)):
            con.execute(f"DELETE FROM {table} WHERE category = ?", [category])
            con.register("_loo_frame", frame)
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _loo_frame")
            con.unregister("_loo_frame")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return len(inter), len(cands)
