"""Classic baselines: data loading, vectorised full ranking, popularity windows, training, table outputs."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch

from srec.baselines import BaselineSettings, Popularity, fit, full_ranking_counts, load_candidates, load_split_data
from srec.baselines import run_baselines
from srec.baselines.data import left_pad
from srec.baselines.evaluate import _hr_ndcg, evaluate_split
from tests.loo_tables import read_p5_sequences, write_loo_tables
from srec.baselines.run import OUTPUT_TABLES, baseline_key, popularity_scorer
from srec.baselines.train import build_model, sequence_loss
from srec.paths import SHARED_DATA_DIR

BEAUTY = SHARED_DATA_DIR / "amazon-beauty" / "user_sequence.txt"
BEAUTY_TITLES = SHARED_DATA_DIR / "amazon-beauty" / "item_titles.csv"
CAT = "beauty_cut"
FAST = dict(hidden_size=32, num_layers=1, max_epochs=1, patience=1, torch_threads=1, device="cpu")


def _beauty_cut_db(n_users: int):
    """``n_users`` real Beauty users (last item test, second last valid), seeded 1+20 / 1+99 candidates, their
    items' real titles in raw_items."""
    import pandas as pd

    from srec.db import ensure_tables

    seqs = read_p5_sequences(BEAUTY, limit_users=n_users)
    con = duckdb.connect()
    write_loo_tables(con, CAT, seqs, seed=7)
    titles = pd.read_csv(BEAUTY_TITLES, dtype=str)
    titles = titles[titles["item_id"].isin({i for s in seqs.values() for i in s})]
    ensure_tables(con, ["raw_items"])
    con.execute("INSERT INTO raw_items BY NAME SELECT ? AS category, item_id, title, 'item_titles.csv' AS source_file, "
                "row_number() OVER () + 1 AS source_line FROM titles", [CAT])
    # explicit negatives must be ignored by the baselines
    con.execute("""INSERT INTO interactions VALUES (?, ?, 'NEG-ITEM', 1.0, NULL, 999999, 0, NULL, 'train')""",
                [CAT, next(iter(seqs))])
    return con, seqs


@pytest.fixture(scope="module")
def beauty_cut():
    return _beauty_cut_db(300)


def test_load_split_data(beauty_cut):
    con, seqs = beauty_cut
    data = load_split_data(con, CAT)
    assert data.n_users == 300
    assert data.item_ids[0] == "" and "NEG-ITEM" in set(data.item_ids)  # in the vocabulary, never a positive
    for row, user in enumerate(data.user_ids):
        items = seqs[user]
        assert list(data.item_ids[data.train[row]]) == items[:-2]
        assert data.item_ids[data.valid_target[row]] == items[-2]
        assert data.item_ids[data.test_target[row]] == items[-1]
        assert list(data.item_ids[data.history("test")[row]]) == items[:-1]
    m = data.history_matrix("test", max_len=3)
    row = int(np.argmax([len(s) for s in data.train]))
    assert list(m[row]) == list(data.history("test")[row][-3:])  # most recent items, last column newest


def test_left_pad():
    m = left_pad([np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([4])], 2)
    assert m.tolist() == [[2, 3], [0, 0], [0, 4]]
    assert left_pad([np.array([5, 6])]).tolist() == [[5, 6]]


def test_load_candidates(beauty_cut):
    con, seqs = beauty_cut
    data = load_split_data(con, CAT)
    for split, protocol, k in (("valid", "1+20", 20), ("test", "1+99", 99)):
        users, items = load_candidates(con, CAT, split, protocol, data)
        assert items.shape == (300, k + 1) and (np.diff(users) > 0).all()
        assert (items[:, 0] == data.target(split)[users]).all()
        for u, row in zip(users, items):
            seen = set(seqs[data.user_ids[u]])
            negatives = set(data.item_ids[row[1:]])
            assert len(negatives) == k and not negatives & seen


