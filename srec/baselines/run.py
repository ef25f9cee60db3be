"""Train every baseline of a category, score both splits, write baseline_scores / _full_ranking / _runs."""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import duckdb
import numpy as np
import pandas as pd
import torch

from srec.baselines.data import SPLITS, SplitData, load_candidates, load_split_data
from srec.baselines.evaluate import SplitResult, evaluate_split, valid_ndcg
from srec.baselines.models import Popularity, TitleOverlap
from srec.baselines.train import BaselineSettings, build_model, fit, seed_everything
from srec.db import ensure_tables, partition_content_hash, run_key, table_exists
from srec.tables import PROTOCOLS_SAMPLED

OUTPUT_TABLES = ("baseline_scores", "baseline_full_ranking", "baseline_runs")
# The results a model's stored rows hold depend on this code: bump it when a change to training, scoring or the
# tables changes them. It is baseline_scores' code_version and part of every model's input key, so stored results
# from before such a change are not kept.
BASELINE_CODE_VERSION = "1"


@contextlib.contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_scorer(model: torch.nn.Module, data: SplitData, max_len: int, device) -> Callable:
    """scorer(split, rows) for a sequence model: its scores after the last ``max_len`` history items."""
    inputs = {split: torch.as_tensor(data.history_matrix(split, max_len)) for split in SPLITS}
    lengths = {split: (m != 0).sum(1) for split, m in inputs.items()}

    def score(split: str, rows: np.ndarray) -> torch.Tensor:
        width = max(int(lengths[split][rows].max()), 1)
        return model.score_all(inputs[split][rows][:, -width:].to(device))

    return score


def popularity_scorer(pop: Popularity, device) -> Callable:
    pop.counts = {split: c.to(device) for split, c in pop.counts.items()}
    return lambda split, rows: pop.score_all(split, len(rows))


def item_titles(con: duckdb.DuckDBPyConnection, category: str, data: SplitData) -> list[str | None]:
    """Titles by item index (index 0, padding: None), from the category's raw_items (none when it has no table;
    ``TitleOverlap`` refuses titles without a single word)."""
    titles = dict(con.execute("SELECT item_id, any_value(title) FROM raw_items WHERE category = ? AND title IS NOT "
                              "NULL AND trim(title) <> '' GROUP BY item_id", [category]).fetchall()
                  ) if table_exists(con, "raw_items") else {}
    return [None] + [titles.get(str(i)) for i in data.item_ids[1:]]


def title_overlap_model(con, category: str, data: SplitData, s: BaselineSettings, log) -> TitleOverlap:
    titles = item_titles(con, category, data)
    log(f"{category} title_overlap: {sum(t is None for t in titles[1:])} of {data.n_items} items have no title "
        "(they share no words with anything: score 0)")
    return TitleOverlap(titles, s.title_history)


def baseline_inputs(con: duckdb.DuckDBPyConnection, category: str) -> dict[str, str]:
    """Content hashes of what the baselines read: the interactions (histories, targets), the stored candidates
    and, for title_overlap only, the items' titles."""
    inputs = {"interactions": partition_content_hash(con, "interactions", category),
              "eval_candidates": partition_content_hash(con, "eval_candidates", category)}
    if table_exists(con, "raw_items"):
        inputs["titles"] = partition_content_hash(con, "raw_items", category, ["item_id", "title"])
    return inputs


def baseline_key(model: str, inputs: dict[str, str], settings: BaselineSettings, device: torch.device) -> str:
    """Everything one model's stored results depend on: the inputs it reads, its settings (seed included), the
    device type and torch version (seeded training repeats only on the same kind of device and kernels) and this
    code. Not the thread count or the evaluation batch size."""
    used = {k: v for k, v in inputs.items() if k != "titles" or model == "title_overlap"}
    return run_key({"code": BASELINE_CODE_VERSION, "model": model, "inputs": used,
                    "settings": settings.model_settings(model), "device": device.type, "torch": torch.__version__})


def expected_rows(data: SplitData, candidates) -> tuple[int, int]:
    """(baseline_scores rows, baseline_full_ranking rows) one model writes for these users and candidates."""
    scores = sum(items.size for per_split in candidates.values() for _, items in per_split.values())
    return scores, data.n_users * len(SPLITS)


