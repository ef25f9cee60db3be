"""build_interactions / user_histories on real Beauty cuts and hand-made cases."""
from __future__ import annotations


import duckdb
import pandas as pd
import pytest

from srec.config import FilterSettings
from srec.db import ensure_tables
from srec.sequences import build_interactions, user_histories
from srec.paths import SHARED_DATA_DIR

BEAUTY = SHARED_DATA_DIR / "amazon-beauty" / "user_sequence.txt"

CAT = "beauty_cut"
LOOSE = FilterSettings(user_k_core=5, item_k_core=1)  # the cut keeps every user (all have >= 5 items)


def beauty_lines(n: int) -> list[list[str]]:
    out = []
    with open(BEAUTY) as f:
        for line in f:
            out.append(line.split())
            if len(out) == n:
                break
    return out


def insert_sequences(con, category: str, lines: list[list[str]]) -> None:
    """raw_reviews rows from 'USER ITEM ITEM ...' lines: rating and timestamp NULL, position running."""
    ensure_tables(con)
    users, items, src_lines = [], [], []
    for ln, parts in enumerate(lines, 1):
        users += [parts[0]] * (len(parts) - 1)
        items += parts[1:]
        src_lines += [ln] * (len(parts) - 1)
    df = pd.DataFrame({"user_id": users, "item_id": items, "position": range(len(users)), "source_line": src_lines})
    con.execute(
        "INSERT INTO raw_reviews SELECT ?, user_id, item_id, NULL, NULL, position, 'user_sequence.txt', source_line "
        "FROM df",
        [category],
    )


def insert_rows(con, category: str, rows: list[tuple]) -> None:
    """rows: (user, item, rating, timestamp, position)."""
    ensure_tables(con)
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp", "position"])
    df["rating"] = df["rating"].astype("float64")
    df["timestamp"] = df["timestamp"].astype("Int64")
    df["source_line"] = range(1, len(df) + 1)
    con.execute(
        "INSERT INTO raw_reviews SELECT ?, user_id, item_id, rating, timestamp, position, 'hand.json', source_line "
        "FROM df",
        [category],
    )


def interactions(con, category: str):
    return con.execute(
        "SELECT * FROM interactions WHERE category = ? ORDER BY user_id, position", [category]
    ).fetch_df()


@pytest.fixture
def con():
    c = duckdb.connect()
    c.execute("SET enable_progress_bar = false")
    ensure_tables(c)
    yield c
    c.close()


def test_real_cut_split_follows_sequence_order(con):
    lines = beauty_lines(200)
    insert_sequences(con, CAT, lines)
    stats = build_interactions(con, CAT, LOOSE)
    n_raw = sum(len(p) - 1 for p in lines)
    assert stats.raw_rows == n_raw == stats.rows == stats.positives
    assert stats.users == 200 and stats.negatives == 0
    assert stats.valid == stats.test == 200 and stats.train == n_raw - 400
    assert stats.kcore_iterations == 1
    df = interactions(con, CAT)
    for parts in lines:
        user, items = parts[0], parts[1:]
        u = df[df.user_id == user].sort_values("seq_index")
        assert u.item_id.tolist() == items
        assert u.seq_index.tolist() == list(range(len(items)))
        assert u.split.tolist() == ["train"] * (len(items) - 2) + ["valid", "test"]
    assert (df.label == 1).all() and df.rating.isna().all()
    # Funnel: first rows_in = raw count, chain consistent, last rows_out = interactions count.
    f = con.execute(
        "SELECT * FROM interactions_funnel WHERE category = ? ORDER BY step_order", [CAT]
    ).fetch_df()
    assert f.rows_in.iloc[0] == n_raw and f.rows_out.iloc[-1] == len(df)
    assert (f.rows_out == f.rows_in - f.dropped).all()
    assert (f.rows_in.iloc[1:].to_numpy() == f.rows_out.iloc[:-1].to_numpy()).all()
    assert [s.step for s in stats.funnel] == f.step.tolist()


def test_beauty_cut_with_five_core_removes_what_a_python_k_core_removes(con):
    lines = beauty_lines(400)
    insert_sequences(con, CAT, lines)
    stats = build_interactions(con, CAT, FilterSettings())  # 5/5 on a cut: most items fall below 5
    seqs = {p[0]: list(p[1:]) for p in lines}
    while True:  # reference k-core
        item_n: dict[str, int] = {}
        for items in seqs.values():
            for i in items:
                item_n[i] = item_n.get(i, 0) + 1
        new = {u: [i for i in items if item_n[i] >= 5] for u, items in seqs.items() if len(items) >= 5}
        new = {u: items for u, items in new.items() if items}
        if new == seqs:
            break
        seqs = new
    seqs = {u: items for u, items in seqs.items() if len(items) >= 5}
    df = interactions(con, CAT)
    got = {u: g.sort_values("seq_index").item_id.tolist() for u, g in df.groupby("user_id")}
    assert got == seqs
    assert stats.users == len(seqs) and stats.positives == sum(map(len, seqs.values()))
    assert stats.kcore_iterations >= 2