def _naive_counts(scores, targets, history):
    out = []
    for s, t, h in zip(scores, targets, history):
        excluded = set(h.tolist()) | {0, int(t)}
        keep = np.array([i for i in range(len(s)) if i not in excluded])
        out.append(((s[keep] > s[t]).sum(), (s[keep] == s[t]).sum(), len(keep)))
    return np.array(out).T


def test_full_ranking_counts_match_naive_loop():
    rng = np.random.default_rng(0)
    b, n_items = 64, 300
    scores = rng.integers(0, 15, size=(b, n_items + 1)).astype(np.float32)  # many ties
    targets = rng.integers(1, n_items + 1, size=b)
    history = rng.integers(0, n_items + 1, size=(b, 25))  # padding and duplicates
    history[:5, 0] = targets[:5]                           # target inside the history
    got = full_ranking_counts(torch.as_tensor(scores), torch.as_tensor(targets), torch.as_tensor(history))
    want = _naive_counts(scores, targets, history)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w)


def test_history_items_are_excluded():
    n_items = 10
    scores = torch.arange(n_items + 1, dtype=torch.float32).repeat(2, 1)  # item i scores i
    targets = torch.tensor([5, 5])
    history = torch.tensor([[10, 9, 8, 0], [0, 0, 0, 0]])
    g, t, neg = full_ranking_counts(scores, targets, history)
    assert g.tolist() == [2, 5] and t.tolist() == [0, 0]
    assert neg.tolist() == [n_items - 3 - 1, n_items - 1]


def test_hr_ndcg():
    hr, ndcg = _hr_ndcg(np.array([0, 9, 10, 0, 8]), np.array([0, 0, 0, 1, 3]), 10)
    np.testing.assert_allclose(hr, [1, 1, 0, 1, 0.5])
    np.testing.assert_allclose(ndcg, [1, 1 / np.log2(11), 0, (1 + 1 / np.log2(3)) / 2,
                                      (1 / np.log2(10) + 1 / np.log2(11)) / 4])


@pytest.fixture()
def popularity_trap():
    """V is every user's valid target and X every test target, nowhere else: counting either leaks."""
    fillers = [f"F{i}" for i in range(20)]
    seqs = {f"u{i}": ["A", fillers[i], "V", "X"] for i in range(10)}
    seqs |= {f"w{i}": ["B", fillers[10 + i], "V", "X"] for i in range(10)}
    con = duckdb.connect()
    write_loo_tables(con, "trap", seqs, seed=1, protocols={"1+20": 20})
    return con


def test_popularity_windows_never_count_the_target_interactions(popularity_trap):
    con = popularity_trap
    data = load_split_data(con, "trap")
    pop = Popularity(data.n_items, data.train, data.valid_target)
    idx = dict(zip(data.item_ids, range(len(data.item_ids))))
    assert pop.counts["valid"][idx["V"]] == 0 and pop.counts["test"][idx["V"]] == 20  # valid counted for test only
    assert pop.counts["valid"][idx["X"]] == 0 and pop.counts["test"][idx["X"]] == 0   # test never counted
    scorer = popularity_scorer(pop, "cpu")
    for split in ("valid", "test"):
        r = evaluate_split(scorer, data, split)
        assert (r.n_greater >= 1).all()  # A or B (10 train interactions) outranks the 0-count target
    # leaking the test interactions would have put X first for everyone: the trap is real
    leaky = torch.as_tensor(pop.counts["test"].numpy() + np.bincount(data.test_target, minlength=data.n_items + 1))
    r = evaluate_split(lambda split, rows: leaky.expand(len(rows), -1), data, "test")
    assert (r.n_greater == 0).all()

    run_baselines(con, "trap", BaselineSettings(models=("popularity",), **FAST))
    stored = con.execute("""SELECT split, max(score) FROM baseline_scores
                            WHERE category = 'trap' AND slot = 0 GROUP BY split""").fetchall()
    assert dict(stored) == {"valid": 0.0, "test": 0.0}


