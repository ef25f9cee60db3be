"""Leave-one-out data for the classic baselines, read from the ``interactions`` and ``eval_candidates`` tables.

Items are indexed 1..n_items (0 is padding). Only positives (``label = 1``) are used. Each user's
positives are ordered by ``seq_index``; the ``train`` ones form the training sequence, the single
``valid`` and ``test`` ones are the targets. The history of the valid target is the train items;
the history of the test target is the train items plus the valid target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import numpy as np
import pandas as pd

from srec.db import table_exists

SPLITS = ("valid", "test")


@dataclass
class SplitData:
    category: str
    item_ids: np.ndarray        # object [n_items + 1]: index -> item_id; item_ids[0] = "" (padding)
    user_ids: np.ndarray        # object [n_users]: row -> user_id
    train: list[np.ndarray]     # per user: chronological train item indices (int64, may be empty)
    valid_target: np.ndarray    # int64 [n_users]
    test_target: np.ndarray     # int64 [n_users]
    _item_index: pd.Index | None = field(default=None, repr=False)
    _user_index: pd.Index | None = field(default=None, repr=False)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def item_index(self, item_ids) -> np.ndarray:
        """Item ids -> indices (1..n_items); raises on unknown ids."""
        if self._item_index is None:
            self._item_index = pd.Index(self.item_ids[1:])
        idx = self._item_index.get_indexer(pd.Index(item_ids))
        if (idx < 0).any():
            unknown = pd.Index(item_ids)[idx < 0][:5].tolist()
            raise ValueError(f"{self.category}: {int((idx < 0).sum())} unknown item ids, e.g. {unknown}")
        return idx.astype(np.int64) + 1

    def user_index(self, user_ids) -> np.ndarray:
        if self._user_index is None:
            self._user_index = pd.Index(self.user_ids)
        idx = self._user_index.get_indexer(pd.Index(user_ids))
        if (idx < 0).any():
            unknown = pd.Index(user_ids)[idx < 0][:5].tolist()
            raise ValueError(f"{self.category}: {int((idx < 0).sum())} unknown user ids, e.g. {unknown}")
        return idx.astype(np.int64)

    def target(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.valid_target if split == "valid" else self.test_target

    def history(self, split: str) -> list[np.ndarray]:
        """Chronological items before the split's target: train (valid) or train + valid target (test)."""
        self.target(split)
        if split == "valid":
            return self.train
        return [np.append(t, v) for t, v in zip(self.train, self.valid_target)]

    def history_matrix(self, split: str, max_len: int | None = None) -> np.ndarray:
        """[n_users, L] left-padded (0) histories, most recent item last; ``max_len`` keeps the most recent."""
        return left_pad(self.history(split), max_len)

    def train_matrix(self, max_len: int) -> np.ndarray:
        """[n_users, max_len + 1] left-padded train sequences: inputs ``[:, :-1]``, next-item targets ``[:, 1:]``."""
        return left_pad(self.train, max_len + 1)


