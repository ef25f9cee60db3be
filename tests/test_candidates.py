"""draw_eval_candidates: determinism, nesting, exclusion of interacted items, uniformity, errors."""
from __future__ import annotations


import duckdb
import numpy as np
import pandas as pd
import pytest

from srec.candidates import draw_eval_candidates
from srec.config import FilterSettings
from srec.db import ensure_tables
from srec.sequences import build_interactions
from srec.paths import SHARED_DATA_DIR

BEAUTY = SHARED_DATA_DIR / "amazon-beauty" / "user_sequence.txt"
CAT = "beauty_cut"


def load_cut(con, category: str, n_users: int) -> None:
    users, items = [], []
    with open(BEAUTY) as f:
        for k, line in enumerate(f):
            if k == n_users:
                break
            parts = line.split()
            users += [parts[0]] * (len(parts) - 1)
            items += parts[1:]
    df = pd.DataFrame({"user_id": users, "item_id": items, "position": range(len(users))})
    ensure_tables(con)
    con.execute(
        "INSERT INTO raw_reviews SELECT ?, user_id, item_id, NULL, NULL, position, 'user_sequence.txt', position + 1 "
        "FROM df",
        [category],
    )
    build_interactions(con, category, FilterSettings(user_k_core=5, item_k_core=1))


def insert_interactions(con, category: str, seqs: dict[str, list[str]], negatives: dict[str, list[str]] | None = None):
    """Positives in the given order (last test, second last valid), plus explicit negatives (train window)."""
    rows = []
    pos = 0
    for u, items in seqs.items():
        n = len(items)
        for k, i in enumerate(items):
            split = "test" if k == n - 1 else "valid" if k == n - 2 else "train"
            rows.append((category, u, i, None, None, pos, 1, k, split))
            pos += 1
        for i in (negatives or {}).get(u, []):
            rows.append((category, u, i, 1.0, None, pos, 0, None, "train"))
            pos += 1
    df = pd.DataFrame(rows, columns=["category", "user_id", "item_id", "rating", "timestamp", "position", "label",
                                     "seq_index", "split"])
    df["timestamp"] = df["timestamp"].astype("Int64")
    df["seq_index"] = df["seq_index"].astype("Int64")
    df["rating"] = df["rating"].astype("float64")
    ensure_tables(con)
    con.execute("INSERT INTO interactions BY NAME SELECT * FROM df")


def candidates(con, category: str) -> pd.DataFrame:
    return con.execute(
        "SELECT split, protocol, user_id, slot, item_id, is_positive FROM eval_candidates WHERE category = ? "
        "ORDER BY user_id, split, protocol, slot",
        [category],
    ).fetch_df()


@pytest.fixture
def con():
    c = duckdb.connect()
    c.execute("SET enable_progress_bar = false")
    yield c
    c.close()


@pytest.fixture
def beauty(con):
    load_cut(con, CAT, 300)
    return con


def test_sets_are_well_formed_and_exclude_interacted_items(beauty):
    con = beauty
    stats = draw_eval_candidates(con, CAT, seed=7)
    df = candidates(con, CAT)
    n_users = con.execute("SELECT count(DISTINCT user_id) FROM interactions WHERE category = ?", [CAT]).fetchone()[0]
    assert stats.users == n_users == 300
    assert stats.rows == len(df) == n_users * 2 * (21 + 100)
    assert stats.sets == n_users * 2 * 2
    universe = {r[0] for r in con.execute(
        "SELECT DISTINCT item_id FROM interactions WHERE category = ? AND label = 1", [CAT]).fetchall()}
    assert stats.items == len(universe)
    inter = con.execute("SELECT user_id, item_id, split, label FROM interactions WHERE category = ?", [CAT]).fetch_df()
    seen = inter.groupby("user_id").item_id.agg(set).to_dict()
    targets = inter[inter.label == 1].set_index(["user_id", "split"]).item_id.to_dict()
    for (user, split, protocol), g in df.groupby(["user_id", "split", "protocol"]):
        k = {"1+20": 20, "1+99": 99}[protocol]
        assert g.slot.tolist() == list(range(k + 1))
        assert g.is_positive.tolist() == [True] + [False] * k
        assert g.item_id.iloc[0] == targets[(user, split)]
        negs = g.item_id.iloc[1:]
        assert negs.is_unique
        assert not (set(negs) & seen[user])
        assert set(negs) <= universe