def _chain_db(n_users=240, n_items=40, length=8, seed=0):
    """Easy synthetic pattern: every user walks item i -> i+1 -> i+2 ... (mod n_items)."""
    rng = np.random.default_rng(seed)
    seqs = {f"user{u:03d}": [f"item{(s + j) % n_items:02d}" for j in range(length)]
            for u, s in enumerate(rng.integers(0, n_items, n_users))}
    con = duckdb.connect()
    write_loo_tables(con, "chain", seqs, seed=seed, protocols={"1+20": 20})
    return con


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
def test_neural_models_learn_an_easy_pattern(model):
    con = _chain_db()
    s = BaselineSettings(models=(model,), hidden_size=32, num_layers=1, dropout=0.1, gru_dropout=0.1, lr=1e-2,
                         batch_size=32, max_epochs=8, patience=8, max_len=10, torch_threads=1, device="cpu")
    (summary,) = run_baselines(con, "chain", s)
    quick = summary["quick"]["test"]
    # random: HR@10 = 10/21 on 1+20 and about 10/33 over the 33 unseen items
    assert quick["1+20"]["hr@10"] > 0.9 and quick["1+20"]["ndcg@10"] > 0.6
    assert quick["full_ranking"]["hr@10"] > 0.8
    assert summary["best_valid_ndcg10"] > 0.5 and summary["epochs_run"] >= summary["best_epoch"] >= 1


def test_early_stopping_restores_the_best_epoch():
    con = _chain_db(n_users=60)
    data = load_split_data(con, "chain")
    s = BaselineSettings(hidden_size=16, num_layers=1, max_epochs=20, patience=2, lr=1e-2, max_len=10)
    model = build_model("sasrec", data.n_items, s)
    scripted = iter([0.1, 0.3, 0.2, 0.25, 0.9])
    snapshots = []

    def valid_fn(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scripted)

    r = fit(model, data, s, valid_fn)
    assert (r.epochs_run, r.best_epoch, r.best_valid_ndcg10) == (4, 2, 0.3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k])
    assert not torch.equal(model.item_emb.weight, snapshots[-1]["item_emb.weight"])


def test_bce_loss_option_trains():
    con = _chain_db(n_users=60)
    data = load_split_data(con, "chain")
    for name in ("sasrec", "gru4rec"):
        s = BaselineSettings(hidden_size=16, num_layers=1, max_epochs=2, patience=2, loss="bce", max_len=10)
        model = build_model(name, data.n_items, s)
        r = fit(model, data, s, lambda m: 0.0)
        assert r.epochs_run == 2 and all(np.isfinite(loss) for _, loss, _ in r.history)
    batch = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    loss = sequence_loss(model, batch[:, :-1], batch[:, 1:], "bce", torch.Generator().manual_seed(0))
    assert loss.item() > 0


def test_chunked_cross_entropy_matches_torch():
    torch.manual_seed(0)
    h = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (300,))
    from srec.baselines.train import _LinearCrossEntropy

    want = torch.nn.functional.cross_entropy(h @ w.T, y)
    got = _LinearCrossEntropy.apply(h, w, y, 64)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])):
        torch.testing.assert_close(a, b)