def left_pad(seqs: list[np.ndarray], max_len: int | None = None) -> np.ndarray:
    """Left-pad sequences with 0 into a matrix, keeping the last ``max_len`` items of each (vectorised)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max(initial=0)) if max_len is None else int(max_len)
    out = np.zeros((len(seqs), max(width, 1)), dtype=np.int64)
    if lengths.sum() == 0:
        return out
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    row = np.repeat(np.arange(len(seqs)), lengths)
    starts = np.cumsum(lengths) - lengths
    from_end = lengths[row] - (np.arange(len(flat)) - starts[row])  # 1 = most recent
    keep = from_end <= width
    out[row[keep], out.shape[1] - from_end[keep]] = flat[keep]
    return out


def load_split_data(con: duckdb.DuckDBPyConnection, category: str) -> SplitData:
    """The category's positives as per-user train sequences and valid/test targets.

    The item vocabulary is every item of the category's ``interactions`` (either label) and
    ``eval_candidates``, sorted by id, so every stored candidate has an index.
    Raises ValueError unless every user has exactly one valid and one test positive, after all train ones.
    """
    pos = con.execute(
        """SELECT user_id, item_id, seq_index, split FROM interactions
           WHERE category = ? AND label = 1 ORDER BY user_id, seq_index""",
        [category],
    ).df()
    if pos.empty:
        raise ValueError(f"no positive interactions for category {category!r}")
    sources = ["SELECT item_id FROM interactions WHERE category = $1"]
    if table_exists(con, "eval_candidates"):
        sources.append("SELECT item_id FROM eval_candidates WHERE category = $1")
    items = con.execute(
        f"SELECT DISTINCT item_id FROM ({' UNION ALL '.join(sources)}) ORDER BY item_id", [category]
    ).df()["item_id"]
    item_ids = np.concatenate([np.array([""], dtype=object), np.asarray(items, dtype=object)])

    counts = pd.crosstab(pos["user_id"], pos["split"]).reindex(columns=["train", "valid", "test"], fill_value=0)
    bad = counts[(counts["valid"] != 1) | (counts["test"] != 1)]
    if len(bad):
        raise ValueError(
            f"{category}: {len(bad)} users lack exactly one valid and one test positive, e.g. "
            f"{bad.head(3).to_dict('index')}"
        )
    unknown = set(pos["split"].unique()) - {"train", "valid", "test"}
    if unknown:
        raise ValueError(f"{category}: unknown split values {sorted(unknown)}")

    data = SplitData(category, item_ids, counts.index.to_numpy(dtype=object), [], np.empty(0), np.empty(0))
    user = data.user_index(pos["user_id"].to_numpy())
    item = data.item_index(pos["item_id"].to_numpy())
    split = pos["split"].to_numpy()
    seq = pos["seq_index"].to_numpy()
    # Chronology: every train positive before the valid one, the valid one before the test one.
    last_train = np.full(data.n_users, -1, dtype=np.int64)
    tr = split == "train"
    np.maximum.at(last_train, user[tr], seq[tr])
    valid_seq, test_seq = np.empty(data.n_users, np.int64), np.empty(data.n_users, np.int64)
    valid_seq[user[split == "valid"]] = seq[split == "valid"]
    test_seq[user[split == "test"]] = seq[split == "test"]
    if ((last_train >= valid_seq) | (valid_seq >= test_seq)).any():
        raise ValueError(f"{category}: some users' valid/test positives are not after their train positives")

    data.valid_target = np.zeros(data.n_users, np.int64)
    data.test_target = np.zeros(data.n_users, np.int64)
    data.valid_target[user[split == "valid"]] = item[split == "valid"]
    data.test_target[user[split == "test"]] = item[split == "test"]
    # Sort the train rows by (user row, seq_index) and split them at user boundaries.
    order = np.lexsort((seq[tr], user[tr]))
    tr_user, tr_item = user[tr][order], item[tr][order]
    bounds = np.searchsorted(tr_user, np.arange(1, data.n_users))
    data.train = np.split(tr_item, bounds)
    return data


def load_candidates(
    con: duckdb.DuckDBPyConnection, category: str, split: str, protocol: str, data: SplitData
) -> tuple[np.ndarray, np.ndarray]:
    """Stored candidates as ``(user_index [n], items [n, 1 + k])`` in item indices, column 0 the positive.

    Rows are ordered by user index. Checks that slots are 0..k for every user, that slot 0 is the
    only positive and that it is the user's target for ``split``. Empty arrays when none are stored.
    """
    df = con.execute(
        """SELECT user_id, slot, item_id, is_positive FROM eval_candidates
           WHERE category = ? AND split = ? AND protocol = ?""",
        [category, split, protocol],
    ).df()
    if df.empty:
        return np.empty(0, np.int64), np.empty((0, 0), np.int64)
    u = data.user_index(df["user_id"].to_numpy())
    order = np.lexsort((df["slot"].to_numpy(), u))
    u, slot = u[order], df["slot"].to_numpy()[order]
    item = data.item_index(df["item_id"].to_numpy()[order])
    positive = df["is_positive"].to_numpy()[order].astype(bool)
    users, per_user = np.unique(u, return_counts=True)
    width = int(per_user[0])
    where = f"{category}/{split}/{protocol}"
    if (per_user != width).any():
        raise ValueError(f"{where}: users have different numbers of candidates ({sorted(set(per_user.tolist()))})")
    slot = slot.reshape(-1, width)
    if (slot != np.arange(width)).any():
        raise ValueError(f"{where}: slots must be 0..{width - 1} for every user")
    positive = positive.reshape(-1, width)
    if not positive[:, 0].all() or positive[:, 1:].any():
        raise ValueError(f"{where}: slot 0 must be the only positive candidate")
    items = item.reshape(-1, width)
    if (items[:, 0] != data.target(split)[users]).any():
        raise ValueError(f"{where}: slot 0 is not the user's {split} target for some users")
    return users, items