def kept_runs(con: duckdb.DuckDBPyConnection, category: str, keys: dict[str, str],
              rows: tuple[int, int]) -> tuple[dict[str, dict], dict[str, str]]:
    """(kept, why not): the stored baseline_runs rows, by model, whose input key equals ``keys[model]`` and whose
    scores and full-ranking rows are all still stored (results that training again would only repeat), and for
    every other model of ``keys`` why it must train."""
    ensure_tables(con, OUTPUT_TABLES)
    runs = con.execute(
        """SELECT r.*, (SELECT count(*) FROM baseline_scores s WHERE s.category = r.category AND s.model = r.model)
                       AS n_scores,
                      (SELECT count(*) FROM baseline_full_ranking f WHERE f.category = r.category
                                                                     AND f.model = r.model) AS n_full
           FROM baseline_runs r WHERE r.category = ?""", [category]).df()
    stored = {run["model"]: run for run in runs.to_dict("records")}
    kept, why = {}, {}
    for model, key in keys.items():
        run = stored.get(model)
        have = None if run is None else (int(run["n_scores"]), int(run["n_full"]))
        if run is None:
            why[model] = "no stored results"
        elif pd.isna(run["input_key"]):
            why[model] = "its stored results predate input keys"
        elif run["input_key"] != key:
            why[model] = "its inputs, settings, device or code changed"
        elif have != rows:
            why[model] = (f"its stored results are incomplete ({have[0]:,} of {rows[0]:,} candidate scores, "
                          f"{have[1]:,} of {rows[1]:,} full-ranking rows)")
        else:
            kept[model] = run
    return kept, why


def run_baselines(
    con: duckdb.DuckDBPyConnection,
    category: str,
    settings: BaselineSettings | None = None,
    log: Callable[[str], None] | None = None,
    *,
    retrain: bool = False,
    run_id: str | None = None,
) -> list[dict]:
    """Train ``settings.models`` on ``category``, score valid and test on every stored protocol and by full
    ranking, and replace the category's rows of baseline_scores, baseline_full_ranking and baseline_runs.

    A model whose input key (``baseline_key``) equals its stored run's, with all of its rows still stored, keeps
    them instead of training again (``retrain`` trains every model regardless). ``run_id`` (the Dagster run) is
    recorded on the rows this call trains.

    Returns one summary per model: model, kept, trained_run_id, epochs_run, best_epoch, best_valid_ndcg10,
    train_seconds (of the run that trained it), device, n_users, settings, ``history`` ([(epoch, mean train loss,
    valid NDCG@10 or nan)]; empty when kept) and ``quick`` (tie-aware expected HR@10 / NDCG@10 per split and
    protocol, for logs; None when kept; the reported metrics come from the metrics module reading the tables).
    """
    s = settings or BaselineSettings()
    log = log or (lambda _msg: None)
    device = s.resolved_device()
    data = load_split_data(con, category)
    candidates = {
        split: {p: load_candidates(con, category, split, p, data) for p in PROTOCOLS_SAMPLED} for split in SPLITS
    }
    for split in SPLITS:
        for p, (users, _) in candidates[split].items():
            if not len(users):
                log(f"{category}: no stored {split} candidates for protocol {p}; only full ranking for that one")
    log(f"{category}: {data.n_users} users, {data.n_items} items, device {device}")
    inputs = baseline_inputs(con, category)
    keys = {name: baseline_key(name, inputs, s, device) for name in s.models}
    if retrain:
        kept, why = {}, dict.fromkeys(keys, "retrain: true")
    else:
        kept, why = kept_runs(con, category, keys, expected_rows(data, candidates))

    # Before any training: a category without usable titles fails here, not after the neural baselines' epochs.
    text_model = (title_overlap_model(con, category, data, s, log)
                  if "title_overlap" in s.models and "title_overlap" not in kept else None)
    results: dict[str, dict[str, SplitResult]] = {}
    summaries = []
    with _torch_threads(s.torch_threads):
        for name in s.models:
            if name in kept:
                run = kept[name]
                trained_by = None if pd.isna(run["trained_run_id"]) else run["trained_run_id"]
                log(f"{category} {name}: kept the results trained " + (f"in Dagster run {trained_by}" if trained_by
                    else "outside Dagster") + " (its inputs, settings, device and code are unchanged; retrain: "
                    "true trains it again)")
                summaries.append(dict(
                    model=name, kept=True, trained_run_id=trained_by, epochs_run=int(run["epochs_run"]),
                    best_epoch=int(run["best_epoch"]), best_valid_ndcg10=run["best_valid_ndcg10"],
                    train_seconds=float(run["train_seconds"]), history=[], device=run["device"],
                    n_users=data.n_users, settings=json.loads(run["settings"]), quick=None))
                continue
            log(f"{category} {name}: training ({why[name]})")
            seed_everything(s.seed)
            t0 = time.perf_counter()
            if name in ("popularity", "title_overlap"):  # nothing to train
                scorer = (popularity_scorer(Popularity(data.n_items, data.train, data.valid_target), device)
                          if name == "popularity" else
                          model_scorer(text_model.to(device), data, s.title_history, device))
                best = valid_ndcg(scorer, data, batch_users=s.eval_batch_users, device=device)
                fitted = dict(epochs_run=0, best_epoch=0, best_valid_ndcg10=best,
                              train_seconds=time.perf_counter() - t0, history=[])
            else:
                model = build_model(name, data.n_items, s)
                scorer = model_scorer(model, data, s.max_len, device)

                def valid_fn(_model, name=name, scorer=scorer) -> float:
                    quick = evaluate_split(scorer, data, "valid", candidates["valid"], s.eval_batch_users,
                                           device).quick(10)
                    log(f"{name} valid: " + ", ".join(
                        f"{p} hr@10 {q['hr@10']:.4f} ndcg@10 {q['ndcg@10']:.4f}" for p, q in quick.items()))
                    return quick["full_ranking"]["ndcg@10"]

                fr = fit(model, data, s, valid_fn, device, log, name)
                fitted = dict(epochs_run=fr.epochs_run, best_epoch=fr.best_epoch,
                              best_valid_ndcg10=fr.best_valid_ndcg10, train_seconds=fr.train_seconds,
                              history=fr.history)
            results[name] = {
                split: evaluate_split(scorer, data, split, candidates[split], s.eval_batch_users, device)
                for split in SPLITS
            }
            summary = dict(model=name, kept=False, trained_run_id=run_id, **fitted, device=str(device),
                           n_users=data.n_users, settings=s.model_settings(name), input_key=keys[name],
                           quick={split: r.quick(10) for split, r in results[name].items()})
            log(f"{category} {name}: {json.dumps(summary['quick'])}")
            summaries.append(summary)
    write_results(con, category, data, candidates, results, [r for r in summaries if not r["kept"]], kept=set(kept))
    return summaries


