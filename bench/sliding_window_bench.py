"""Shared-prefix scoring on a sliding-window model: right-padded batches vs one length a batch.

    .venv/bin/python bench/sliding_window_bench.py              # 30 users x 21 candidates, tiny Gemma 3, CPU fp32
    .venv/bin/python bench/sliding_window_bench.py --users 3    # smoke run

A sliding-window layer (Gemma 2 / 3, Mistral ...) measures distance in cache slots, so left padding between the
cached prefix and a short suffix moves its window. Where the window can bind, ``score_shared_prefix`` used to run
only suffixes of one length together, unpadded: with 21 candidates whose titles differ in length, nearly one
forward call per candidate. It now pads those suffixes on the right and reads each row's answer at its own last
token (``answer_logits_to_keep``), so they batch like every other model's (``plan_batches``).

Ways, in the same run, on the same prompts:

* right-padded: ``score_shared_prefix`` as it is;
* one length a batch: the same function with ``plan_batches`` replaced by the old grouping (suffixes of one
  length, at most ``--batch-size``; no padding, so the padding side does not matter): what srec did before;
* naive: ``score_naive``, one full forward per candidate (the reference the scores must equal to 1e-4).

Model: the tests' tiny random Gemma 3 (``tests/tiny_vlms.py``: real ``Gemma3ForConditionalGeneration`` and
processor classes, 2 text layers of hidden 64, the first with a sliding window of 64 tokens, 16 soft tokens an
image), on the tiny LLaVA's tokenizer; CPU fp32. Data and prompts: as ``bench/recommender_bench.py`` (real Beauty
users, the held-out item + 20 sampled negatives, synthetic one-colour images; built before timing).

Results: bench/results/sliding_window_bench.json and bench/results/sliding_window_bench.md. GPU: unmeasured
(none in the session that wrote them); on a GPU each saved call is a kernel-launch-bound small batch, so the
ratio there is not implied by these CPU figures.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine_info, torch_info  # bench/ is on sys.path when run as a script
from recommender_bench import DATA, build_cases, load_titles, load_users, say

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
AGREE_TOL = 1e-4


def one_length_a_batch(lengths, max_batch, *_args, **_kwargs) -> list[list[int]]:
    """The batches srec ran under a binding window before right padding: suffixes of one length, unpadded."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if batches and lengths[batches[-1][0]] == lengths[i] and len(batches[-1]) < max_batch:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def run_way(way: str, cases, gemma, enc, batch_size: int):
    """All users one way: (scores [users, 21], wall s, forward calls)."""
    import numpy as np

    import srec.recommender.scoring as scoring

    planned = scoring.plan_batches
    calls = 0

    def counting(plan):
        def wrapped(lengths, max_batch, *a, **k):
            nonlocal calls
            batches = plan(lengths, max_batch, *a, **k)
            calls += len(batches)
            return batches
        return wrapped

    out = []
    t0 = time.perf_counter()
    try:
        if way != "naive":
            scoring.plan_batches = counting(planned if way == "right_padded" else one_length_a_batch)
        for _, prefix, items, _ in cases:
            kw = {"yes_id": enc.yes_id, "no_id": enc.no_id, "device": gemma.device, "dtype": gemma.dtype}
            if way == "naive":
                out.append(scoring.score_naive(gemma.model, prefix, items, **kw))
                calls += len(items)
            else:
                out.append(scoring.score_shared_prefix(gemma.model, prefix, items, pad_id=gemma.tokenizer.pad_token_id,
                                                       batch_size=batch_size, **kw))
    finally:
        scoring.plan_batches = planned
    return np.stack(out), time.perf_counter() - t0, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=30, help="first N users with >= 5 items")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each way, the order rotating")
    ap.add_argument("--batch-size", type=int, default=21)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from srec.models.tiny import ensure_tiny_models
    from srec.recommender.encoding import PromptEncoder
    from srec.recommender.scoring import sliding_window
    from tests.tiny_vlms import GEMMA3_SLIDING_WINDOW, tiny_gemma3

    started = time.perf_counter()
    gemma = tiny_gemma3(ensure_tiny_models()["captioner"])
    enc = PromptEncoder(gemma, max_length=2048)
    enc.check_image_support()
    assert sliding_window(gemma.model) == GEMMA3_SLIDING_WINDOW
    titles = load_titles(args.data / "item_titles.csv")
    users, all_items = load_users(args.data / "user_sequence.txt", args.users)
    with tempfile.TemporaryDirectory(prefix="srec_sw_bench_") as tmp:
        cases, prompt_stats = build_cases(users, all_items, titles, enc, Path(tmp), args.seed)
    n_cand = sum(len(c[2]) for c in cases)
    prefix_lens = [len(c[1]) for c in cases]
    suffix_lens = [len(e.ids) for c in cases for e in c[2]]
    distinct = [len({len(e.ids) for e in c[2]}) for c in cases]
    say(f"{len(cases)} users, {n_cand} candidates; prefix {statistics.mean(prefix_lens):.1f} tokens, suffix "
        f"{statistics.mean(suffix_lens):.1f} (mean); distinct suffix lengths a user {statistics.mean(distinct):.1f}")

    ways = ("right_padded", "one_length_a_batch", "naive")
    for w in ways:  # warm-up, untimed
        run_way(w, cases[:1], gemma, enc, args.batch_size)
    runs: dict[str, list] = {w: [] for w in ways}
    for r in range(args.repeats):
        for w in ways[r % 3:] + ways[:r % 3]:
            scores, wall, calls = run_way(w, cases, gemma, enc, args.batch_size)
            runs[w].append((scores, wall, calls))
            say(f"  {w} run {r + 1}: {wall:.2f} s, {n_cand / wall:.1f} candidates/s, {calls} forward calls")

    figs = {w: {"wall_seconds_by_run": [round(x[1], 3) for x in runs[w]],
                "median_wall_seconds": round(statistics.median(x[1] for x in runs[w]), 3),
                "candidates_per_second": round(n_cand / statistics.median(x[1] for x in runs[w]), 1),
                "forward_calls": runs[w][0][2]} for w in ways}
    naive = runs["naive"][0][0]
    diffs = {w: float(max(np.abs(x[0] - naive).max() for x in runs[w])) for w in ways if w != "naive"}
    ratio = figs["one_length_a_batch"]["median_wall_seconds"] / figs["right_padded"]["median_wall_seconds"]
    result = {
        "bench": "sliding_window_bench", "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/sliding_window_bench.py " + " ".join(sys.argv[1:]),
        "machine": {**machine_info(), **torch_info("cpu")},
        "model": {"what": "tiny random Gemma 3 (tests/tiny_vlms.py), CPU fp32", "sliding_window": GEMMA3_SLIDING_WINDOW,
                  "parameters": sum(p.numel() for p in gemma.model.parameters()), "torch_threads": torch.get_num_threads()},
        "data": {"source": str(args.data), "users": len(cases), "candidates": n_cand,
                 "prefix_tokens_mean": round(statistics.mean(prefix_lens), 1),
                 "suffix_tokens_mean": round(statistics.mean(suffix_lens), 1),
                 "suffix_tokens_min_max": [min(suffix_lens), max(suffix_lens)],
                 "distinct_suffix_lengths_per_user_mean": round(statistics.mean(distinct), 2), **prompt_stats},
        "figures": figs,
        "max_abs_diff_vs_naive": {w: float(f"{d:.3g}") for w, d in diffs.items()},
        "agree_within_tolerance": all(d < AGREE_TOL for d in diffs.values()),
        "ratio_right_padded_over_one_length_a_batch": round(ratio, 2),
        "ratio_right_padded_over_naive": round(figs["naive"]["median_wall_seconds"]
                                               / figs["right_padded"]["median_wall_seconds"], 2),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    say(f"right-padded {figs['right_padded']['candidates_per_second']} candidates/s, one length a batch "
        f"{figs['one_length_a_batch']['candidates_per_second']}, naive {figs['naive']['candidates_per_second']}: "
        f"{ratio:.2f}x over one length a batch; max diff vs naive {diffs}")
    if not result["agree_within_tolerance"]:
        raise SystemExit(f"scores disagree with the naive forward: {diffs}")
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sliding_window_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "sliding_window_bench.md").write_text(markdown(result))
    say(f"wrote {RESULTS / 'sliding_window_bench.md'}")


