"""Classic baselines on the FULL shared Amazon Beauty 5-core split (22,363 users, 12,101 items).

    .venv/bin/python bench/beauty_baselines.py                      # build inputs, train, report
    .venv/bin/python bench/beauty_baselines.py --models sasrec --max-epochs 5   # a quick look

Inputs: ``build_inputs`` runs the project's own pipeline (srec.ingest -> srec.sequences ->
srec.candidates, exactly what the assets call) for category ``beauty_full`` declared in
bench/categories_full.yaml, into a DuckDB under bench/work/ (git-ignored); everything after it
reads only the tables.

Outputs: bench/results/beauty_baselines.json and .md (every metric, training time, epochs, machine).
Metrics here are computed from baseline_full_ranking / baseline_scores, expected values under random
tie-breaking; the project's metrics module adds bootstrap intervals.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import duckdb
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from srec.baselines import BaselineSettings, run_baselines  # noqa: E402
from srec.baselines.data import load_candidates, load_split_data  # noqa: E402
from srec.baselines.evaluate import evaluate_split  # noqa: E402
from srec.candidates import draw_eval_candidates  # noqa: E402
from srec.config import load_categories  # noqa: E402
from srec.ingest import ingest_items, ingest_reviews  # noqa: E402
from srec.metrics.core import per_user_metrics  # noqa: E402
from srec.sequences import build_interactions  # noqa: E402
from machine_info import cpu_model  # noqa: E402  (bench/ is on sys.path when run as a script)

CATEGORY = "beauty_full"
CATEGORIES_FULL = ROOT / "bench" / "categories_full.yaml"
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
KS = (5, 10, 20)

# S3-Rec (CIKM 2020) on this split, and popularity recomputed without leakage (shared/data/README.md).
REFERENCE = {
    "popularity (train+valid counts)": {"full_ranking": {"hr@10": 0.0137, "ndcg@10": 0.0061}},
    "popularity (leaky: all interactions, test included)": {"full_ranking": {"hr@10": 0.0152, "ndcg@10": 0.0068},
                                                             "1+99": {"hr@10": 0.3386, "ndcg@10": 0.1803}},
    "popularity (train counts only)": {"full_ranking": {"hr@10": 0.0114, "ndcg@10": 0.0054}},
    "gru4rec": {"full_ranking": {"hr@10": 0.0283, "ndcg@10": 0.0137}, "1+99": {"hr@10": 0.4106, "ndcg@10": 0.2584}},
    "sasrec": {"full_ranking": {"hr@10": 0.0605, "ndcg@10": 0.0318}, "1+99": {"hr@10": 0.4696, "ndcg@10": 0.3156}},
}


def build_inputs(con: duckdb.DuckDBPyConnection, category: str = CATEGORY) -> dict:
    """The project's own pipeline, as the assets run it: ingest -> interactions -> eval_candidates,
    for the category declared in bench/categories_full.yaml."""
    cfg = load_categories(extra=str(CATEGORIES_FULL))[category]
    reviews = ingest_reviews(con, cfg)
    items = ingest_items(con, cfg)
    inter = build_interactions(con, category, cfg.filtering)
    cands = draw_eval_candidates(con, category, seed=cfg.seed)
    return {"source": str(cfg.reviews.relative_to(ROOT.parent)), "builder": "srec pipeline (ingest, interactions, eval_candidates)",
            "seed": cfg.seed, "rows_read": reviews.rows_read, "rows_quarantined": sum(reviews.quarantined.values()),
            "items_read": items.rows_read, "users": inter.users, "items": inter.items, "positives": inter.positives,
            "candidate_rows": cands.rows}


def expected_metrics(g: np.ndarray, t: np.ndarray, n_neg: np.ndarray | None = None) -> dict[str, float]:
    """HR@k, NDCG@k, MRR (and AUC when n_neg is given), expected under random tie-breaking (srec.metrics.core)."""
    names = [f"HR@{k}" for k in KS] + [f"NDCG@{k}" for k in KS] + ["MRR"] + (["AUC"] if n_neg is not None else [])
    # n_negatives only matters for AUC; g + t + 1 is a valid stand-in otherwise.
    n = n_neg if n_neg is not None else g + t + 1
    return {name.lower(): float(v.mean()) for name, v in per_user_metrics(g, t, n, names).items()}


def metrics_from_tables(con, category: str) -> dict:
    """{model: {split: {protocol: metrics}}} from the stored baseline tables."""
    out: dict = {}
    full = con.execute(
        "SELECT model, split, n_greater, n_ties, n_negatives FROM baseline_full_ranking WHERE category = ?",
        [category]).df()
    for (model, split), df in full.groupby(["model", "split"]):
        m = expected_metrics(df["n_greater"].to_numpy(), df["n_ties"].to_numpy(), df["n_negatives"].to_numpy())
        m["n_users"] = len(df)
        out.setdefault(model, {}).setdefault(split, {})["full_ranking"] = m
    keys = con.execute("SELECT DISTINCT model, split, protocol FROM baseline_scores WHERE category = ?",
                       [category]).fetchall()
    for model, split, protocol in sorted(keys):
        scores = con.execute(
            """SELECT score FROM baseline_scores WHERE category = ? AND model = ? AND split = ? AND protocol = ?
               ORDER BY user_id, slot""", [category, model, split, protocol]).fetchnumpy()["score"]
        width = 1 + int(protocol.split("+")[1])
        s = np.asarray(scores).reshape(-1, width)
        m = expected_metrics((s[:, 1:] > s[:, :1]).sum(1), (s[:, 1:] == s[:, :1]).sum(1), np.full(len(s), width - 1))
        m["n_users"] = len(s)
        out.setdefault(model, {}).setdefault(split, {})[protocol] = m
    return out


def popularity_cross_checks(con, category: str) -> dict:
    """Test-split popularity with other count windows, computed apart from run_baselines (protocol check)."""
    data = load_split_data(con, category)
    cands = {p: load_candidates(con, category, "test", p, data) for p in ("1+20", "1+99")}
    n = data.n_items + 1
    train = np.bincount(np.concatenate(data.train), minlength=n)
    windows = {
        "popularity (leaky: all interactions, test included)":
            train + np.bincount(data.valid_target, minlength=n) + np.bincount(data.test_target, minlength=n),
        "popularity (train counts only)": train,
    }
    out = {}
    for label, counts in windows.items():
        c = torch.as_tensor(counts, dtype=torch.float32)
        r = evaluate_split(lambda split, rows, c=c: c.expand(len(rows), -1), data, "test", cands)
        res = {"full_ranking": expected_metrics(r.n_greater, r.n_ties, r.n_negatives)}
        for p, s in r.candidate_scores.items():
            res[p] = expected_metrics((s[:, 1:] > s[:, :1]).sum(1), (s[:, 1:] == s[:, :1]).sum(1),
                                      np.full(len(s), s.shape[1] - 1))
        out[label] = res
    return out


def machine(threads: int | None = None) -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform()}


def check_targets(metrics: dict) -> list[dict]:
    def get(model, protocol, metric):
        return metrics.get(model, {}).get("test", {}).get(protocol, {}).get(metric, float("nan"))

    checks = []  # only for the models this invocation ran
    for metric, ref in (("hr@10", 0.0137), ("ndcg@10", 0.0061)) if "popularity" in metrics else ():
        v = get("popularity", "full_ranking", metric)
        checks.append({"what": f"popularity test full-ranking {metric} within ±5% of {ref}", "value": v,
                       "passed": bool(abs(v - ref) <= 0.05 * ref)})
    for protocol, metric, ref in (("full_ranking", "hr@10", 0.060), ("full_ranking", "ndcg@10", 0.030),
                                  ("1+99", "hr@10", 0.45)) if "sasrec" in metrics else ():
        v = get("sasrec", protocol, metric)
        checks.append({"what": f"sasrec test {protocol} {metric} >= {ref}", "value": v, "passed": bool(v >= ref)})
    return checks


def _no_nan(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def write_report(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(_no_nan(result), indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Classic baselines on full Amazon Beauty 5-core",
        "",
        f"Generated by `bench/beauty_baselines.py` on {result['finished']}. Data: {result['inputs']['users']:,} users, "
        f"{result['n_items']:,} items ({result['inputs']['builder']}, seed {result['inputs']['seed']}).",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']} (torch threads: {m['torch_threads']}), "
        f"CUDA: {m['cuda'] or 'none'}.",
        "",
        "Test split unless noted. Full ranking = all items, the user's history excluded; sampled protocols = the "
        "stored candidates (1 positive + 20 or 99 negatives uniform over never-interacted items). Expected values "
        "under random tie-breaking.",
        "",
        "## Targets",
        "",
        "| check | value | passed |",
        "|---|---|---|",
    ]
    lines += [f"| {c['what']} | {c['value']:.4f} | {'yes' if c['passed'] else 'NO'} |" for c in result["checks"]]
    lines += ["", "## Training", "", "| model | epochs run | best epoch | best valid NDCG@10 | train seconds | device |",
              "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['model']} | {r['epochs_run']} | {r['best_epoch']} | {r['best_valid_ndcg10']:.4f} | "
                     f"{r['train_seconds']:.0f} | {r['device']} |")
    cols = ["hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr", "auc"]
    for split in ("test", "valid"):
        lines += ["", f"## Metrics, {split} split", "", "| model | protocol | " + " | ".join(cols) + " | users |",
                  "|---|---|" + "---|" * (len(cols) + 1)]
        for model, per_split in result["metrics"].items():
            for protocol, mm in per_split.get(split, {}).items():
                lines.append(f"| {model} | {protocol} | " + " | ".join(
                    f"{mm[c]:.4f}" if c in mm else "" for c in cols) + f" | {mm['n_users']} |")
    lines += ["", "## Popularity cross-checks (test split; computed apart from the stored tables)", "",
              "Only `popularity` above (train + valid counts) is a valid baseline. The leaky variant counts the test "
              "interactions themselves and is listed only to show the protocol reproduces the published PopRec row.",
              "", "| variant | protocol | HR@10 | NDCG@10 | reference HR@10 / NDCG@10 |", "|---|---|---|---|---|"]
    for label, res in result["popularity_cross_checks"].items():
        for protocol, mm in res.items():
            ref = REFERENCE.get(label, {}).get(protocol)
            ref_s = f"{ref['hr@10']} / {ref['ndcg@10']}" if ref else ""
            lines.append(f"| {label} | {protocol} | {mm['hr@10']:.4f} | {mm['ndcg@10']:.4f} | {ref_s} |")
    lines += ["", "## Published reference (S3-Rec, CIKM 2020; same split)", "",
              "| model | protocol | HR@10 | NDCG@10 |", "|---|---|---|---|"]
    for label, res in REFERENCE.items():
        for protocol, mm in res.items():
            lines.append(f"| {label} | {protocol} | {mm['hr@10']} | {mm['ndcg@10']} |")
    lines += ["", "## Settings", "", "```json", json.dumps(result["settings"], indent=2), "```", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=WORK / "beauty_full.duckdb")
    ap.add_argument("--category", default=CATEGORY)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the inputs even if the tables hold them")
    ap.add_argument("--existing-inputs", action="store_true",
                    help="never build: use interactions / eval_candidates already in --db (the pipeline's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "beauty_baselines", help="report stem (.json, .md)")
    for f in fields(BaselineSettings):
        if f.name == "models":
            ap.add_argument("--models", nargs="+", default=list(f.default))
        elif f.name == "torch_threads":
            ap.add_argument("--torch-threads", type=int, default=None)
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--render", type=Path, help="only re-render the .md of --out from this results JSON")
    args = ap.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        result["checks"] = check_targets(result["metrics"])
        write_report(result, args.out)
        return 0
    settings = BaselineSettings(**{f.name: getattr(args, f.name) for f in fields(BaselineSettings)})

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    args.db.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(args.db))
    category = args.category
    have = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'eval_candidates'").fetchone()[0]
    have = have and con.execute("SELECT count(*) FROM eval_candidates WHERE category = ?", [category]).fetchone()[0]
    if args.existing_inputs:
        if not have:
            raise SystemExit(f"{args.db} holds no eval_candidates for category {category!r}")
        inputs = {"source": str(args.db), "builder": "existing tables (e.g. the project's pipeline)",
                  "seed": None}
    elif args.rebuild or not have:
        t0 = time.perf_counter()
        inputs = build_inputs(con, category)
        inputs["build_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"built inputs: {inputs}")
    else:
        inputs = {"source": str(args.db), "builder": "srec pipeline (reused from an earlier run of this script)",
                  "seed": settings.seed}
    inputs["users"] = con.execute("SELECT count(DISTINCT user_id) FROM interactions WHERE category = ?",
                                  [category]).fetchone()[0]
    log(f"machine: {machine(settings.torch_threads)}")
    t0 = time.perf_counter()
    runs = run_baselines(con, category, settings, log=log, retrain=True)  # a benchmark trains: never keeps
    total = time.perf_counter() - t0
    metrics = metrics_from_tables(con, category)
    cross = popularity_cross_checks(con, category)
    n_items = con.execute("SELECT count(DISTINCT item_id) FROM interactions WHERE category = ?", [category]).fetchone()[0]
    result = {
        "category": category, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "inputs": inputs, "n_items": n_items,
        "machine": machine(settings.torch_threads), "settings": asdict(settings), "run_seconds_total": round(total, 1),
        "runs": [{k: v for k, v in r.items() if k != "quick"} for r in runs],
        "metrics": metrics, "popularity_cross_checks": cross, "reference": REFERENCE,
    }
    result["checks"] = check_targets(metrics)
    write_report(result, args.out)
    for c in result["checks"]:
        log(f"{'PASS' if c['passed'] else 'FAIL'} {c['what']}: {c['value']:.4f}")
    for label, res in cross.items():
        log(f"cross-check {label}: full ranking HR@10 {res['full_ranking']['hr@10']:.4f} "
            f"NDCG@10 {res['full_ranking']['ndcg@10']:.4f}")
    log(f"wrote {args.out.with_suffix('.json')} and .md")
    return 0 if all(c["passed"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
