"""Ingest -> interactions -> eval candidates on a synthetic Amazon-2018 reviews file: srec vs pandas.

    .venv/bin/python bench/ingest_bench.py                          # 1,000,000 lines
    .venv/bin/python bench/ingest_bench.py --lines 1000000,4000000  # and the per-row cost 4M vs 1M

The file (git-ignored, under bench/work/, reused when it exists) is SYNTHETIC, in the Amazon 2018
review format: ~N/8 users and ~N/40 items, both with skewed (Zipf-like) activity / popularity,
Amazon-like ratings (mostly 5s), timestamps 2005-2018, review texts of realistic, long-tailed
length, some exact duplicate lines and re-reviews, and a few malformed lines of each kind
(not JSON, blank, not UTF-8, rating "five", rating 0, no reviewerID, no timestamp).

Each pipeline runs in a fresh subprocess so its peak RSS (``ru_maxrss`` of that child, from
``os.wait4``) is its own:

* ``srec``: ``srec.ingest.ingest_reviews`` -> ``srec.sequences.build_interactions`` ->
  ``srec.candidates.draw_eval_candidates``, into a DuckDB file with the settings of the project's
  storage resource (memory_limit 1500MB, 2 threads, a temp directory to spill to).
* ``pandas``: the straightforward in-memory version of the same steps. ``pd.read_json(lines=True)``
  itself aborts on the first malformed line, so the file is parsed the way read_json does it
  internally (one ``json.loads`` per line into a list of records -> DataFrame), skipping lines
  that do not parse; then validity filters, ``drop_duplicates``, rating thresholds, iterative
  k-core with ``groupby``, sort + ``cumcount`` leave-one-out split, per-user negative sampling.
  It keeps its results in memory (the srec pipeline writes every table to disk).

Both must end with the same row counts (checked and reported). Results:
bench/results/ingest_bench.json and bench/results/ingest_bench.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine_info import machine_info  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

CATEGORY = "ingest_bench"
TS_MIN = 631_152_000      # 1990-01-01: same validity window as srec.ingest
DUCKDB_CONFIG = {"memory_limit": "1500MB", "threads": 2, "preserve_insertion_order": True}  # as resources.storage


# ------------------------------------------------------------------------------------ the data

def _ids(rng, n: int, prefix: str, width: int) -> list[str]:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out, seen = [], set()
    while len(out) < n:
        for v in rng.integers(0, 36**width, size=n - len(out) + 16, dtype="int64").tolist():
            s = []
            for _ in range(width):
                v, r = divmod(v, 36)
                s.append(alphabet[r])
            sid = prefix + "".join(s)
            if sid not in seen:
                seen.add(sid)
                out.append(sid)
                if len(out) == n:
                    break
    return out


def generate(path: Path, n: int, seed: int = 7) -> dict:
    """Write ``n`` lines in the Amazon 2018 reviews format; return what was written."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_users, n_items = max(10, n // 8), max(10, n // 40)
    users = _ids(rng, n_users, "A", 12)
    items = _ids(rng, n_items, "B0", 8)
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.85
    user_p = 1.0 / np.arange(1, n_users + 1) ** 0.55
    words = ("great product love it works well would buy again not worth the price quality is good "
             "smells nice my skin feels soft arrived quickly package was damaged color is lovely "
             "too small for me returned it five stars recommend to everyone").split()
    lengths = np.clip(rng.lognormal(4.2, 1.0, size=2000), 8, 4000).astype(int)  # characters, long tail
    texts = []
    for length in lengths.tolist():
        t = " ".join(rng.choice(words, size=length // 5 + 1).tolist())[:length]
        texts.append(t)
    summaries = ["Five Stars", "Great", "Love it", "Not bad", "Disappointed", "Works as described", "Meh"]
    names = ["Amazon Customer", "Jane D.", "kb", "Mike", "Sarah Smith", "J. Doe", "Chris"]
    t0, t1 = 1_104_537_600, 1_538_352_000  # 2005-01-01 .. 2018-10-01
    day0 = dt.date(2005, 1, 1)
    day_str = [(day0 + dt.timedelta(days=d)) for d in range((t1 - t0) // 86_400 + 1)]
    day_str = [f"{d.month:02d} {d.day}, {d.year}" for d in day_str]

    chunk = 250_000
    written = 0
    dup_lines = re_reviews = 0
    recent: list[str] = []
    malformed_every = 100_000
    bad_kinds = [
        lambda: '{"overall": 5.0, "verified": true, "reviewerID": "A1', # not JSON (cut off)
        lambda: "",                                                    # blank
        lambda: None,                                                  # not UTF-8 (bytes, below)
        lambda: '{"overall": "five", "reviewerID": "%s", "asin": "%s", "unixReviewTime": 1400000000}' % (users[0], items[0]),
        lambda: '{"overall": 0.0, "reviewerID": "%s", "asin": "%s", "unixReviewTime": 1400000000}' % (users[1], items[1]),
        lambda: '{"overall": 4.0, "asin": "%s", "unixReviewTime": 1400000000}' % items[2],
        lambda: '{"overall": 4.0, "reviewerID": "%s", "asin": "%s"}' % (users[3], items[3]),
    ]
    n_bad = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        while written < n:
            m = min(chunk, n - written)
            u = rng.choice(n_users, size=m, p=user_p / user_p.sum())
            it = rng.choice(n_items, size=m, p=item_p / item_p.sum())
            rating = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], size=m, p=[0.06, 0.05, 0.09, 0.19, 0.61])
            ts = rng.integers(t0, t1, size=m)
            text = rng.integers(0, len(texts), size=m)
            summ = rng.integers(0, len(summaries), size=m)
            name = rng.integers(0, len(names), size=m)
            styled = rng.random(size=m) < 0.4
            verified = rng.random(size=m) < 0.8
            dup = rng.random(size=m) < 0.004     # an exact copy of a recent line
            again = rng.random(size=m) < 0.01    # the same user and item again, later
            out: list[bytes] = []
            for k in range(m):
                line_no = written + k + 1
                if line_no % malformed_every == 0:
                    kind = bad_kinds[(line_no // malformed_every - 1) % len(bad_kinds)]()
                    out.append(b'{"overall": 5.0, "reviewerID": "caf\xe9"}' if kind is None else kind.encode())
                    n_bad += 1
                    continue
                if dup[k] and recent:
                    out.append(recent[-1 - (k % len(recent))].encode())
                    dup_lines += 1
                    continue
                uu, ii, tt = users[u[k]], items[it[k]], int(ts[k])
                if again[k] and recent:
                    r = json.loads(recent[-1])
                    uu, ii, tt = r["reviewerID"], r["asin"], min(t1, r["unixReviewTime"] + 86_400 * 30)
                    re_reviews += 1
                style = ', "style": {"Size:": " 8 Ounce"}' if styled[k] else ""
                line = (
                    f'{{"overall": {rating[k]}, "verified": {"true" if verified[k] else "false"}, '
                    f'"reviewTime": "{day_str[(tt - t0) // 86_400]}", "reviewerID": "{uu}", "asin": "{ii}"{style}, '
                    f'"reviewerName": "{names[name[k]]}", "reviewText": "{texts[text[k]]}", '
                    f'"summary": "{summaries[summ[k]]}", "unixReviewTime": {tt}}}'
                )
                out.append(line.encode())
                if k % 97 == 0:
                    recent.append(line)
                    recent = recent[-50:]
            f.write(b"\n".join(out) + b"\n")
            written += m
    tmp.replace(path)
    return {"lines": n, "users": n_users, "items": n_items, "exact_duplicate_lines": dup_lines,
            "re_reviews": re_reviews, "malformed_lines": n_bad, "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------ srec

class _Clock:
    """Wall and CPU (all threads of this process) seconds per pipeline stage."""

    def __init__(self):
        self.w0 = self.w = time.perf_counter()
        self.c0 = self.c = time.process_time()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def lap(self, name: str) -> None:
        w, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = w - self.w, c - self.c
        self.w, self.c = w, c

    def result(self) -> dict:
        return {"seconds": {**self.wall, "total": self.w - self.w0},
                "cpu_seconds_by_stage": {**self.cpu, "total": self.c - self.c0}}


def run_srec(data: Path, seed: int) -> dict:
    import duckdb

    from srec.candidates import draw_eval_candidates
    from srec.config import CategoryConfig, FilterSettings
    from srec.ingest import ingest_reviews
    from srec.sequences import build_interactions

    db = WORK / "ingest_bench.duckdb"
    for p in (db, Path(str(db) + ".wal")):
        p.unlink(missing_ok=True)
    tmp = WORK / "duckdb_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    con = duckdb.connect(str(db), config={**DUCKDB_CONFIG, "temp_directory": str(tmp)})
    settings = FilterSettings()
    cfg = CategoryConfig(name=CATEGORY, format="amazon2018", reviews=data, items=None, filtering=settings, seed=seed)
    clock = _Clock()
    ing = ingest_reviews(con, cfg)
    clock.lap("ingest")
    inter = build_interactions(con, CATEGORY, settings)
    clock.lap("interactions")
    cand = draw_eval_candidates(con, CATEGORY, seed)
    clock.lap("candidates")
    con.close()
    return {
        **clock.result(),
        "counts": {
            "rows_read": ing.rows_read, "raw_kept": ing.rows_kept, "quarantined": sum(ing.quarantined.values()),
            "interactions": inter.rows, "positives": inter.positives, "negatives": inter.negatives,
            "users": inter.users, "items": inter.items, "candidate_rows": cand.rows,
        },
        "quarantined_by_reason": ing.quarantined,
    }


# ------------------------------------------------------------------------------------ pandas

def run_pandas(data: Path, seed: int) -> dict:
    import numpy as np
    import pandas as pd

    from srec.config import FilterSettings

    st = FilterSettings()
    clock = _Clock()
    # --- ingest: parse every line (what pd.read_json(lines=True) does, minus aborting on bad lines)
    records, line_no = [], []
    with open(data, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                rec = json.loads(raw)
            except ValueError:  # not JSON, blank, not UTF-8
                continue
            if isinstance(rec, dict):
                records.append(rec)
                line_no.append(n)
    rows_read = n
    df = pd.DataFrame.from_records(records)
    del records
    df["source_line"] = line_no
    df["position"] = df["source_line"] - 1
    df = df.rename(columns={"reviewerID": "user_id", "asin": "item_id", "overall": "rating",
                            "unixReviewTime": "timestamp"})
    df = df[["user_id", "item_id", "rating", "timestamp", "position", "source_line"]]
    df["rating"] = pd.to_numeric(df["rating"], errors="coerce")
    df["timestamp"] = pd.to_numeric(df["timestamp"], errors="coerce")
    now = time.time()
    ok = (
        df["user_id"].notna() & (df["user_id"].astype(str) != "")
        & df["item_id"].notna() & (df["item_id"].astype(str) != "")
        & df["rating"].between(st.rating_min, st.rating_max)
        & df["timestamp"].between(TS_MIN, now + 86_400)
    )
    df = df[ok].copy()
    df["timestamp"] = np.floor(df["timestamp"]).astype("int64")
    df = df.drop_duplicates(subset=["user_id", "item_id", "rating", "timestamp"], keep="first")
    raw_kept = len(df)
    clock.lap("ingest")

    # --- interactions
    df = df.sort_values(["timestamp", "position"]).drop_duplicates(["user_id", "item_id"], keep="first")
    pos = df[df["rating"] >= st.positive_min_rating]
    neg = df[df["rating"] <= st.negative_max_rating]
    while True:
        uc = pos.groupby("user_id")["item_id"].transform("size")
        ic = pos.groupby("item_id")["user_id"].transform("size")
        keep = (uc >= st.user_k_core) & (ic >= st.item_k_core)
        if keep.all():
            break
        pos = pos[keep]
    neg = neg[neg["user_id"].isin(set(pos["user_id"])) & neg["item_id"].isin(set(pos["item_id"]))]
    both = pd.concat([pos.assign(label=1), neg.assign(label=0)], ignore_index=True)
    both = both.sort_values(["user_id", "timestamp", "position", "item_id"]).reset_index(drop=True)
    both["chrono"] = both.groupby("user_id").cumcount()
    is_pos = both["label"] == 1
    both["seq_index"] = both[is_pos].groupby("user_id").cumcount()
    both["n_pos"] = both["user_id"].map(both[is_pos].groupby("user_id").size())
    both["split"] = "train"
    both.loc[is_pos & (both["seq_index"] == both["n_pos"] - 1), "split"] = "test"
    both.loc[is_pos & (both["seq_index"] == both["n_pos"] - 2), "split"] = "valid"
    vchrono = both.loc[both["split"].eq("valid") & is_pos].set_index("user_id")["chrono"]
    tchrono = both.loc[both["split"].eq("test") & is_pos].set_index("user_id")["chrono"]
    negm = ~is_pos
    vc, tc = both.loc[negm, "user_id"].map(vchrono), both.loc[negm, "user_id"].map(tchrono)
    both.loc[negm, "split"] = np.where(both.loc[negm, "chrono"] < vc, "train",
                                       np.where(both.loc[negm, "chrono"] < tc, "valid", "test"))
    clock.lap("interactions")

    # --- candidates: per user, 1+99 (and its first 20: 1+20) uniform negatives over unseen items
    universe = np.array(sorted(pos["item_id"].unique()))
    code = pd.Series(np.arange(len(universe)), index=universe)
    rng = np.random.default_rng(seed)
    k = 99
    out_user, out_split, out_slot, out_item = [], [], [], []
    seen_codes = both.assign(c=both["item_id"].map(code)).groupby("user_id")["c"].apply(lambda s: set(s.dropna().astype(int)))
    targets = both[is_pos & both["split"].isin(["valid", "test"])].set_index(["user_id", "split"])["item_id"]
    for user in sorted(seen_codes.index):
        seen = seen_codes[user]
        for split in ("valid", "test"):
            negs: list[int] = []
            while len(negs) < k:
                for c in rng.integers(0, len(universe), size=2 * k).tolist():
                    if c not in seen and c not in negs:
                        negs.append(c)
                        if len(negs) == k:
                            break
            out_user += [user] * (k + 1)
            out_split += [split] * (k + 1)
            out_slot += list(range(k + 1))
            out_item += [targets[(user, split)], *universe[negs].tolist()]
    cand = pd.DataFrame({"user_id": out_user, "split": out_split, "slot": out_slot, "item_id": out_item})
    cand = pd.concat([cand.assign(protocol="1+99"), cand[cand["slot"] <= 20].assign(protocol="1+20")])
    clock.lap("candidates")
    return {
        **clock.result(),
        "counts": {
            "rows_read": rows_read, "raw_kept": raw_kept, "quarantined": rows_read - raw_kept,
            "interactions": len(both), "positives": int(is_pos.sum()), "negatives": int((~is_pos).sum()),
            "users": int(both["user_id"].nunique()), "items": len(universe), "candidate_rows": len(cand),
        },
    }


# ------------------------------------------------------------------------------------ driver

def child(args) -> None:
    fn = run_srec if args.child == "srec" else run_pandas
    result = fn(Path(args.data), args.seed)
    result["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(result))


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(kind: str, data: Path, seed: int, address_space_limit: int | None = None) -> dict:
    """Run one pipeline in a fresh process; ``address_space_limit`` (bytes) makes a run that would
    exhaust the machine fail with MemoryError instead of waking the OOM killer on a shared host."""
    out = WORK / f"result_{kind}.json"
    out.unlink(missing_ok=True)

    def limit() -> None:
        if address_space_limit:
            resource.setrlimit(resource.RLIMIT_AS, (address_space_limit, address_space_limit))

    p = subprocess.Popen([sys.executable, __file__, "--child", kind, "--data", str(data), "--seed", str(seed),
                          "--result", str(out)], preexec_fn=limit)
    load_before = os.getloadavg()[0]
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        return {"failed": f"exit status {p.returncode}" + (
            f" (address space limited to {address_space_limit / 2**30:.1f} GiB)" if address_space_limit else ""),
            "peak_rss_mb": usage.ru_maxrss / 1024}
    res = json.loads(out.read_text())
    res["peak_rss_mb"] = usage.ru_maxrss / 1024  # the child's own peak (Linux: KiB)
    res["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    # Other work on the machine slows a run down: say how busy it was (1-minute load average).
    res["load_avg_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return res


def machine() -> dict:
    return machine_info()


def versions() -> dict:
    import duckdb
    import numpy
    import pandas
    import pyarrow

    return {"duckdb": duckdb.__version__, "pyarrow": pyarrow.__version__, "pandas": pandas.__version__,
            "numpy": numpy.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", default="1000000", help="comma-separated line counts, e.g. 1000000,4000000")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the saved .json")
    ap.add_argument("--child", choices=["srec", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.report_only:
        (RESULTS / "ingest_bench.md").write_text(markdown(json.loads((RESULTS / "ingest_bench.json").read_text())))
        return None

    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.lines.split(",")]
    runs = []
    for n in sizes:
        data = WORK / f"reviews_2018_{n}_{args.seed}.json"
        meta_path = data.with_suffix(".meta.json")
        if not data.exists() or not meta_path.exists():
            g0 = time.perf_counter()
            meta = generate(data, n, args.seed)
            meta["generate_seconds"] = round(time.perf_counter() - g0, 1)
            meta_path.write_text(json.dumps(meta))
        meta = json.loads(meta_path.read_text())
        print(f"== {n:,} lines ({meta['bytes'] / 2**20:.0f} MiB, {meta['users']:,} users, {meta['items']:,} items)",
              flush=True)
        run = {"lines": n, "data": meta}
        for kind in ["srec"] + ([] if args.skip_pandas else ["pandas"]):
            limit = max(2 << 30, _mem_available() - (3 << 30)) if kind == "pandas" else None
            r = run_child(kind, data, args.seed, limit)
            run[kind] = r
            if "failed" in r:
                print(f"  {kind:6s} FAILED: {r['failed']}; peak RSS {r['peak_rss_mb']:,.0f} MiB", flush=True)
                continue
            r["rows_per_s"] = n / r["seconds"]["total"]
            secs = ", ".join(f"{k} {v:.1f}s (CPU {r['cpu_seconds_by_stage'][k]:.1f}s)" for k, v in r["seconds"].items())
            print(f"  {kind:6s} {secs}; {r['rows_per_s']:,.0f} rows/s; peak RSS {r['peak_rss_mb']:,.0f} MiB; "
                  f"CPU {r['cpu_seconds']:.1f}s; load avg {r['load_avg_before_after']}", flush=True)
        if "pandas" in run and "failed" not in run["pandas"] and "failed" not in run["srec"]:
            run["speedup_vs_pandas"] = run["pandas"]["seconds"]["total"] / run["srec"]["seconds"]["total"]
            run["cpu_ratio_pandas_over_srec"] = run["pandas"]["cpu_seconds"] / run["srec"]["cpu_seconds"]
            run["counts_match"] = run["pandas"]["counts"] == run["srec"]["counts"]
            print(f"  srec is {run['speedup_vs_pandas']:.1f}x faster than pandas (wall; CPU time "
                  f"{run['cpu_ratio_pandas_over_srec']:.1f}x less); same counts: {run['counts_match']}")
            if not run["counts_match"]:
                print(f"    srec   {run['srec']['counts']}\n    pandas {run['pandas']['counts']}")
        runs.append(run)

    scaling = {}
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        for kind in ("srec", "pandas"):
            if kind in a and kind in b and "failed" not in a[kind] and "failed" not in b[kind]:
                scaling[kind] = (b[kind]["seconds"]["total"] / b["lines"]) / (a[kind]["seconds"]["total"] / a["lines"])
                scaling[kind + "_cpu"] = (b[kind]["cpu_seconds"] / b["lines"]) / (a[kind]["cpu_seconds"] / a["lines"])
                print(f"per-row cost {b['lines']:,} vs {a['lines']:,} lines, {kind}: {scaling[kind]:.2f}x wall, "
                      f"{scaling[kind + '_cpu']:.2f}x CPU")
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "duckdb_config": DUCKDB_CONFIG, "runs": runs,
        "per_row_cost_ratio_largest_vs_smallest": scaling,
        "targets": {"speedup_vs_pandas": ">= 3", "peak_rss_gib": "<= 2", "per_row_cost_ratio_4m_vs_1m": "<= 1.3"},
    }
    (RESULTS / "ingest_bench.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "ingest_bench.md").write_text(markdown(result))
    print(f"results: {RESULTS / 'ingest_bench.json'}, {RESULTS / 'ingest_bench.md'}")


def markdown(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    lines = [
        "# Ingest benchmark: srec (DuckDB) vs pandas",
        "",
        f"{res['date']} on {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; Python {m['python']}, "
        f"duckdb {v['duckdb']}, pyarrow {v['pyarrow']}, pandas {v['pandas']}, numpy {v['numpy']}.",
        "",
        "Pipeline: ingest (parse, validate, quarantine) -> interactions (dedupe, labels, 5-core, "
        "leave-one-out) -> eval candidates (1+20 and 1+99). Synthetic Amazon-2018-format reviews "
        "(`bench/ingest_bench.py`); each pipeline in its own process; peak RSS = that process's ru_maxrss. "
        f"DuckDB settings as the storage resource: {res['duckdb_config']}.",
        "",
        "| lines | MiB | pipeline | ingest s | interactions s | candidates s | total s | rows/s | peak RSS MiB "
        "| CPU s | load avg before/after |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in res["runs"]:
        for kind in ("srec", "pandas"):
            if kind not in run:
                continue
            if "failed" in run[kind]:
                lines.append(f"| {run['lines']:,} | {run['data']['bytes'] / 2**20:,.0f} | {kind} | failed: "
                             f"{run[kind]['failed']} | | | | | {run[kind]['peak_rss_mb']:,.0f} | | |")
                continue
            r, s = run[kind], run[kind]["seconds"]
            lines.append(
                f"| {run['lines']:,} | {run['data']['bytes'] / 2**20:,.0f} | {kind} | {s['ingest']:.1f} | "
                f"{s['interactions']:.1f} | {s['candidates']:.1f} | {s['total']:.1f} | {r['rows_per_s']:,.0f} | "
                f"{r['peak_rss_mb']:,.0f} | {r['cpu_seconds']:.1f} | {r['load_avg_before_after']} |"
            )
    lines.append("")
    for run in res["runs"]:
        if "speedup_vs_pandas" in run:
            lines.append(f"- {run['lines']:,} lines: srec {run['speedup_vs_pandas']:.1f}x faster than pandas in wall "
                         f"time, {run['cpu_ratio_pandas_over_srec']:.1f}x less CPU time; identical row counts at "
                         f"every step: {run['counts_match']}.")
    for kind, ratio in res["per_row_cost_ratio_largest_vs_smallest"].items():
        a, b = res["runs"][0]["lines"], res["runs"][-1]["lines"]
        lines.append(f"- per-row cost, {b:,} vs {a:,} lines, {kind.replace('_cpu', ' (CPU time)')}: {ratio:.2f}x")
    loads = [x for run in res["runs"] for k in ("srec", "pandas") if k in run
             for x in run[k].get("load_avg_before_after", [])]
    if loads and max(loads) > (m["cores"] or 1):
        lines.append(
            f"- The machine was shared while this ran (1-minute load average {min(loads):.1f}-{max(loads):.1f} on "
            f"{m['cores']} cores): wall times are inflated and noisy, CPU seconds are the steadier comparison."
        )
    for run in res["runs"]:
        if "speedup_vs_pandas" in run:
            a, b = run["srec"], run["pandas"]
            lines.append(
                f"- {run['lines']:,} lines, ingest step alone: srec {a['seconds']['ingest']:.1f}s wall / "
                f"{a['cpu_seconds_by_stage']['ingest']:.1f}s CPU, pandas {b['seconds']['ingest']:.1f}s / "
                f"{b['cpu_seconds_by_stage']['ingest']:.1f}s ({b['seconds']['ingest'] / a['seconds']['ingest']:.1f}x "
                f"wall, {b['cpu_seconds_by_stage']['ingest'] / a['cpu_seconds_by_stage']['ingest']:.1f}x CPU)."
            )
    lines += ["", "Targets: >= 3x faster than pandas; peak RSS <= 2 GiB; per-row cost at 4M within 1.3x of 1M.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