def write_results(con, category: str, data: SplitData, candidates, results, summaries,
                  kept: set[str] = frozenset()) -> dict[str, int]:
    """Replace the category's rows of the three output tables, but those of the ``kept`` models, by ``results``
    and the ``summaries`` of the models trained now, in one transaction. Returns rows per table."""
    ensure_tables(con, OUTPUT_TABLES)
    trained_at = time.time()
    users = pd.DataFrame({"user_row": np.arange(data.n_users, dtype=np.int64), "user_id": data.user_ids.astype(str)})
    items = pd.DataFrame({"item_idx": np.arange(data.n_items + 1, dtype=np.int64), "item_id": data.item_ids.astype(str)})
    runs = pd.DataFrame({
        "category": category,
        "model": [r["model"] for r in summaries],
        "settings": [json.dumps(r["settings"], sort_keys=True) for r in summaries],
        "epochs_run": [int(r["epochs_run"]) for r in summaries],
        "best_epoch": [int(r["best_epoch"]) for r in summaries],
        "best_valid_ndcg10": [float(r["best_valid_ndcg10"]) for r in summaries],
        "train_seconds": [float(r["train_seconds"]) for r in summaries],
        "device": [r["device"] for r in summaries],
        "input_key": [r.get("input_key") for r in summaries],
        "trained_run_id": [r.get("trained_run_id") for r in summaries],
        "trained_at": trained_at,
    })
    con.register("_bl_users", users)
    con.register("_bl_items", items)
    con.register("_bl_runs", runs)
    con.execute("BEGIN TRANSACTION")
    try:
        for table in OUTPUT_TABLES:  # models no longer asked for go too
            con.execute(f"DELETE FROM {table} WHERE category = ? AND model NOT IN (SELECT unnest(?::VARCHAR[]))",
                        [category, sorted(kept)])
        con.execute("INSERT INTO baseline_runs BY NAME SELECT * FROM _bl_runs")
        for model, per_split in results.items():
            for split, r in per_split.items():
                full = pd.DataFrame({
                    "user_row": np.arange(data.n_users, dtype=np.int64),
                    "item_idx": data.target(split),
                    "n_greater": r.n_greater, "n_ties": r.n_ties, "n_negatives": r.n_negatives,
                })
                con.register("_bl_frame", full)
                con.execute(
                    """INSERT INTO baseline_full_ranking BY NAME
                       SELECT ? AS category, ? AS model, ? AS split, u.user_id, i.item_id,
                              f.n_greater, f.n_ties, f.n_negatives
                       FROM _bl_frame f JOIN _bl_users u USING (user_row) JOIN _bl_items i USING (item_idx)""",
                    [category, model, split],
                )
                for protocol, scores in r.candidate_scores.items():
                    user_rows, cand_items = candidates[split][protocol]
                    n, width = cand_items.shape
                    frame = pd.DataFrame({
                        "user_row": np.repeat(user_rows, width),
                        "slot": np.tile(np.arange(width, dtype=np.int32), n),
                        "item_idx": cand_items.reshape(-1),
                        "score": scores.reshape(-1),
                    })
                    con.register("_bl_frame", frame)
                    con.execute(
                        """INSERT INTO baseline_scores BY NAME
                           SELECT ? AS category, ? AS model, ? AS split, ? AS protocol, u.user_id, f.slot,
                                  i.item_id, f.score
                           FROM _bl_frame f JOIN _bl_users u USING (user_row) JOIN _bl_items i USING (item_idx)""",
                        [category, model, split, protocol],
                    )
        counts = {
            t: int(con.execute(f"SELECT count(*) FROM {t} WHERE category = ?", [category]).fetchone()[0])
            for t in OUTPUT_TABLES
        }
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        for view in ("_bl_users", "_bl_items", "_bl_runs", "_bl_frame"):
            with contextlib.suppress(Exception):
                con.unregister(view)
    return counts