def test_same_seed_same_sets_other_seed_other_sets(beauty):
    con = beauty
    draw_eval_candidates(con, CAT, seed=11)
    first = candidates(con, CAT)
    draw_eval_candidates(con, CAT, seed=11)
    again = candidates(con, CAT)
    pd.testing.assert_frame_equal(first, again)
    draw_eval_candidates(con, CAT, seed=12)
    other = candidates(con, CAT)
    assert (first.slot == other.slot).all() and (first.is_positive == other.is_positive).all()
    negs = ~first.is_positive
    assert (first.item_id[negs] != other.item_id[negs]).mean() > 0.9
    assert (first.item_id[~negs] == other.item_id[~negs]).all()  # targets do not depend on the seed


def test_protocols_are_nested(beauty):
    con = beauty
    draw_eval_candidates(con, CAT, seed=3)
    df = candidates(con, CAT)
    small = df[df.protocol == "1+20"].set_index(["user_id", "split", "slot"]).item_id
    big = df[(df.protocol == "1+99") & (df.slot <= 20)].set_index(["user_id", "split", "slot"]).item_id
    pd.testing.assert_series_equal(small.sort_index(), big.sort_index())


def test_valid_and_test_draws_differ_for_a_user(beauty):
    con = beauty
    draw_eval_candidates(con, CAT, seed=5)
    df = candidates(con, CAT)
    big = df[(df.protocol == "1+99") & ~df.is_positive]
    v = big[big.split == "valid"].groupby("user_id").item_id.apply(list)
    t = big[big.split == "test"].groupby("user_id").item_id.apply(list)
    assert (v != t).all()


def test_negatives_are_uniform_over_eligible_items(con):
    """400 users share the items i000..i004; the other 125 items (known through filler users) are
    eligible for all of them. Every eligible item should be drawn about equally often, in slot 1 and
    over whole sets; the shared items never."""
    items = [f"i{k:03d}" for k in range(130)]
    seqs = {f"u{k:03d}": items[:5] for k in range(400)}
    seqs |= {f"f{k:02d}": items[5 + 5 * k: 10 + 5 * k] for k in range(25)}
    insert_interactions(con, "uni", seqs)
    draw_eval_candidates(con, "uni", seed=2024)
    df = candidates(con, "uni")
    main = df[df.user_id.str.startswith("u") & ~df.is_positive & (df.protocol == "1+99")]
    assert not set(main.item_id) & set(items[:5])
    n_sets = 800
    # Whole sets: each item is in a set with probability p = 99/125 -> count ~ Binomial(800, p).
    counts = main.item_id.value_counts().reindex(items[5:], fill_value=0).to_numpy()
    p = 99 / 125
    chi2 = (((counts - n_sets * p) ** 2) / (n_sets * p * (1 - p))).sum()
    assert chi2 < 124 + 6 * np.sqrt(2 * 124), chi2
    # First slot: uniform over 125 items, 800 draws.
    first = main[main.slot == 1].item_id.value_counts().reindex(items[5:], fill_value=0).to_numpy()
    chi2_first = (((first - n_sets / 125) ** 2) / (n_sets / 125)).sum()
    assert chi2_first < 124 + 6 * np.sqrt(2 * 124), chi2_first


def test_explicit_negatives_are_never_drawn(con):
    items = [f"i{k:03d}" for k in range(130)]
    seqs = {f"u{k:02d}": items[5 * k: 5 * k + 5] for k in range(26)}
    # u00 rated 20 universe items low: they must never be its sampled negatives.
    disliked = items[30:50]
    insert_interactions(con, "negs", seqs, negatives={"u00": disliked})
    for seed in range(5):
        draw_eval_candidates(con, "negs", seed=seed)
        got = con.execute(
            "SELECT item_id FROM eval_candidates WHERE category = 'negs' AND user_id = 'u00' AND NOT is_positive"
        ).fetchall()
        assert len(got) == 2 * (20 + 99)
        assert not {g[0] for g in got} & (set(disliked) | set(items[:5]))