def test_outputs_land_in_the_tables(beauty_cut):
    con, seqs = beauty_cut
    from srec.db import ensure_tables

    ensure_tables(con, ["baseline_full_ranking"])
    con.execute("INSERT INTO baseline_full_ranking VALUES ('other', 'sasrec', 'test', 'u', 'i', 0, 0, 1)")
    summaries = run_baselines(con, CAT, BaselineSettings(**FAST))
    assert [s["model"] for s in summaries] == ["popularity", "sasrec", "gru4rec", "title_overlap"]
    assert all(s["n_users"] == 300 and s["device"] == "cpu" for s in summaries)
    rerun = run_baselines(con, CAT, BaselineSettings(models=("popularity",), **FAST))  # replaces, never appends
    assert len(rerun) == 1
    summaries = run_baselines(con, CAT, BaselineSettings(**FAST))

    n = lambda sql: con.execute(sql, [CAT]).fetchone()[0]  # noqa: E731
    assert n("SELECT count(*) FROM baseline_scores WHERE category = ?") == 4 * 300 * (21 + 100) * 2
    assert n("SELECT count(*) FROM baseline_full_ranking WHERE category = ?") == 4 * 300 * 2
    assert n("SELECT count(*) FROM baseline_runs WHERE category = ?") == 4
    # every stored candidate scored, exactly once per model
    n_cand = n("SELECT count(*) FROM eval_candidates WHERE category = ?")
    assert n("""SELECT count(*) FROM baseline_scores s JOIN eval_candidates c
                USING (category, split, protocol, user_id, slot, item_id) WHERE s.category = ?""") == 4 * n_cand
    assert n("""SELECT count(DISTINCT (model, split, protocol, user_id, slot)) FROM baseline_scores
                WHERE category = ?""") == 4 * n_cand
    assert con.execute("SELECT count(*) FROM baseline_full_ranking WHERE category = 'other'").fetchone()[0] == 1
    # one full-ranking row per user and split, target and n_negatives as the protocol says
    data = load_split_data(con, CAT)
    full = con.execute("""SELECT model, split, user_id, item_id, n_greater, n_ties, n_negatives
                          FROM baseline_full_ranking WHERE category = ?""", [CAT]).df()
    for (model, split), df in full.groupby(["model", "split"]):
        rows = data.user_index(df["user_id"].to_numpy())
        assert len(set(rows)) == 300
        assert (data.item_index(df["item_id"].to_numpy()) == data.target(split)[rows]).all()
        hist_len = np.array([len(h) for h in data.history(split)])[rows]
        assert (df["n_negatives"].to_numpy() == data.n_items - hist_len - 1).all()
        assert (df["n_greater"] + df["n_ties"] <= df["n_negatives"]).all()
    runs = con.execute("SELECT model, settings, epochs_run, best_epoch, best_valid_ndcg10, train_seconds, device "
                       "FROM baseline_runs WHERE category = ? ORDER BY model", [CAT]).fetchall()
    for model, settings, epochs, best, ndcg, secs, device in runs:
        assert json.loads(settings)["model"] == model and device == "cpu" and secs >= 0
        assert 0 <= best <= epochs and 0 <= ndcg <= 1