def test_dedupe_keeps_earliest_by_timestamp_then_position(con):
    rows = [
        # X: the later timestamp comes first in the source; the earlier (ts 50, a 1-star) wins -> negative.
        ("u", "X", 5.0, 100, 5), ("u", "X", 1.0, 50, 9),
        # Y: same timestamp, position breaks the tie: position 1 (5 stars) wins.
        ("u", "Y", 2.0, 70, 3), ("u", "Y", 5.0, 70, 1),
        # Z: a NULL timestamp sorts last, so the dated row wins even though it is later in the source.
        ("u", "Z", 1.0, None, 0), ("u", "Z", 5.0, 200, 10),
        ("u", "A", 5.0, 10, 2), ("u", "B", 4.0, 20, 4),
        # W: the earliest row has no rating (implicit positive); a later 1-star must not replace it.
        ("u", "W", None, 1, 30), ("u", "W", 1.0, 2, 31),
        ("v", "X", 5.0, 1, 20), ("v", "Y", 5.0, 2, 21), ("v", "Z", 5.0, 3, 22),
    ]
    insert_rows(con, "hand", rows)
    stats = build_interactions(con, "hand", FilterSettings(user_k_core=3, item_k_core=1))
    df = interactions(con, "hand").set_index(["user_id", "item_id"])
    assert df.loc[("u", "X"), ["rating", "timestamp", "position", "label"]].tolist() == [1.0, 50, 9, 0]
    assert df.loc[("u", "Y"), ["rating", "timestamp", "position", "label"]].tolist() == [5.0, 70, 1, 1]
    assert df.loc[("u", "Z"), ["rating", "timestamp", "position", "label"]].tolist() == [5.0, 200, 10, 1]
    w = df.loc[("u", "W")]
    assert pd.isna(w.rating) and (w.timestamp, w.position, w.label) == (1, 30, 1)
    assert stats.funnel[0].step == "dedupe_user_item" and stats.funnel[0].dropped == 4
    assert stats.funnel[0].rows_in == len(rows)
    # u's positives in time order: W(1), A(10), B(20), Y(70), Z(200); X is a negative at ts 50 (train window).
    u = df.loc["u"].sort_values("timestamp")
    assert u[u.label == 1].index.tolist() == ["W", "A", "B", "Y", "Z"]
    assert u.loc[["W", "A", "B", "Y", "Z"], "split"].tolist() == ["train", "train", "train", "valid", "test"]
    assert u.loc["X", "split"] == "train" and pd.isna(u.loc["X", "seq_index"])


@pytest.mark.parametrize(
    "rating,label",
    [(5.0, 1), (4.0, 1), (4.5, 1), (3.0, None), (3.5, None), (2.5, None), (2.0, 0), (1.0, 0), (None, 1)],
)
def test_label_thresholds(con, rating, label):
    rows = [("u", f"p{k}", 5.0, 10 * k, k) for k in range(3)] + [("u", "probe", rating, 100, 3)]
    rows += [("w", f"p{k}", 5.0, k, 10 + k) for k in range(3)] + [("w", "probe", 5.0, 5, 20)]
    insert_rows(con, "lab", rows)
    stats = build_interactions(con, "lab", FilterSettings(user_k_core=3, item_k_core=1))
    got = con.execute(
        "SELECT label FROM interactions WHERE category = 'lab' AND user_id = 'u' AND item_id = 'probe'"
    ).fetchall()
    neutral = stats.funnel[1]
    assert neutral.step == "drop_neutral"
    if label is None:
        assert got == [] and neutral.dropped == 1
    else:
        assert got == [(label,)] and neutral.dropped == 0


