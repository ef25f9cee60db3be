"""Seeded evaluation candidate sets, drawn once and shared by every model.

For each user's ``valid`` and ``test`` target and each sampled protocol (``'1+20'``, ``'1+99'``):
slot 0 holds the positive target, slots 1..k negatives drawn uniformly *without replacement*
from the category's item universe (distinct items of its positives in ``interactions``) minus
every item the user ever interacted with (any row of the user: any split, any label).

The protocols are nested: one draw of ``max(k)`` negatives per ``(user, split)``, and a protocol
with ``k`` negatives takes its first ``k``. So the 1+20 set is a subset of the 1+99 set.

Determinism: users are taken in ``user_id`` order, ``valid`` before ``test``, from one
``numpy.random.Generator(PCG64(seed))``. The draw is vectorised: each ``(user, split)`` row gets
uniform random item codes (oversampled), codes the user interacted with and repeats within the row
are rejected, and the first ``k`` survivors are kept. Rejection sampling from a uniform stream
gives a uniform random ordered sample without replacement. The rare row that runs short continues
its own uniform stream (and, for a tiny eligible pool, finishes with ``Generator.choice`` over its
remaining eligible items), so the sample stays exactly uniform.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa

from srec.db import ensure_tables, replace_partition
from srec.tables import PROTOCOLS_SAMPLED

EVAL_SPLITS = ("valid", "test")
_CHUNK_SETS = 16384  # (user, split) rows drawn per vectorised block; part of the algorithm (determinism)

_T_USERS = "_srec_cand_users"
_T_ITEMS = "_srec_cand_items"


@dataclass
class CandidateStats:
    category: str
    seed: int
    users: int                       # users with candidate sets
    items: int                       # size of the item universe
    sets: int                        # (user, split, protocol) candidate sets written
    rows: int                        # eval_candidates rows written
    protocols: dict[str, int] = field(default_factory=dict)  # protocol -> negatives per set
    topped_up: int = 0               # (user, split) draws that needed more than the first block of draws
    seconds: float = 0.0             # all of it
    write_seconds: float = 0.0       # of which: writing the rows to eval_candidates


def _draw_block(
    rng: np.random.Generator,
    row_users: np.ndarray,            # (B,) user code of each row
    n_items: int,
    k: int,
    n_cols: int,
    pair_keys: np.ndarray,            # sorted int64 user*n_items+item of interacted pairs (non-empty)
    offsets: np.ndarray,              # pair_keys[offsets[u]:offsets[u+1]] are user u's pairs
) -> tuple[np.ndarray, int]:
    """Draw ``k`` distinct non-interacted item codes for each row; returns (B, k) int32 and #top-ups."""
    b = len(row_users)
    cand = rng.integers(0, n_items, size=(b, n_cols), dtype=np.int64)
    keys = row_users[:, None].astype(np.int64) * n_items + cand
    pos = np.searchsorted(pair_keys, keys)
    pos[pos == len(pair_keys)] = 0
    interacted = pair_keys[pos] == keys
    # Repeats within a row: after a stable sort, every element equal to its predecessor is a
    # later occurrence of the same code.
    order = np.argsort(cand, axis=1, kind="stable")
    sorted_c = np.take_along_axis(cand, order, axis=1)
    dup_sorted = np.zeros_like(sorted_c, dtype=bool)
    dup_sorted[:, 1:] = sorted_c[:, 1:] == sorted_c[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    ok = ~(interacted | dup)
    csum = np.cumsum(ok, axis=1)
    take = ok & (csum <= k)
    n_ok = csum[:, -1]
    out = np.empty((b, k), dtype=np.int32)
    full = n_ok >= k
    out[full] = cand[full][take[full]].reshape(-1, k)
    short = np.flatnonzero(~full)
    for i in short:  # rare: continue this row's uniform stream, then (tiny pools) an exact choice
        u = int(row_users[i])
        user_items = pair_keys[offsets[u]:offsets[u + 1]] - np.int64(u) * n_items
        excluded = set(user_items.tolist())
        got = cand[i][take[i]].tolist()
        chosen = set(got)
        for _ in range(8):
            for x in rng.integers(0, n_items, size=2 * (k - len(got)) + 16).tolist():
                if x not in chosen and x not in excluded:
                    chosen.add(x)
                    got.append(x)
                    if len(got) == k:
                        break
            if len(got) == k:
                break
        if len(got) < k:
            seen = np.union1d(user_items, np.array(got, dtype=np.int64))
            eligible = np.setdiff1d(np.arange(n_items, dtype=np.int64), seen, assume_unique=True)
            got += rng.choice(eligible, size=k - len(got), replace=False).tolist()
        out[i] = got
    return out, len(short)


def draw_eval_candidates(
    con: duckdb.DuckDBPyConnection,
    category: str,
    seed: int,
    negatives: dict[str, int] = PROTOCOLS_SAMPLED,
) -> CandidateStats:
    """Draw and write ``category``'s ``eval_candidates`` (replacing its rows); see the module docstring.

    Raises ``ValueError`` if a user lacks exactly one valid and one test positive, or has fewer
    eligible (never interacted) items than the largest protocol needs.
    """
    t0 = time.perf_counter()
    if not negatives or any(int(k) < 1 for k in negatives.values()):
        raise ValueError(f"negatives must map protocol names to positive counts, got {negatives!r}")
    protocols = {str(p): int(k) for p, k in negatives.items()}
    k_max = max(protocols.values())
    ensure_tables(con, ["interactions", "eval_candidates"])

    try:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE {_T_USERS} AS
            SELECT user_id, (row_number() OVER (ORDER BY user_id) - 1)::INTEGER AS uc
            FROM (SELECT DISTINCT user_id FROM interactions WHERE category = ?)
            """,
            [category],
        )
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE {_T_ITEMS} AS
            SELECT item_id, (row_number() OVER (ORDER BY item_id) - 1)::INTEGER AS ic
            FROM (SELECT DISTINCT item_id FROM interactions WHERE category = ? AND label = 1)
            """,
            [category],
        )
        n_users = int(con.execute(f"SELECT count(*) FROM {_T_USERS}").fetchall()[0][0])
        n_items = int(con.execute(f"SELECT count(*) FROM {_T_ITEMS}").fetchall()[0][0])
        if n_users == 0:
            raise ValueError(f"category {category!r} has no interactions: build interactions first")

        # Targets: exactly one valid and one test positive per user.
        tg = con.execute(
            f"""
            SELECT u.uc, CASE i.split WHEN 'valid' THEN 0 ELSE 1 END AS sc, it.ic,
                   count(*) OVER (PARTITION BY u.uc, i.split) AS n
            FROM interactions i JOIN {_T_USERS} u USING (user_id) JOIN {_T_ITEMS} it USING (item_id)
            WHERE i.category = ? AND i.label = 1 AND i.split IN ('valid', 'test')
            """,
            [category],
        ).fetchnumpy()
        target = np.full(2 * n_users, -1, dtype=np.int64)
        set_idx = tg["uc"].astype(np.int64) * 2 + tg["sc"].astype(np.int64)
        target[set_idx] = tg["ic"]
        bad_sets = np.union1d(np.flatnonzero(target < 0), set_idx[tg["n"] != 1])
        if len(bad_sets):
            s = int(bad_sets[0])
            (uid,) = con.execute(f"SELECT user_id FROM {_T_USERS} WHERE uc = ?", [s // 2]).fetchall()[0]
            raise ValueError(
                f"category {category!r}: user {uid!r} does not have exactly one {EVAL_SPLITS[s % 2]} positive "
                f"in interactions ({len(bad_sets)} (user, split) pairs affected)"
            )

        # Interacted (user, item) pairs within the universe, as sorted int64 keys.
        pairs = con.execute(
            f"""
            SELECT DISTINCT u.uc, it.ic
            FROM interactions i JOIN {_T_USERS} u USING (user_id) JOIN {_T_ITEMS} it USING (item_id)
            WHERE i.category = ?
            """,
            [category],
        ).fetchnumpy()
        pair_keys = np.sort(pairs["uc"].astype(np.int64) * n_items + pairs["ic"].astype(np.int64))
        n_interacted = np.bincount(pairs["uc"].astype(np.int64), minlength=n_users)
        offsets = np.concatenate([[0], np.cumsum(n_interacted)])
        eligible = n_items - n_interacted
        short_users = np.flatnonzero(eligible < k_max)
        if len(short_users):
            u = int(short_users[0])
            (uid,) = con.execute(f"SELECT user_id FROM {_T_USERS} WHERE uc = ?", [u]).fetchall()[0]
            raise ValueError(
                f"category {category!r}: user {uid!r} has {int(eligible[u])} eligible negative items "
                f"(item universe {n_items}, interacted {int(n_interacted[u])}) but {k_max} are needed "
                f"(protocols {protocols}); {len(short_users)} user(s) affected"
            )

        # Oversampling width: k plus the expected rejections (interacted items, at the 99th
        # percentile user, and repeats) with a margin, so nearly every row fills from one block.
        frac = min(float(np.quantile(n_interacted / n_items, 0.99)), 0.99)
        lam = k_max * frac / (1.0 - frac) + k_max * k_max / (2.0 * n_items)
        n_cols = k_max + int(math.ceil(1.2 * lam + 4.0 * math.sqrt(lam) + 4.0))
        n_cols = min(n_cols, 8 * k_max + 64)

        rng = np.random.Generator(np.random.PCG64(int(seed)))
        n_sets = 2 * n_users
        negs = np.empty((n_sets, k_max), dtype=np.int32)
        topped_up = 0
        row_users_all = np.arange(n_sets, dtype=np.int64) // 2
        for start in range(0, n_sets, _CHUNK_SETS):
            stop = min(start + _CHUNK_SETS, n_sets)
            negs[start:stop], n_top = _draw_block(
                rng, row_users_all[start:stop], n_items, k_max, n_cols, pair_keys, offsets
            )
            topped_up += n_top

        # Rows: (set, slot, item code) for slot 0 (target) and the k_max negatives; SQL expands
        # protocols (slot <= k) and maps codes back to ids.
        slots = np.concatenate(
            [np.zeros((n_sets, 1), dtype=np.int16), np.tile(np.arange(1, k_max + 1, dtype=np.int16), (n_sets, 1))],
            axis=1,
        )
        codes = np.concatenate([target.astype(np.int32)[:, None], negs], axis=1)
        sets_col = np.repeat(np.arange(n_sets, dtype=np.int32), k_max + 1)
        flat = pa.table({"s": sets_col, "slot": slots.ravel(), "ic": codes.ravel()})
        proto = pa.table({"protocol": list(protocols), "k": np.array(list(protocols.values()), dtype=np.int32)})
        flat_name, proto_name = "_srec_cand_flat", "_srec_cand_protocols"
        con.execute("SELECT 1").fetchall()  # register() refuses while an execute() result is unfinished
        con.register(flat_name, flat)
        con.register(proto_name, proto)
        t_write = time.perf_counter()
        try:
            rows = replace_partition(
                con, "eval_candidates", category,
                f"""
                SELECT ?::VARCHAR AS category,
                       CASE WHEN f.s % 2 = 0 THEN 'valid' ELSE 'test' END AS split,
                       p.protocol, u.user_id, f.slot::INTEGER AS slot, it.item_id, f.slot = 0 AS is_positive
                FROM {flat_name} f
                JOIN {proto_name} p ON f.slot <= p.k
                JOIN {_T_USERS} u ON u.uc = f.s // 2
                JOIN {_T_ITEMS} it ON it.ic = f.ic
                """,
                [category],
            )
        finally:
            con.unregister(flat_name)
            con.unregister(proto_name)
        write_seconds = time.perf_counter() - t_write
    finally:
        con.execute(f"DROP TABLE IF EXISTS {_T_USERS}")
        con.execute(f"DROP TABLE IF EXISTS {_T_ITEMS}")

    expected = n_sets * sum(k + 1 for k in protocols.values())
    if rows != expected:
        raise AssertionError(f"eval_candidates for {category!r}: wrote {rows} rows, expected {expected}")
    return CandidateStats(
        category=category,
        seed=int(seed),
        users=n_users,
        items=n_items,
        sets=n_sets * len(protocols),
        rows=rows,
        protocols=protocols,
        topped_up=topped_up,
        seconds=time.perf_counter() - t0,
        write_seconds=write_seconds,
    )
