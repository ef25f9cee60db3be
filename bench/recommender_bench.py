"""Recommender yes/no scoring: shared-prefix KV-cache scoring vs a full forward per candidate.

    .venv/bin/python bench/recommender_bench.py               # 60 users x 21 candidates, tiny LLaVA, CPU fp32
    .venv/bin/python bench/recommender_bench.py --users 5     # smoke run

Data: the real Amazon Beauty 5-core sequences in ``../shared/data/amazon-beauty/`` (``user_sequence.txt``:
``USER ITEM ITEM ...`` oldest first; ``item_titles.csv``: ``item_id,title``). The first ``--users`` users
(file order) with at least 5 items; history = every item but the last, the most recent 20 shown as titles;
candidates = the held-out last item plus 20 items the user never touched, drawn with a seeded numpy rng
from all items in the file. The preference summary and the item description are fixed sentences (the
same for every user / item: no summariser or captioner runs here) and every item's image is a synthetic
96x96 PNG of one colour taken from a hash of its id, rendered with Pillow into a temporary folder.

Model: the tiny random-weight LLaVA of ``srec.models.tiny`` (the captioner folder), CPU, float32, through
``srec.models.runner.LoadedModel``; prompts through ``srec.recommender.encoding.PromptEncoder`` (the
chat template split into the user prefix and the per-item suffix, image tokens expanded in the suffix).
Every prompt is built, tokenized and its image preprocessed *before* timing: what is measured is only
``srec.recommender.scoring``:

* shared prefix: ``score_shared_prefix`` as srec scores -- the user's prefix encoded once, the 21 candidates'
  suffixes in right-padded batches of similar length (``plan_batches``: sorted by length, cut where the
  padding saved outweighs another call; at most ``--batch-size`` rows, default 21), attending through
  ``srec.recommender.prefix_attention`` (every suffix query on the one cached prefix copy, then each row on
  its own suffix, merged by log-sum-exp; no mask);
* shared prefix, cache view: the same with ``prefix_attention=False`` -- the suffixes run on a batch view of
  the prefix KV cache (copied into every row by each layer) with the model's own [b, s, p + s] mask, as srec
  scored before that attention: what the attention alone gains;
* naive: ``score_naive`` -- one full forward over prefix + suffix per candidate, no cache.

Each way runs over all users ``--repeats`` times (default 2), alternating the order (shared, cache view,
naive, then naive, cache view, shared), after one untimed warm-up user each way. The ratio is the median of
the naive way's run times over the median of the shared way's (= candidates/s shared / naive). The ways'
scores must agree to 1e-4 (max abs difference reported); torch's thread count is left at its default.

GPU: unmeasured. The script runs wherever ``LoadedModel`` resolves its device (``--device``); on CUDA
the same comparison would be recorded with that device, but no GPU was available to the session that
wrote the committed results.

Results: bench/results/recommender_bench.json and bench/results/recommender_bench.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine_info, torch_info  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
from srec.paths import SHARED_DATA_DIR  # noqa: E402

DATA = SHARED_DATA_DIR / "amazon-beauty"

TARGET_RATIO = 4.0
AGREE_TOL = 1e-4
N_NEGATIVES = 20
HISTORY_SHOWN = 20
MIN_ITEMS = 5

PREFERENCE = ("This shopper mostly buys affordable skin care and makeup basics, prefers gentle fragrance-free "
              "formulas, restocks favourite cleansers and moisturisers, and occasionally tries new nail colours "
              "and brushes.")  # ~30 words, the same for every user
DESCRIPTION = ("A popular beauty product in a compact package, suitable for daily use, gentle on most skin types, "
               "easy to apply, and well rated by shoppers for its value and quality.")  # ~25 words


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ data

def load_titles(path: Path) -> dict[str, str]:
    import csv

    with path.open(newline="", encoding="utf-8") as f:
        return {row["item_id"]: (row["title"] or "").strip() for row in csv.DictReader(f)}


def load_users(path: Path, n: int) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The first n users with >= MIN_ITEMS items (file order), and every item id in the file (sorted)."""
    users, items = [], set()
    with path.open(encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            items.update(parts[1:])
            if len(users) < n and len(parts) - 1 >= MIN_ITEMS:
                users.append((parts[0], parts[1:]))
    return users, sorted(items)


def item_image(folder: Path, item_id: str) -> str:
    """A synthetic 96x96 PNG of one colour from the md5 of the item id (written once per item)."""
    path = folder / f"{hashlib.md5(item_id.encode()).hexdigest()}.png"
    if not path.exists():
        from PIL import Image

        h = hashlib.md5(item_id.encode()).digest()
        Image.new("RGB", (96, 96), (h[0], h[1], h[2])).save(path)
    return str(path)


def build_cases(users, all_items, titles, enc, image_dir: Path, seed: int):
    """Per user: (user id, prefix ids, encoded candidates [positive first], candidate ids); prompt stats."""
    import numpy as np

    from srec.recommender.encoding import ItemView, UserView

    rng = np.random.default_rng(seed)
    pool = np.array(all_items)
    cases, missing_titles, history_dropped = [], 0, 0

    def title(i: str) -> str:
        nonlocal missing_titles
        t = titles.get(i)
        if not t:
            missing_titles += 1
            return f"Item {i}"
        return t

    for uid, seq in users:
        history, positive = seq[:-1], seq[-1]
        touched = set(seq)
        negatives: list[str] = []
        while len(negatives) < N_NEGATIVES:
            for j in rng.integers(0, len(pool), size=2 * N_NEGATIVES):
                c = str(pool[j])
                if c not in touched and c not in negatives:
                    negatives.append(c)
                    if len(negatives) == N_NEGATIVES:
                        break
        user = UserView(profile=f"User profile: {len(history)} purchases.", preference=PREFERENCE,
                        history=tuple(title(i) for i in history[-HISTORY_SHOWN:]))
        cands = [positive, *negatives]
        encoded = []
        for c in cands:
            view = ItemView(text=f"Title: {title(c)}\nDescription: {DESCRIPTION}", image_path=item_image(image_dir, c))
            _, suffix = enc.render(user, view)
            encoded.append(enc.encode_item(suffix, view.image_path))
        fitted = enc.fit_prefix(user, max(len(e.ids) for e in encoded) + enc.answer_len, who=f"user {uid}")
        history_dropped += fitted.history_dropped
        cases.append((uid, fitted.ids, encoded, cands))
    return cases, {"missing_titles": missing_titles, "history_lines_dropped_by_fit": history_dropped}


# ------------------------------------------------------------------------------------ timing

def machine(device: str) -> dict:
    return {**machine_info(), **torch_info(device), "torch_threads_note": "left at torch's default"}


def run_way(way: str, cases, llava, enc, batch_size: int):
    """All users one way: (scores [users, 21], wall s, CPU s, load before/after)."""
    import numpy as np
    import torch

    from srec.recommender.scoring import score_naive, score_shared_prefix

    cuda = str(llava.device).startswith("cuda")
    out = []
    load0 = os.getloadavg()[0]
    if cuda:
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    for _, prefix, items, _ in cases:
        if way in ("shared_prefix", "shared_prefix_cache"):
            s = score_shared_prefix(llava.model, prefix, items, yes_id=enc.yes_id, no_id=enc.no_id,
                                    pad_id=llava.tokenizer.pad_token_id, batch_size=batch_size,
                                    device=llava.device, dtype=llava.dtype,
                                    prefix_attention=None if way == "shared_prefix" else False)
        else:
            s = score_naive(llava.model, prefix, items, yes_id=enc.yes_id, no_id=enc.no_id,
                            device=llava.device, dtype=llava.dtype)
        out.append(s)
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return np.stack(out), wall, cpu, [round(load0, 2), round(os.getloadavg()[0], 2)]


# ------------------------------------------------------------------------------------ report

def markdown(r: dict) -> str:
    m, d, f = r["machine"], r["data"], r["figures"]
    s, c, n = f["shared_prefix"], f["shared_prefix_cache"], f["naive"]
    lines = [
        "# Recommender scoring benchmark: shared-prefix scoring vs a full forward per candidate",
        "",
        f"{r['date']} on {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads, torch's default), transformers {m['transformers']}; "
        f"device {m['device']}. Total run {r['total_seconds']} s.",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Model: {r['model']['what']} (`{r['model']['folder']}`, {r['model']['parameters']:,} parameters).",
        "",
        f"Data: {d['source']}: the first {d['users']} users (file order) with >= {MIN_ITEMS} items "
        f"({d['users_in_file']:,} users, {d['items_in_file']:,} items in the file); history = all items but the "
        f"last, the most recent {HISTORY_SHOWN} shown as titles; {d['candidates_per_user']} candidates per user "
        f"(the held-out last item + {N_NEGATIVES} never-touched items, numpy rng seed {d['seed']}), "
        f"{d['candidates']:,} candidates in all. Preference summary and item description: fixed sentences "
        f"(the same for all). Item images: **synthetic** 96x96 one-colour PNGs from a hash of the item id "
        f"(the shared data has no images). Titles missing: {d['missing_titles']}.",
        "",
        f"Prompt lengths (tokens): prefix mean {d['prefix_tokens']['mean']} (min {d['prefix_tokens']['min']}, "
        f"max {d['prefix_tokens']['max']}); suffix mean {d['suffix_tokens']['mean']} (min "
        f"{d['suffix_tokens']['min']}, max {d['suffix_tokens']['max']}; includes "
        f"{d['image_tokens_per_suffix']} image tokens). Prompts were built, tokenized and images preprocessed "
        f"before timing ({d['encode_seconds']} s), so only scoring is timed.",
        "",
        "| way | candidates | runs (s) | median s | candidates/s (median) | CPU s per run | load 1m before/after |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for name, w in (("shared prefix (length-planned batches, max %d; shared-prefix attention)"
                     % r["settings"]["batch_size"], s),
                    ("shared prefix, cache view (the same batches on a batch view of the KV cache)", c),
                    ("naive (1 forward each)", n)):
        lines.append(f"| {name} | {w['candidates_per_run']:,} | {', '.join(f'{x:.2f}' for x in w['wall_seconds_by_run'])} "
                     f"| {w['median_wall_seconds']:.2f} | {w['candidates_per_second']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in w['cpu_seconds_by_run'])} | "
                     f"{', '.join(f'{a:.1f}-{b:.1f}' for a, b in w['load_avg_1m_before_after'])} |")
    v = f["verdict"]
    lines += [
        "",
        f"Run order: {', '.join(r['run_order'])} (after one untimed warm-up user each way).",
        "",
        f"- Ratio shared / naive (candidates/s, medians): **{v['ratio_shared_over_naive']}x**; per repeat "
        f"{v['ratio_by_repeat']}. Target >= {TARGET_RATIO:g}x: **{'PASS' if v['pass'] else 'FAIL'}**.",
        f"- The cache view's ratio over naive: {v['ratio_cache_view_over_naive']}x (per repeat "
        f"{v['ratio_cache_view_by_repeat']}); the shared-prefix attention over the cache view: "
        f"{v['ratio_shared_over_cache_view']}x.",
        f"- Agreement: max |a - b| over all {d['candidates']:,} scores, any two ways = {f['max_abs_diff']:.2e} "
        f"(must be < {AGREE_TOL:g}: {'yes' if f['agree'] else 'NO'}); repeats of each way identical: "
        f"{f['repeats_identical']}.",
        f"- Machine shared during the run: {r['machine_shared_during_run']} (1-minute load average above "
        f"cores + 0.5 at any timed run's start or end).",
        "",
        "## GPU",
        "",
        "GPU: unmeasured (no GPU in this session). The script runs on CUDA unchanged (`--device cuda`); such "
        "a run would record its device here. These CPU figures are for the tiny model, whose forward is cheap "
        "next to Python and framework overhead per call: the ratio at real model size is not implied by them.",
        "",
        f"Settings: `{json.dumps(r['settings'])}`",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=60, help="first N users with >= 5 items")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating which goes first")
    ap.add_argument("--batch-size", type=int, default=21, help="most candidates per shared-prefix forward")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=2024, help="numpy rng seed of the negative candidates")
    ap.add_argument("--device", default="cpu", help="LoadedModel device ('cpu'; 'auto'/'cuda' untested here)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    args = ap.parse_args()

    import numpy as np

    from srec.models.runner import LoadedModel, RunnerSettings
    from srec.models.tiny import ensure_tiny_models
    from srec.recommender.encoding import PromptEncoder

    t_start = time.perf_counter()
    say("tiny models ...")
    folder = ensure_tiny_models()["captioner"]
    llava = LoadedModel(RunnerSettings(model=str(folder), device=args.device, dtype="float32"))
    llava.model.eval()
    enc = PromptEncoder(llava, max_length=args.max_length)

    say(f"data from {args.data} ...")
    titles = load_titles(args.data / "item_titles.csv")
    users, all_items = load_users(args.data / "user_sequence.txt", args.users)
    with (args.data / "user_sequence.txt").open(encoding="utf-8") as fh:
        users_in_file = sum(1 for line in fh if line.strip())
    if len(users) < args.users:
        say(f"  only {len(users)} users with >= {MIN_ITEMS} items")

    with tempfile.TemporaryDirectory(prefix="srec_rec_bench_") as tmp:
        t0 = time.perf_counter()
        cases, prompt_stats = build_cases(users, all_items, titles, enc, Path(tmp), args.seed)
        encode_seconds = time.perf_counter() - t0
    n_cand = sum(len(c[2]) for c in cases)
    prefix_lens = [len(c[1]) for c in cases]
    suffix_lens = [len(e.ids) for c in cases for e in c[2]]
    image_token_id = getattr(llava.model.config, "image_token_id", None) or getattr(llava.model.config,
                                                                                    "image_token_index", None)
    image_tokens = cases[0][2][0].ids.count(image_token_id) if image_token_id is not None else None
    say(f"  {len(cases)} users, {n_cand} candidates; prefix {statistics.mean(prefix_lens):.1f} tokens, "
        f"suffix {statistics.mean(suffix_lens):.1f} tokens (mean); encoded in {encode_seconds:.1f} s")

    ways = ("shared_prefix", "shared_prefix_cache", "naive")
    say("warm-up (one user each way, untimed) ...")
    for w in ways:
        run_way(w, cases[:1], llava, enc, args.batch_size)

    order = []
    for r in range(args.repeats):
        order += [(r, w) for w in (ways if r % 2 == 0 else ways[::-1])]
    runs: dict[str, list] = {w: [] for w in ways}
    for r, w in order:
        top = os.popen("top -bn1 | sed -n 8,9p").read().strip()  # noqa: S605 -- a look at who else is running
        scores, wall, cpu, load = run_way(w, cases, llava, enc, args.batch_size)
        runs[w].append((scores, wall, cpu, load, top))
        say(f"  {w} run {r + 1}: {wall:.2f} s wall, {cpu:.1f} s CPU, {n_cand / wall:.1f} candidates/s, load {load}")

    figs = {}
    for w in ways:
        walls = [x[1] for x in runs[w]]
        med = statistics.median(walls)
        figs[w] = {"candidates_per_run": n_cand, "wall_seconds_by_run": [round(x, 3) for x in walls],
                   "cpu_seconds_by_run": [round(x[2], 2) for x in runs[w]],
                   "median_wall_seconds": round(med, 3), "candidates_per_second": round(n_cand / med, 2),
                   "candidates_per_second_by_run": [round(n_cand / x, 2) for x in walls],
                   "load_avg_1m_before_after": [x[3] for x in runs[w]],
                   "top_processes_before_run": [x[4] for x in runs[w]]}
    firsts = [runs[w][0][0] for w in ways]
    max_diff = max(float(np.abs(a - b).max()) for a in firsts for b in firsts)
    repeats_identical = all(np.array_equal(runs[w][0][0], x[0]) for w in ways for x in runs[w])

    def ratio_of(slow: str, fast: str) -> float:
        return figs[slow]["median_wall_seconds"] / figs[fast]["median_wall_seconds"]

    def by_repeat_of(slow: str, fast: str) -> list[float]:
        return [round(runs[slow][i][1] / runs[fast][i][1], 2) for i in range(args.repeats)]

    ratio = ratio_of("naive", "shared_prefix")
    by_repeat = by_repeat_of("naive", "shared_prefix")
    loads = [v for w in ways for x in runs[w] for v in x[3]]
    params = sum(p.numel() for p in llava.model.parameters())

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ".venv/bin/python bench/recommender_bench.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "machine": machine(str(llava.device)),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"what": "tiny random-weight LLaVA, CPU fp32" if str(llava.device) == "cpu"
                  else f"tiny random-weight LLaVA, {llava.device} {str(llava.dtype).removeprefix('torch.')}",
                  "folder": str(Path(folder).relative_to(ROOT)) if Path(folder).is_relative_to(ROOT) else str(folder),
                  "parameters": params, "dtype": str(llava.dtype).removeprefix("torch."), "device": str(llava.device)},
        "data": {"source": "Amazon Beauty 5-core, ../shared/data/amazon-beauty/ (user_sequence.txt, item_titles.csv)",
                 "users_in_file": users_in_file, "items_in_file": len(all_items), "users": len(cases),
                 "user_ids_first_last": [cases[0][0], cases[-1][0]], "candidates_per_user": 1 + N_NEGATIVES,
                 "candidates": n_cand, "seed": args.seed, "history_shown": HISTORY_SHOWN,
                 "preference": f"fixed: {PREFERENCE}", "description": f"fixed: {DESCRIPTION}",
                 "images": "synthetic: 96x96 one-colour PNG per item, colour from md5(item id), rendered with Pillow",
                 **prompt_stats,
                 "prefix_tokens": {"mean": round(statistics.mean(prefix_lens), 1), "min": min(prefix_lens),
                                   "max": max(prefix_lens)},
                 "suffix_tokens": {"mean": round(statistics.mean(suffix_lens), 1), "min": min(suffix_lens),
                                   "max": max(suffix_lens)},
                 "image_tokens_per_suffix": image_tokens, "encode_seconds": round(encode_seconds, 1)},
        "run_order": [f"{w} {r + 1}" for r, w in order],
        "figures": {
            "shared_prefix": figs["shared_prefix"], "shared_prefix_cache": figs["shared_prefix_cache"],
            "naive": figs["naive"],
            "max_abs_diff": max_diff, "agree": max_diff < AGREE_TOL, "agreement_tolerance": AGREE_TOL,
            "repeats_identical": repeats_identical,
            "verdict": {"ratio_shared_over_naive": round(ratio, 2), "ratio_by_repeat": by_repeat,
                        "ratio_definition": "median naive wall s / median shared-prefix wall s "
                                            "(= candidates/s shared / naive)",
                        "target": f">= {TARGET_RATIO:g}x", "pass": ratio >= TARGET_RATIO,
                        "ratio_cache_view_over_naive": round(ratio_of("naive", "shared_prefix_cache"), 2),
                        "ratio_cache_view_by_repeat": by_repeat_of("naive", "shared_prefix_cache"),
                        "ratio_shared_over_cache_view": round(ratio_of("shared_prefix_cache", "shared_prefix"), 2)},
        },
        "machine_shared_during_run": max(loads) > (os.cpu_count() or 1) + 0.5,
        "gpu": {"status": "unmeasured (no GPU in this session)"},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    md = markdown(result)
    print(md)
    say(f"shared prefix {figs['shared_prefix']['candidates_per_second']} candidates/s, naive "
        f"{figs['naive']['candidates_per_second']} candidates/s, ratio {ratio:.2f}x, max abs diff {max_diff:.2e}")
    if max_diff >= AGREE_TOL:
        say(f"ERROR: the ways disagree by {max_diff:.2e} (>= {AGREE_TOL:g})")
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "recommender_bench.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "recommender_bench.md").write_text(md)
        print(f"results: {RESULTS / 'recommender_bench.json'}, {RESULTS / 'recommender_bench.md'}")


if __name__ == "__main__":
    main()