def test_unchanged_models_keep_their_stored_results():
    """A model whose input key is unchanged keeps its rows and the run that trained them; what changed trains."""
    con, _ = _beauty_cut_db(120)
    tables = lambda: {t: con.execute(f"SELECT * FROM {t} WHERE category = ? ORDER BY ALL", [CAT]).fetchall()  # noqa: E731
                      for t in OUTPUT_TABLES}
    kept = lambda runs: {r["model"]: r["kept"] for r in runs}  # noqa: E731
    logged = []
    first = run_baselines(con, CAT, BaselineSettings(**FAST), run_id="run-1", log=logged.append)
    assert not any(kept(first).values()) and f"{CAT} sasrec: training (no stored results)" in logged
    before, logged = tables(), []
    again = run_baselines(con, CAT, BaselineSettings(**FAST), log=logged.append, run_id="run-2")
    assert all(r["kept"] and r["trained_run_id"] == "run-1" and r["history"] == [] for r in again)
    assert [(r["epochs_run"], r["train_seconds"]) for r in again] == [(r["epochs_run"], r["train_seconds"]) for r in first]
    assert tables() == before  # not rewritten: trained_at too
    assert sum("kept the results trained in Dagster run run-1" in m for m in logged) == 4

    # A setting of one model: only it trains. The thread count is not a setting of the results.
    logged.clear()
    changed = run_baselines(con, CAT, BaselineSettings(**{**FAST, "gru_dropout": 0.2, "torch_threads": 2}),
                            log=logged.append)
    assert f"{CAT} gru4rec: training (its inputs, settings, device or code changed)" in logged
    assert kept(changed) == {"popularity": True, "sasrec": True, "gru4rec": False, "title_overlap": True}
    assert dict(con.execute("SELECT model, trained_run_id FROM baseline_runs WHERE category = ?", [CAT]).fetchall()
                ) == {"popularity": "run-1", "sasrec": "run-1", "gru4rec": None, "title_overlap": "run-1"}
    # A title: only title_overlap reads them.
    con.execute("UPDATE raw_items SET title = title || ' refill' WHERE category = ? AND item_id = "
                "(SELECT min(item_id) FROM raw_items WHERE category = ?)", [CAT, CAT])
    s = BaselineSettings(**{**FAST, "gru_dropout": 0.2})
    assert kept(run_baselines(con, CAT, s)) == {"popularity": True, "sasrec": True, "gru4rec": True,
                                                "title_overlap": False}
    # A stored row gone: that model's results are incomplete, it trains again (and its rows are whole again).
    n_pop = con.execute("SELECT count(*) FROM baseline_scores WHERE category = ? AND model = 'popularity'",
                        [CAT]).fetchone()[0]
    (deleted,) = con.execute("DELETE FROM baseline_scores WHERE category = ? AND model = 'popularity' AND slot = 0 "
                             "AND user_id = (SELECT min(user_id) FROM baseline_scores WHERE category = ?)",
                             [CAT, CAT]).fetchone()
    assert deleted == 4  # both splits, both protocols
    logged.clear()
    assert kept(run_baselines(con, CAT, s, log=logged.append))["popularity"] is False
    assert f"{CAT} popularity: training (its stored results are incomplete ({n_pop - 4:,} of {n_pop:,} candidate " \
           f"scores, 240 of 240 full-ranking rows))" in logged
    assert con.execute("SELECT count(*) FROM baseline_scores WHERE category = ? AND model = 'popularity'",
                       [CAT]).fetchone()[0] == n_pop
    # retrain: none kept; a model left out of the settings leaves the tables.
    # Rows written before srec recorded input keys (migrated: NULL) train once.
    con.execute("UPDATE baseline_runs SET input_key = NULL WHERE category = ? AND model = 'sasrec'", [CAT])
    logged.clear()
    assert kept(run_baselines(con, CAT, s, log=logged.append))["sasrec"] is False
    assert f"{CAT} sasrec: training (its stored results predate input keys)" in logged
    logged.clear()
    assert not any(kept(run_baselines(con, CAT, s, retrain=True, log=logged.append)).values())
    assert f"{CAT} sasrec: training (retrain: true)" in logged
    (only,) = run_baselines(con, CAT, BaselineSettings(**{**FAST, "models": ("sasrec",), "gru_dropout": 0.2}))
    assert only["kept"]
    for t in OUTPUT_TABLES:
        assert con.execute(f"SELECT DISTINCT model FROM {t} WHERE category = ?", [CAT]).fetchall() == [("sasrec",)]


def test_baseline_key_follows_what_each_model_reads():
    inputs = {"interactions": "i1", "eval_candidates": "c1", "titles": "t1"}
    s, cpu = BaselineSettings(**FAST), torch.device("cpu")
    for model in ("popularity", "sasrec", "title_overlap"):
        key = baseline_key(model, inputs, s, cpu)
        assert key != baseline_key(model, {**inputs, "interactions": "i2"}, s, cpu)
        assert key != baseline_key(model, {**inputs, "eval_candidates": "c2"}, s, cpu)
        reseeded = baseline_key(model, inputs, BaselineSettings(**{**FAST, "seed": 1}), cpu)
        assert (key != reseeded) == (model != "title_overlap")  # no training, nothing random
        assert key != baseline_key(model, inputs, s, torch.device("cuda"))
        assert key == baseline_key(model, inputs, BaselineSettings(**{**FAST, "eval_batch_users": 7}), cpu)
        assert (key != baseline_key(model, {**inputs, "titles": "t2"}, s, cpu)) == (model == "title_overlap")
    assert baseline_key("sasrec", inputs, s, cpu) != baseline_key("gru4rec", inputs, s, cpu)


