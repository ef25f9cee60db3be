"""From ``raw_reviews`` to ``interactions``: dedupe, label, k-core, chronological leave-one-out.

Everything runs as DuckDB SQL over temporary tables, so memory stays bounded on ~10M raw rows
(DuckDB spills aggregates, windows and sorts to disk); pandas only sees per-user results in
``user_histories``.

Decisions (see also the table contract in ``srec.tables``):

* **Chronological order** of a user's rows is ``timestamp ASC NULLS LAST, position ASC``
  (``item_id`` as a last, never-needed tie-break so the order is total). ``position`` is the
  order in the source, which for timestamp-less sources (the P5 ``user_sequence.txt`` form) *is*
  the chronological order. A row with a known time sorts before a row without one: an undated
  row cannot be placed in time, and sources either date all rows or none, so this only matters
  for malformed mixes.
* **Dedupe** of repeated ``(user_id, item_id)`` keeps the earliest row in that same order, with
  its rating: a re-review or re-purchase is not a new item for a sequential recommender, and the
  first contact is the one that precedes everything the user did after it.
* **Labels**: ``rating IS NULL`` -> positive (implicit source); ``rating >= positive_min_rating`` ->
  positive (1); ``rating <= negative_max_rating`` -> explicit negative (0); ratings in between are
  dropped (``drop_neutral``).
* **k-core** is computed on positives only and iterated to a fixed point: a user needs
  ``user_k_core`` positives and an item ``item_k_core`` positives among the surviving rows.
  Negatives survive only where both their user and their item survive the positive core.
* **Leave-one-out** over positives: the last positive is ``test``, the second last ``valid``, the
  rest ``train``; ``seq_index`` numbers the user's positives 0.. in chronological order. A negative
  gets ``seq_index`` NULL and the split of the window it falls in: before the valid target ->
  ``train``, between the valid and the test target -> ``valid``, after the test target -> ``test``.
* ``max_history`` is *not* applied here: every surviving row is kept; consumers take the last
  ``max_history`` positives (``user_histories``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import duckdb
import pandas as pd

from srec.config import FilterSettings
from srec.db import ensure_tables, replace_partition

# Chronological order of a user's rows (and the dedupe preference): see the module docstring.
CHRONO_ORDER = "timestamp ASC NULLS LAST, position ASC, item_id ASC"
SPLITS = ("train", "valid", "test")
_NULL_TS = 9_223_372_036_854_775_807  # max BIGINT: a NULL timestamp sorts last in the dedupe key
_TWO_64 = 1 << 64

_T_DEDUP = "_srec_seq_dedup"
_T_POS = "_srec_seq_pos"
_T_NEG = "_srec_seq_neg"
_T_FINAL = "_srec_seq_final"
_TEMP_TABLES = (_T_DEDUP, _T_POS, _T_NEG, _T_FINAL)


@dataclass
class FunnelStep:
    step_order: int
    step: str
    rows_in: int
    dropped: int
    rows_out: int
    detail: str


@dataclass
class InteractionStats:
    category: str
    raw_rows: int          # raw_reviews rows of the category (first funnel rows_in)
    rows: int              # interactions rows written (last funnel rows_out)
    users: int
    items: int             # distinct items among the surviving positives (the item universe)
    positives: int
    negatives: int
    train: int             # rows (positives and negatives) per split
    valid: int
    test: int
    kcore_iterations: int  # k-core passes run, the last one (which removed nothing) included
    funnel: list[FunnelStep] = field(default_factory=list)
    seconds: float = 0.0


def _chrono_key(prefix: str = "") -> str:
    """A struct that compares like CHRONO_ORDER (struct comparison is lexicographic)."""
    return (
        f"{{'t': coalesce({prefix}timestamp, {_NULL_TS}), 'p': {prefix}position, 'i': {prefix}item_id}}"
    )


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> int:
    return int(con.execute(sql, params or []).fetchall()[0][0])


def _drop_temp(con: duckdb.DuckDBPyConnection) -> None:
    for t in _TEMP_TABLES:
        con.execute(f"DROP TABLE IF EXISTS {t}")


def build_interactions(
    con: duckdb.DuckDBPyConnection, category: str, settings: FilterSettings
) -> InteractionStats:
    """Write ``category``'s ``interactions`` and ``interactions_funnel`` rows from its ``raw_reviews``.

    Replaces the category's rows of both tables. Raises ``AssertionError`` if the funnel does not
    reconcile with the row counts it claims to describe.
    """
    if settings.user_k_core < 3:
        raise ValueError(
            f"user_k_core={settings.user_k_core}: leave-one-out needs at least 3 positives per user "
            "(train, valid and test)"
        )
    if settings.item_k_core < 1:
        raise ValueError(f"item_k_core={settings.item_k_core} must be >= 1")
    if settings.negative_max_rating >= settings.positive_min_rating:
        raise ValueError("negative_max_rating must be below positive_min_rating")
    t0 = time.perf_counter()
    ensure_tables(con, ["raw_reviews", "interactions", "interactions_funnel"])
    funnel: list[FunnelStep] = []

    def step(name: str, rows_in: int, rows_out: int, detail: str) -> None:
        funnel.append(FunnelStep(len(funnel) + 1, name, rows_in, rows_in - rows_out, rows_out, detail))

    try:
        _drop_temp(con)
        raw_rows, min_position = con.execute(
            "SELECT count(*), min(position) FROM raw_reviews WHERE category = ?", [category]
        ).fetchall()[0]
        if min_position is not None and min_position < 0:
            raise ValueError(f"raw_reviews for {category!r} has a negative position ({min_position})")

        # (a) dedupe (user, item): keep the earliest row, timestamp NULLS LAST, ties by position.
        # A grouped aggregate (spillable) over one HUGEINT sort key, timestamp * 2^64 + position
        # (NULL timestamp -> max BIGINT, i.e. last), decoded back afterwards. arg_min_null, not
        # arg_min: arg_min skips NULL ratings and would take a later row's rating.
        key = f"(coalesce(timestamp, {_NULL_TS})::HUGEINT * {_TWO_64} + position)"
        con.execute(
            f"""
            CREATE TEMP TABLE {_T_DEDUP} AS
            SELECT user_id, item_id, rating,
                   CASE WHEN (k >> 64) = {_NULL_TS} THEN NULL ELSE (k >> 64)::BIGINT END AS timestamp,
                   (k & {_TWO_64 - 1})::BIGINT AS position
            FROM (
                SELECT user_id, item_id, arg_min_null(rating, {key}) AS rating, min({key}) AS k
                FROM raw_reviews WHERE category = ?
                GROUP BY user_id, item_id
            )
            """,
            [category],
        )
        n_dedup = _count(con, f"SELECT count(*) FROM {_T_DEDUP}")
        step(
            "dedupe_user_item", raw_rows, n_dedup,
            "kept the earliest row per (user_id, item_id): timestamp ascending NULLS LAST, then position",
        )

        # (b) labels; neutral ratings dropped.
        pos_min, neg_max = float(settings.positive_min_rating), float(settings.negative_max_rating)
        con.execute(
            f"""
            CREATE TEMP TABLE {_T_POS} AS
            SELECT user_id, item_id, rating, timestamp, position FROM {_T_DEDUP}
            WHERE rating IS NULL OR rating >= ?
            """,
            [pos_min],
        )
        con.execute(
            f"""
            CREATE TEMP TABLE {_T_NEG} AS
            SELECT user_id, item_id, rating, timestamp, position FROM {_T_DEDUP}
            WHERE rating <= ?
            """,
            [neg_max],
        )
        con.execute(f"DROP TABLE {_T_DEDUP}")
        n_pos = _count(con, f"SELECT count(*) FROM {_T_POS}")
        n_implicit = _count(con, f"SELECT count(*) FROM {_T_POS} WHERE rating IS NULL")
        n_neg = _count(con, f"SELECT count(*) FROM {_T_NEG}")
        step(
            "drop_neutral", n_dedup, n_pos + n_neg,
            f"dropped ratings strictly between {neg_max:g} and {pos_min:g}; "
            f"positives {n_pos} (rating NULL {n_implicit}, rating >= {pos_min:g} {n_pos - n_implicit}), "
            f"explicit negatives (rating <= {neg_max:g}) {n_neg}",
        )

        # (c) iterative k-core on positives, to a fixed point.
        users_before, items_before = con.execute(
            f"SELECT count(DISTINCT user_id), count(DISTINCT item_id) FROM {_T_POS}"
        ).fetchall()[0]
        iterations, removed_per_pass = 0, []
        while True:
            iterations += 1
            removed = con.execute(
                f"""
                DELETE FROM {_T_POS}
                WHERE user_id IN (SELECT user_id FROM {_T_POS} GROUP BY user_id HAVING count(*) < ?)
                   OR item_id IN (SELECT item_id FROM {_T_POS} GROUP BY item_id HAVING count(*) < ?)
                """,
                [settings.user_k_core, settings.item_k_core],
            ).fetchall()[0][0]
            removed_per_pass.append(int(removed))
            if removed == 0:
                break
        n_core = _count(con, f"SELECT count(*) FROM {_T_POS}")
        users, items = (int(v) for v in con.execute(
            f"SELECT count(DISTINCT user_id), count(DISTINCT item_id) FROM {_T_POS}"
        ).fetchall()[0])
        step(
            "k_core", n_pos + n_neg, n_core + n_neg,
            f"positives only: users >= {settings.user_k_core} and items >= {settings.item_k_core} positives, "
            f"{iterations} passes (removed per pass {removed_per_pass}); "
            f"users {users_before} -> {users}, items {items_before} -> {items}",
        )

        # Negatives survive only for users and items of the positive core.
        con.execute(
            f"""
            DELETE FROM {_T_NEG}
            WHERE user_id NOT IN (SELECT DISTINCT user_id FROM {_T_POS})
               OR item_id NOT IN (SELECT DISTINCT item_id FROM {_T_POS})
            """
        )
        n_neg_kept = _count(con, f"SELECT count(*) FROM {_T_NEG}")
        step(
            "k_core_negatives", n_core + n_neg, n_core + n_neg_kept,
            f"explicit negatives kept only where both user and item survive the positive core: "
            f"{n_neg} -> {n_neg_kept}",
        )

        # (d) chronological order and (e) leave-one-out split. Positives are numbered by one window;
        # a negative's window is found by comparing its chronological key with the user's valid and
        # test targets' keys (struct comparison is lexicographic: timestamp NULLS LAST, position, item).
        con.execute(
            f"""
            CREATE TEMP TABLE {_T_FINAL} AS
            WITH p AS (
                SELECT user_id, item_id, rating, timestamp, position,
                       (row_number() OVER (PARTITION BY user_id ORDER BY {CHRONO_ORDER}) - 1)::INTEGER AS seq_index
                FROM {_T_POS}
            ),
            n AS (SELECT user_id, count(*) AS n_pos FROM {_T_POS} GROUP BY user_id),
            pp AS (
                SELECT p.*, CASE WHEN seq_index = n_pos - 1 THEN 'test'
                                 WHEN seq_index = n_pos - 2 THEN 'valid'
                                 ELSE 'train' END AS split
                FROM p JOIN n USING (user_id)
            ),
            t AS (
                SELECT user_id,
                       max({_chrono_key()}) FILTER (WHERE split = 'valid') AS valid_key,
                       max({_chrono_key()}) FILTER (WHERE split = 'test') AS test_key
                FROM pp WHERE split <> 'train' GROUP BY user_id
            )
            SELECT user_id, item_id, rating, timestamp, position, 1::TINYINT AS label, seq_index, split FROM pp
            UNION ALL
            SELECT g.user_id, g.item_id, g.rating, g.timestamp, g.position, 0::TINYINT AS label,
                   NULL::INTEGER AS seq_index,
                   CASE WHEN {_chrono_key("g.")} < t.valid_key THEN 'train'
                        WHEN {_chrono_key("g.")} < t.test_key THEN 'valid'
                        ELSE 'test' END AS split
            FROM {_T_NEG} g JOIN t USING (user_id)
            """
        )
        n_final = _count(con, f"SELECT count(*) FROM {_T_FINAL}")
        split_counts = dict(con.execute(f"SELECT split, count(*) FROM {_T_FINAL} GROUP BY split").fetchall())
        step(
            "leave_one_out_split", n_core + n_neg_kept, n_final,
            "per user, chronological: last positive test, second last valid, the rest train; negatives "
            "take the window they fall in; rows per split "
            + ", ".join(f"{s} {split_counts.get(s, 0)}" for s in SPLITS),
        )

        written = replace_partition(
            con, "interactions", category,
            f"""
            SELECT ?::VARCHAR AS category, user_id, item_id, rating, timestamp, position, label, seq_index, split
            FROM {_T_FINAL}
            """,
            [category],
        )
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(funnel))
        params: list = []
        for f in funnel:
            params += [category, f.step_order, f.step, f.rows_in, f.dropped, f.rows_out, f.detail]
        replace_partition(
            con, "interactions_funnel", category,
            f"""
            SELECT category, step_order::INTEGER AS step_order, step, rows_in::BIGINT AS rows_in,
                   dropped::BIGINT AS dropped, rows_out::BIGINT AS rows_out, detail
            FROM (VALUES {values}) v(category, step_order, step, rows_in, dropped, rows_out, detail)
            """,
            params,
        )
    finally:
        _drop_temp(con)

    # The funnel must account for every row, from raw_reviews to interactions.
    (n_raw_now,) = con.execute("SELECT count(*) FROM raw_reviews WHERE category = ?", [category]).fetchall()[0]
    chain_ok = all(f.rows_out == f.rows_in - f.dropped and f.dropped >= 0 for f in funnel) and all(
        a.rows_out == b.rows_in for a, b in zip(funnel, funnel[1:])
    )
    if not (chain_ok and funnel[0].rows_in == n_raw_now and funnel[-1].rows_out == written == n_final):
        raise AssertionError(
            f"interactions funnel for {category!r} does not reconcile: raw_reviews {n_raw_now}, "
            f"interactions {written}, funnel {funnel}"
        )

    positives, negatives = con.execute(
        "SELECT count(*) FILTER (WHERE label = 1), count(*) FILTER (WHERE label = 0) "
        "FROM interactions WHERE category = ?",
        [category],
    ).fetchall()[0]
    return InteractionStats(
        category=category,
        raw_rows=raw_rows,
        rows=written,
        users=users,
        items=items,
        positives=int(positives),
        negatives=int(negatives),
        train=int(split_counts.get("train", 0)),
        valid=int(split_counts.get("valid", 0)),
        test=int(split_counts.get("test", 0)),
        kcore_iterations=iterations,
        funnel=funnel,
        seconds=time.perf_counter() - t0,
    )


def user_histories(
    con: duckdb.DuckDBPyConnection, category: str, split: str, max_history: int
) -> pd.DataFrame:
    """One row per user with a ``split`` target: ``user_id, target_item_id, history``.

    ``history`` is the list of the user's positive item ids before the target, chronological
    (oldest first), cut to the last ``max_history``. For ``split='test'`` it includes the valid
    target. Rows are ordered by ``user_id``.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    if int(max_history) < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    df = con.execute(
        """
        WITH t AS (
            SELECT user_id, item_id AS target_item_id, seq_index AS t_idx
            FROM interactions WHERE category = ? AND label = 1 AND split = ?
        )
        SELECT t.user_id, t.target_item_id,
               coalesce(list(h.item_id ORDER BY h.seq_index) FILTER (WHERE h.item_id IS NOT NULL),
                        []::VARCHAR[]) AS history
        FROM t
        LEFT JOIN interactions h
          ON h.category = ? AND h.user_id = t.user_id AND h.label = 1
         AND h.seq_index < t.t_idx AND h.seq_index >= t.t_idx - ?
        GROUP BY t.user_id, t.target_item_id
        ORDER BY t.user_id
        """,
        [category, split, category, int(max_history)],
    ).fetch_df()
    df["history"] = [list(h) for h in df["history"]]
    return df.reset_index(drop=True)