def markdown(r: dict) -> str:
    m, d, f = r["machine"], r["data"], r["figures"]
    rows = "\n".join(
        f"| {w.replace('_', ' ')} | {x['forward_calls']:,} | {', '.join(f'{s:.2f}' for s in x['wall_seconds_by_run'])} "
        f"| {x['median_wall_seconds']:.2f} | {x['candidates_per_second']} |" for w, x in f.items())
    return f"""# Shared-prefix scoring on a sliding-window model: right-padded batches vs one length a batch

{r['finished']}; `{r['command'].strip()}`; {m.get('cores')} cores ({m.get('cpu')}), torch {m.get('torch')};
{r['model']['what']}, {r['model']['parameters']:,} parameters, sliding window {r['model']['sliding_window']} tokens
(it binds: every prompt is longer); {r['model']['torch_threads']} torch threads. Total {r['total_seconds']} s.

Data: {d['users']} real Beauty users ({d['source']}), {d['candidates']:,} candidates (the held-out item + 20
sampled negatives each).
Prompt tokens: prefix {d['prefix_tokens_mean']} (mean), suffix {d['suffix_tokens_mean']} (mean; {d['suffix_tokens_min_max'][0]}-{d['suffix_tokens_min_max'][1]}).
A user's 21 suffixes have {d['distinct_suffix_lengths_per_user_mean']} distinct lengths on average. Prompts are built before timing.

| way | forward calls (suffix batches; naive: one per candidate) | runs (s) | median s | candidates/s |
|---|---:|---|---:|---:|
{rows}

- Right-padded over one length a batch (medians): **{r['ratio_right_padded_over_one_length_a_batch']}x**;
  over the naive forward: {r['ratio_right_padded_over_naive']}x.
- Max |score - naive| : {r['max_abs_diff_vs_naive']} (must be < {AGREE_TOL}: {'yes' if r['agree_within_tolerance'] else 'NO'}).
- GPU: unmeasured (no GPU in this session). These are CPU figures of a tiny model, where a call's fixed cost
  is large next to its arithmetic; they show the calls saved, not the ratio at real model size.
"""


if __name__ == "__main__":
    main()
