"""LoRA training epochs with a target's rows sharing one encoding of their prompt prefix vs whole rows.

    .venv/bin/python bench/sft_prefix_sharing_bench.py               # 600 users, 2 rows each, 3 repeats
    .venv/bin/python bench/sft_prefix_sharing_bench.py --users 40 --repeats 1 --no-write   # smoke run

Data: the prompts of ``bench/recommender_bench.py`` (real Amazon Beauty 5-core sequences, the most recent 20
history titles in the prefix, fixed preference / description sentences, synthetic one-colour item images), for
the first ``--users`` users with >= 5 items. Each user is one training target with the MLLM-SRec 1:1 rows: the
held-out item answered "Yes." and one never-touched item answered "No.", both on the user's prefix.

Model: the tiny random-weight LLaVA (CPU fp32) under PEFT LoRA as ``train_lora`` wraps it (r 16, alpha 32,
dropout 0.1 on every language-model linear layer), AdamW lr 2e-4, batch 8, no accumulation.

Two ways, each one ``srec.recommender.training.train_epoch`` over the same rows, ``--repeats`` times in
alternating order after an untimed warm-up of 8 batches each:

* shared prefix: the rows as ``make_row`` builds them; ``length_batches`` keeps a target's two rows in one batch
  and ``answer_logits`` encodes their prefix once (``shared_prefix_answer_logits``);
* whole rows: the same rows with ``prefix_len`` 0, so each row runs whole (the plain left-padded forward) and
  batches form row by row, as srec trained before.

The ratio is the median whole-rows epoch time over the median shared-prefix one. Both ways start every epoch from
the same adapter weights and optimizer state (a copy taken before the first run). Equality of loss and gradients
is what ``tests/test_recommender.py`` checks; the epoch losses here differ because the batches differ.

Results: bench/results/sft_prefix_sharing_bench.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine_info, torch_info  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

import recommender_bench  # noqa: E402  (its data loading and prompts)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from srec.models.runner import LoadedModel, RunnerSettings
    from srec.models.tiny import ensure_tiny_models
    from srec.recommender.encoding import NO, YES, PromptEncoder
    from srec.recommender.settings import RecommenderSettings
    from srec.recommender.training import lora_target_modules, make_row, prefix_groups, train_epoch

    t_start = time.perf_counter()
    folder = ensure_tiny_models()["captioner"]
    llava = LoadedModel(RunnerSettings(model=str(folder), device="cpu", dtype="float32"))
    enc = PromptEncoder(llava, max_length=1024)
    titles = recommender_bench.load_titles(recommender_bench.DATA / "item_titles.csv")
    users, all_items = recommender_bench.load_users(recommender_bench.DATA / "user_sequence.txt", args.users)
    with tempfile.TemporaryDirectory(prefix="srec_sft_bench_") as tmp:
        cases, _ = recommender_bench.build_cases(users, all_items, titles, enc, Path(tmp), args.seed)
    rows = [make_row(prefix, item, enc.answer_ids[YES if k == 0 else NO])
            for _, prefix, items, _ in cases for k, item in enumerate(items[:2])]
    whole = [dataclasses.replace(r, prefix=(), suffix=[*r.prefix, *r.suffix]) for r in rows]
    tokens = sum(len(r.ids) for r in rows)
    shared_tokens = sum(len(r.ids) - r.prefix_len for r in rows) + sum(rows[g[0]].prefix_len
                                                                          for g in prefix_groups(rows))
    say(f"{len(cases)} users, {len(rows)} rows, {tokens:,} tokens as whole rows, {shared_tokens:,} with each prefix "
        f"once ({tokens / shared_tokens:.2f}x fewer)")

    settings = RecommenderSettings(batch_size=8, grad_accumulation=1, learning_rate=2e-4, seed=args.seed)
    torch.manual_seed(args.seed)
    model = get_peft_model(llava.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1,
                                                   target_modules=lora_target_modules(llava.model), bias="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    start_weights = copy.deepcopy({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    start_optimizer = copy.deepcopy(optimizer.state_dict())
    kw = {"pad_id": llava.tokenizer.pad_token_id, "device": llava.device, "dtype": llava.dtype}

    def epoch(batch_rows) -> tuple[float, float]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start_weights:
                    p.copy_(start_weights[n])
        optimizer.load_state_dict(start_optimizer)
        t0 = time.perf_counter()
        fit = train_epoch(model, batch_rows, optimizer, params, settings, 1, **kw)
        return time.perf_counter() - t0, fit["train_loss"]

    ways = {"shared_prefix": rows, "whole_rows": whole}
    say("warm-up ...")
    for w in ways.values():
        train_epoch(model, w[:64], optimizer, params, settings, 1, **kw)
    runs: dict[str, list] = {w: [] for w in ways}
    order = []
    for r in range(args.repeats):
        order += [(r, w) for w in (ways if r % 2 == 0 else list(ways)[::-1])]
    for r, w in order:
        seconds, loss = epoch(ways[w])
        runs[w].append((seconds, loss))
        say(f"  {w} run {r + 1}: {seconds:.1f} s, epoch loss {loss:.4f}")
    med = {w: statistics.median(x[0] for x in runs[w]) for w in ways}
    ratio = med["whole_rows"] / med["shared_prefix"]

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ".venv/bin/python bench/sft_prefix_sharing_bench.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "machine": {**machine_info(), **torch_info(str(llava.device))},
        "settings": vars(args) | {"batch_size": settings.batch_size, "learning_rate": settings.learning_rate},
        "data": {"users": len(cases), "rows": len(rows), "tokens_whole_rows": tokens,
                 "tokens_prefix_once": shared_tokens,
                 "prefix_tokens_mean": round(float(np.mean([r.prefix_len for r in rows])), 1),
                 "suffix_tokens_mean": round(float(np.mean([len(r.ids) - r.prefix_len for r in rows])), 1)},
        "run_order": [f"{w} {r + 1}" for r, w in order],
        "figures": {w: {"epoch_seconds": [round(x[0], 2) for x in runs[w]], "median_seconds": round(med[w], 2),
                        "rows_per_second": round(len(rows) / med[w], 1),
                        "epoch_loss": [round(x[1], 4) for x in runs[w]]} for w in ways},
        "ratio_whole_over_shared": round(ratio, 2),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    md = markdown(result)
    print(md)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "sft_prefix_sharing_bench.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "sft_prefix_sharing_bench.md").write_text(md)
        print(f"results: {RESULTS / 'sft_prefix_sharing_bench.md'}")


def markdown(r: dict) -> str:
    m, d, f = r["machine"], r["data"], r["figures"]
    lines = [
        "# LoRA training: a target's rows on one encoding of their prompt prefix vs whole rows",
        "",
        f"{r['date']} on {m['cores']} cores ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} threads); "
        f"tiny random-weight LLaVA, CPU fp32, PEFT LoRA r 16. Total run {r['total_seconds']} s.",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Data: the first {d['users']} Amazon Beauty 5-core users with >= 5 items, prompts as in "
        f"`bench/recommender_bench.py`; {d['rows']} rows (per user the held-out item \"Yes.\" and one never-touched "
        f"item \"No.\"); prefix mean {d['prefix_tokens_mean']} tokens, suffix + answer mean "
        f"{d['suffix_tokens_mean']}; {d['tokens_whole_rows']:,} tokens as whole rows, {d['tokens_prefix_once']:,} "
        f"with each prefix once ({d['tokens_whole_rows'] / d['tokens_prefix_once']:.2f}x fewer).",
        "",
        "| way | epoch s (runs) | median s | rows/s | epoch loss (runs) |",
        "|---|---|---:|---:|---|",
    ]
    for w, name in (("shared_prefix", "shared prefix (srec)"), ("whole_rows", "whole rows (before)")):
        x = f[w]
        lines.append(f"| {name} | {', '.join(f'{s:.1f}' for s in x['epoch_seconds'])} | {x['median_seconds']:.1f} | "
                     f"{x['rows_per_second']:.1f} | {', '.join(f'{v:.4f}' for v in x['epoch_loss'])} |")
    lines += ["", f"Run order: {', '.join(r['run_order'])}.", "",
              f"- Whole rows / shared prefix (median epoch time): **{r['ratio_whole_over_shared']}x**.",
              "- Each run starts from the same adapter and optimizer state; the losses differ between the ways "
              "because their batches differ (a target's rows together vs rows shuffled singly). Equal loss and "
              "gradients on the same batch are checked by tests/test_recommender.py.",
              "- GPU: unmeasured.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