def test_too_few_eligible_items_is_a_clear_error(con):
    items = [f"i{k:03d}" for k in range(60)]
    seqs = {f"u{k:02d}": items[5 * k: 5 * k + 5] for k in range(12)}
    insert_interactions(con, "small", seqs)
    with pytest.raises(ValueError, match=r"user 'u00' has 55 eligible negative items \(item universe 60, "
                                         r"interacted 5\) but 99 are needed"):
        draw_eval_candidates(con, "small", seed=1)
    stats = draw_eval_candidates(con, "small", seed=1, negatives={"1+20": 20})  # 55 >= 20: fine
    assert stats.rows == 12 * 2 * 21
    assert not con.execute("SELECT count(*) FROM eval_candidates WHERE protocol = '1+99'").fetchone()[0]


def test_top_up_keeps_sets_exact_when_oversampling_falls_short(con):
    """Users who interacted with most of the universe force the exact top-up path."""
    items = [f"i{k:03d}" for k in range(111)]
    seqs = {"heavy": items[:8], "h2": items[8:16]}
    seqs |= {f"f{k:02d}": items[16 + 5 * k: 21 + 5 * k] for k in range(19)}
    insert_interactions(con, "top", seqs, negatives={"heavy": items[20:30]})
    stats = draw_eval_candidates(con, "top", seed=9, negatives={"1+90": 90})
    df = candidates(con, "top")
    for (user, split), g in df[~df.is_positive].groupby(["user_id", "split"]):
        assert len(g) == 90 and g.item_id.is_unique
    heavy = set(df[(df.user_id == "heavy") & ~df.is_positive].item_id)
    assert not heavy & set(items[:8] + items[20:30])
    assert stats.topped_up >= 0


def test_draw_block_top_up_path():
    """With no oversampling margin most rows run short and are topped up exactly."""
    from srec.candidates import _draw_block

    n_items, k = 50, 30
    user_items = {0: [1, 2, 3], 1: list(range(10, 25)), 2: [0]}
    keys = np.sort(np.array([u * n_items + i for u, its in user_items.items() for i in its], dtype=np.int64))
    offsets = np.concatenate([[0], np.cumsum([len(user_items[u]) for u in range(3)])])
    rows = np.array([0, 1, 2] * 20, dtype=np.int64)
    out, n_top = _draw_block(np.random.default_rng(0), rows, n_items, k, k, keys, offsets)
    assert n_top > 0 and out.shape == (60, k)
    for r, u in enumerate(rows):
        assert len(set(out[r])) == k and not set(out[r]) & set(user_items[u])
        assert out[r].min() >= 0 and out[r].max() < n_items


def test_missing_targets_are_an_error(con):
    ensure_tables(con)
    with pytest.raises(ValueError, match="no interactions"):
        draw_eval_candidates(con, "none", seed=1)
    items = [f"i{k:03d}" for k in range(130)]
    insert_interactions(con, "broken", {f"u{k:02d}": items[5 * k: 5 * k + 5] for k in range(26)})
    con.execute("DELETE FROM interactions WHERE category = 'broken' AND user_id = 'u03' AND split = 'test'")
    with pytest.raises(ValueError, match="user 'u03' does not have exactly one test positive"):
        draw_eval_candidates(con, "broken", seed=1)


def test_other_categories_untouched(beauty):
    con = beauty
    items = [f"i{k:03d}" for k in range(130)]
    insert_interactions(con, "other", {f"u{k:02d}": items[5 * k: 5 * k + 5] for k in range(26)})
    a = draw_eval_candidates(con, "other", seed=1)
    b = draw_eval_candidates(con, CAT, seed=1)
    b2 = draw_eval_candidates(con, CAT, seed=2)
    counts = dict(con.execute("SELECT category, count(*) FROM eval_candidates GROUP BY 1").fetchall())
    assert counts == {"other": a.rows, CAT: b.rows} and b.rows == b2.rows
    assert not [r for r in con.execute("SHOW TABLES").fetchall() if r[0].startswith("_srec")]