def test_evaluate_split_matches_naive_per_user(beauty_cut):
    """Batching (users sorted by history length) must keep every result on its own user."""
    con, _ = beauty_cut
    data = load_split_data(con, CAT)
    table = torch.as_tensor(np.random.default_rng(3).integers(0, 50, (data.n_users, data.n_items + 1)),
                            dtype=torch.float32)
    cands = {p: load_candidates(con, CAT, "test", p, data) for p in ("1+20", "1+99")}
    r = evaluate_split(lambda split, rows: table[torch.as_tensor(rows)], data, "test", cands, batch_users=37)
    hist = data.history("test")
    want = _naive_counts(table.numpy(), data.test_target, [np.asarray(h) for h in hist])
    np.testing.assert_array_equal(np.stack([r.n_greater, r.n_ties, r.n_negatives]), want)
    for p, (users, items) in cands.items():
        np.testing.assert_array_equal(r.candidate_scores[p], table.numpy()[users[:, None], items])


def test_title_overlap_matches_a_plain_reading_of_its_rule(beauty_cut):
    """Every stored candidate's title_overlap score, recomputed per user with Python sets from the real titles:
    the summed 1 / log(2 + items with the word) over the words shared with the last 20 history titles."""
    import math
    import re

    con, seqs = beauty_cut
    run_baselines(con, CAT, BaselineSettings(models=("title_overlap",), **FAST))
    titles = dict(con.execute("SELECT item_id, title FROM raw_items WHERE category = ?", [CAT]).fetchall())
    items = {i for s in seqs.values() for i in s}
    words = {i: {w for w in re.findall(r"[^\W_]+", (titles.get(i) or "").lower()) if len(w) > 2} for i in items}
    df: dict[str, int] = {}
    for ws in words.values():
        for w in ws:
            df[w] = df.get(w, 0) + 1
    stored = con.execute("SELECT split, user_id, item_id, score FROM baseline_scores WHERE category = ? "
                         "AND model = 'title_overlap'", [CAT]).fetchall()
    assert len(stored) == 300 * (21 + 100) * 2
    for split, user, item, score in stored:
        seq = seqs[user]
        history = seq[:len(seq) - (1 if split == "test" else 2)][-20:]
        seen = set().union(*(words[h] for h in history))
        assert score == pytest.approx(sum(1 / math.log(2 + df[w]) for w in words[item] & seen), abs=1e-5)
    assert len({round(s, 6) for *_, s in stored}) > 50  # scores really vary
    untitled = duckdb.connect()  # the same users, no raw_items: an error, not a model of constant scores ...
    write_loo_tables(untitled, CAT, seqs, seed=7)
    logged: list[str] = []
    with pytest.raises(ValueError, match="title_overlap needs item titles"):
        run_baselines(untitled, CAT, BaselineSettings(models=("sasrec", "title_overlap"), **FAST), log=logged.append)
    assert not any("sasrec" in m for m in logged)  # ... raised before any training, not after it


def test_title_overlap_words_and_titles_without_any():
    from srec.baselines.models import TitleOverlap, title_words
    from srec_assets.assets.baselines import baseline_settings

    assert title_words("Crème Brûlée Lip_Balm, 2 oz") == {"crème", "brûlée", "lip", "balm"}
    with pytest.raises(ValueError, match="title_overlap needs item titles: no item's title has a word"):
        TitleOverlap([None, "TV", "Ö", None], 20)
    # A category without an items file has no titles: its default baselines leave title_overlap out.
    assert "title_overlap" not in baseline_settings({}, {}, max_len=50, seed=1, has_item_file=False).models
    assert "title_overlap" in baseline_settings({}, {}, max_len=50, seed=1).models
    named = baseline_settings({}, {"models": ["title_overlap"]}, max_len=50, seed=1, has_item_file=False)
    assert named.models == ("title_overlap",)