def test_kcore_iterates_to_a_fixed_point(con):
    """One simultaneous pass is not enough: removing item s strands users D and E, which strands
    item w, which strands users H and I. Only A, B, C x p, q, r survive (passes: 4 removing + 1 check)."""
    pos = [(u, i) for u in "ABC" for i in "pqr"]
    pos += [("D", "p"), ("D", "q"), ("D", "s"), ("E", "q"), ("E", "s"), ("E", "w")]
    pos += [("H", "w"), ("H", "p"), ("H", "q"), ("I", "w"), ("I", "r"), ("I", "p")]
    neg = [("D", "r", 1.0), ("A", "s", 1.0), ("A", "t", 2.0)]  # removed user / removed item / item with no positives
    rows = [(u, i, 5.0, None, k) for k, (u, i) in enumerate(pos)]
    rows += [(u, i, r, None, 100 + k) for k, (u, i, r) in enumerate(neg)]
    insert_rows(con, "kc", rows)
    stats = build_interactions(con, "kc", FilterSettings(user_k_core=3, item_k_core=3))
    df = interactions(con, "kc")
    assert sorted(zip(df.user_id, df.item_id)) == sorted((u, i) for u in "ABC" for i in "pqr")
    assert stats.kcore_iterations == 5
    assert stats.users == 3 and stats.items == 3 and stats.positives == 9 and stats.negatives == 0
    steps = {f.step: f for f in stats.funnel}
    assert steps["k_core"].dropped == len(pos) - 9
    assert steps["k_core_negatives"].dropped == 3


def test_negatives_fall_in_the_window_of_their_time(con):
    # u's positives at t=10..50 (inserted out of time order: chronology is timestamp first).
    rows = [("u", "a", 5.0, 30, 0), ("u", "b", 5.0, 10, 1), ("u", "c", 4.0, 50, 2), ("u", "d", 5.0, 20, 3),
            ("u", "e", 5.0, 40, 4)]
    # negatives: t=5 and 25 -> train; t=40 after the valid target (same time, later position) and 45 -> valid;
    # t=60 -> test. Their items are positives of other users (negatives need core items).
    negs = [("u", "n1", 1.0, 5, 10), ("u", "n2", 2.0, 25, 11), ("u", "n3", 1.0, 40, 12), ("u", "n4", 1.0, 45, 13),
            ("u", "n5", 2.0, 60, 14)]
    others = [(f"o{k}", f"n{j}", 5.0, 1, 100 + 10 * k + j) for k in range(3) for j in range(1, 6)]
    insert_rows(con, "win", rows + negs + others)
    build_interactions(con, "win", FilterSettings(user_k_core=3, item_k_core=1))
    u = interactions(con, "win").query("user_id == 'u'").set_index("item_id")
    assert u.loc[list("bdaec"), "seq_index"].tolist() == [0, 1, 2, 3, 4]
    assert u.loc[list("bdaec"), "split"].tolist() == ["train", "train", "train", "valid", "test"]
    assert u.loc[["n1", "n2", "n3", "n4", "n5"], "split"].tolist() == ["train", "train", "valid", "valid", "test"]
    assert u.loc[["n1", "n2", "n3", "n4", "n5"], "seq_index"].isna().all()
    assert (u.loc[["n1", "n2", "n3", "n4", "n5"], "label"] == 0).all()


def test_rebuild_replaces_only_its_category(con):
    lines = beauty_lines(60)
    insert_sequences(con, "one", lines[:30])
    insert_sequences(con, "two", lines[30:])
    build_interactions(con, "one", LOOSE)
    s2 = build_interactions(con, "two", LOOSE)
    s1 = build_interactions(con, "one", LOOSE)
    counts = dict(con.execute("SELECT category, count(*) FROM interactions GROUP BY 1").fetchall())
    assert counts == {"one": s1.rows, "two": s2.rows}
    funnel = dict(con.execute("SELECT category, count(*) FROM interactions_funnel GROUP BY 1").fetchall())
    assert funnel == {"one": len(s1.funnel), "two": len(s2.funnel)}
    assert not [r for r in con.execute("SHOW TABLES").fetchall() if r[0].startswith("_srec")]


def test_user_histories_cut_to_max_history_and_chronological(con):
    lines = beauty_lines(50)
    insert_sequences(con, CAT, lines)
    build_interactions(con, CAT, LOOSE)
    seqs = {p[0]: p[1:] for p in lines}
    for split, max_history in [("test", 3), ("valid", 3), ("test", 1000)]:
        h = user_histories(con, CAT, split, max_history)
        assert list(h.columns) == ["user_id", "target_item_id", "history"]
        assert h.user_id.tolist() == sorted(seqs)
        for row in h.itertuples():
            items = seqs[row.user_id]
            t = len(items) - (1 if split == "test" else 2)
            assert row.target_item_id == items[t]
            assert row.history == items[:t][-max_history:]
            assert isinstance(row.history, list)
    with pytest.raises(ValueError):
        user_histories(con, CAT, "train", 5)


def test_empty_category_and_bad_settings(con):
    stats = build_interactions(con, "nothing", FilterSettings())
    assert stats.rows == 0 and stats.raw_rows == 0 and all(f.rows_in == 0 for f in stats.funnel)
    with pytest.raises(ValueError, match="user_k_core"):
        build_interactions(con, "nothing", FilterSettings(user_k_core=2))
