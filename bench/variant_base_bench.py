"""Scoring several variants in one step: one shared base with each adapter attached in turn vs a fresh base per
variant (srec's way before 2026-12-07), peak memory and load time.

    .venv/bin/python bench/variant_base_bench.py                # hidden 1536, 12 layers (~0.4B parameters, fp32)
    .venv/bin/python bench/variant_base_bench.py --hidden 256 --layers 2 --no-write   # smoke run

Model: a random-weight LLaVA built by ``srec.models.tiny.build_llava`` at the given width and depth (the tiny
models' tokenizer and vision tower), saved to a temporary folder and loaded from it through
``resources.ModelRunner`` as the ``recommender`` resource loads it (CPU, float32). Two LoRA adapters (r 16 on
``lora_target_modules``, random B so that they change the scores) are saved in PEFT format beside it. The
weights are stored in bf16 and loaded as float32, so that every load converts them into memory of its own, as a
load onto a GPU copies them (a float32 file would stay memory-mapped, its pages shared between copies). The
variants, in this order: adapter A, zero-shot, adapter B -- the demo's mix of trained variants and the
zero-shot row.

Data: the first ``--users`` users of the real Amazon Beauty 5-core (``../shared/data/amazon-beauty``), prompts
built as ``bench/recommender_bench.py`` builds them, the first ``--candidates`` candidates of each.

Ways, each in its own child process (its peak resident memory is VmHWM of ``/proc/self/status``):

* fresh base per variant: for each variant ``ModelRunner.load_fresh()``, the adapter through
  ``PeftModel.from_pretrained``, ``score_shared_prefix`` -- the loop ``recommender_scores`` and the promotion gate
  ran, where a variant's model is still referenced while the next one loads;
* one shared base: ``ModelRunner.shared_base()`` once, each adapter attached for its variant and detached after
  (``srec.recommender.pipeline.attached_adapter``), as they run now.

The two ways' scores must be equal. Repeats alternate the order. Results:
bench/results/variant_base_bench.{json,md}.
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

from child_runs import alternating_runs, write_results  # bench/ is on sys.path when run as a script
from machine_info import machine_info, torch_info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WAYS = ("fresh_per_variant", "shared_base")
VARIANTS = ("adapter_a", None, "adapter_b")   # None: zero-shot


def say(msg: str) -> None:
    print(msg, flush=True)


def build(folder: Path, hidden: int, layers: int) -> dict:
    """The model and two adapters under ``folder``; their sizes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from srec.models.runner import LoadedModel, RunnerSettings
    from srec.models.tiny import TinyModelSettings, build_llava, ensure_tiny_models
    from srec.recommender.training import lora_target_modules

    tiny = ensure_tiny_models()["captioner"]
    tok = AutoTokenizer.from_pretrained(tiny)
    s = TinyModelSettings(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_layers=layers,
                          num_heads=max(4, hidden // 128), num_kv_heads=max(2, hidden // 512))
    build_llava(folder / "model", tok, s)
    # Stored in bf16 and loaded in float32: every load converts, so each copy is memory of its own, as a copy on
    # a GPU is (a float32 file would be memory-mapped, its pages shared with the page cache and between copies).
    base = LoadedModel(RunnerSettings(model=str(folder / "model"), device="cpu", dtype="bfloat16"))
    base.model.save_pretrained(folder / "model")
    base = LoadedModel(RunnerSettings(model=str(folder / "model"), device="cpu", dtype="float32"))
    params = sum(p.numel() for p in base.model.parameters())
    for seed, name in enumerate(("adapter_a", "adapter_b")):
        peft = get_peft_model(base.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1,
                                                     target_modules=lora_target_modules(base.model)))
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        peft.save_pretrained(folder / name)
        base.model = peft.unload()
    weights = sum(f.stat().st_size for f in (folder / "model").glob("*.safetensors"))
    return {"settings": s.__dict__, "parameters": params, "weights_bytes": weights}


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: of its own address space, unlike ``ru_maxrss``, which a child
    inherits from the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(way: str, folder: Path, users: int, candidates: int) -> dict:
    """One way in this process: per variant load (or reuse) the base, attach the adapter, score; then peak RSS."""
    import numpy as np
    import recommender_bench as rb
    from peft import PeftModel

    from resources.models import ModelRunner
    from srec.recommender.encoding import PromptEncoder
    from srec.recommender.pipeline import attached_adapter
    from srec.recommender.scoring import score_shared_prefix

    runner = ModelRunner(role="recommender", model=str(folder / "model"), device="cpu", dtype="float32")
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    load_s, loads, cases, scores = 0.0, 0, None, []

    def score(loaded, model):
        nonlocal cases
        enc = PromptEncoder(loaded, max_length=1024)
        if cases is None:  # prompts once (the tokenizer is the same in every copy)
            titles = rb.load_titles(rb.DATA / "item_titles.csv")
            users_, all_items = rb.load_users(rb.DATA / "user_sequence.txt", users)
            cases = rb.build_cases(users_, all_items, titles, enc, Path(tempfile.mkdtemp()), 2024)[0]
        return np.concatenate([score_shared_prefix(model, prefix, items[:candidates], yes_id=enc.yes_id,
                                                   no_id=enc.no_id, pad_id=loaded.tokenizer.pad_token_id,
                                                   batch_size=21, device=loaded.device, dtype=loaded.dtype)
                               for _, prefix, items, _ in cases])

    if way == "fresh_per_variant":
        for name in VARIANTS:  # as recommender_scores looped before: the last variant's model is held meanwhile
            t = time.perf_counter()
            loaded = runner.load_fresh()
            load_s, loads = load_s + time.perf_counter() - t, loads + 1
            model = loaded.model if name is None else PeftModel.from_pretrained(loaded.model,
                                                                                  str(folder / name)).eval()
            scores.append(score(loaded, model))
    else:
        copies = set()
        for name in VARIANTS:
            t = time.perf_counter()
            loaded = runner.shared_base()
            if id(loaded) not in copies:  # a load (not the copy an earlier variant left)
                copies.add(id(loaded))
                load_s, loads = load_s + time.perf_counter() - t, loads + 1
            with attached_adapter(loaded.model, None if name is None else folder / name) as model:
                scores.append(score(loaded, model))
    wall = time.perf_counter() - t0
    peak = peak_rss_mib()
    return {"way": way, "wall_seconds": round(wall, 2), "load_seconds": round(load_s, 2), "loads": loads,
            "peak_rss_mib": round(peak, 1), "rss_before_mib": round(rss0, 1),
            "scores": [s.tolist() for s in scores]}


def markdown(r: dict) -> str:
    m, f = r["machine"], r["figures"]
    lines = [
        "# Scoring several variants in one step: one shared base vs a fresh base per variant",
        "",
        f"{r['date']} on {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; torch {m['torch']}; "
        f"`{r['command']}`.",
        "",
        f"Model: random-weight LLaVA, hidden {r['model']['settings']['hidden_size']}, "
        f"{r['model']['settings']['num_layers']} layers, {r['model']['parameters']:,} parameters "
        f"({r['model']['weights_bytes'] / 2**20:,.0f} MiB of bf16 weights, loaded as float32), CPU. Variants: LoRA adapter A, "
        f"zero-shot, LoRA adapter B; {r['data']['users']} Beauty users x {r['data']['candidates']} candidates each. "
        f"Each way in its own process; {r['repeats']} repeats, alternating order.",
        "",
        "| way | loads | peak resident memory (MiB) | load s (median) | wall s (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for w in WAYS:
        lines.append(f"| {w.replace('_', ' ')} | {f[w]['loads']} | {f[w]['peak_rss_mib_median']:,.0f} | "
                     f"{f[w]['load_seconds_median']:.2f} | {f[w]['wall_seconds_median']:.2f} |")
    lines += [
        "",
        f"Peak memory, fresh / shared: **{r['peak_ratio']:.2f}x**; above the process before loading (imports, "
        f"{f['shared_base']['rss_before_mib_median']:,.0f} MiB): **{r['peak_above_start_ratio']:.2f}x**. Load time, fresh / shared: {r['load_ratio']:.2f}x. "
        f"Scores of the two ways: max abs difference {r['max_score_difference']:.2e}.",
        "",
        "Per run: " + "; ".join(f"{w.replace('_', ' ')}: peak {f[w]['peak_rss_mib_by_run']} MiB, load "
                                f"{f[w]['load_seconds_by_run']} s, wall {f[w]['wall_seconds_by_run']} s"
                                for w in WAYS) + ".",
        "",
        "GPU: unmeasured (no device was lent to the session that wrote this file). On CUDA the same loops load "
        "onto the GPU, so by the code path (not measured) the fresh way holds two copies of the weights in GPU memory "
        "while the next variant loads, the shared way one.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--users", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    ap.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.users, args.candidates)))
        return

    import numpy as np

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="srec_variant_base_") as tmp:
        folder = Path(tmp)
        say(f"building a random-weight LLaVA, hidden {args.hidden}, {args.layers} layers, and two adapters ...")
        model = build(folder, args.hidden, args.layers)
        say(f"  {model['parameters']:,} parameters, {model['weights_bytes'] / 2**20:,.0f} MiB")
        runs = alternating_runs(
            __file__, WAYS, args.repeats,
            ["--folder", str(folder), "--users", str(args.users), "--candidates", str(args.candidates)],
            lambda x: (f"{x['loads']} loads, {x['load_seconds']} s loading, {x['wall_seconds']} s in all, peak "
                       f"{x['peak_rss_mib']:,.0f} MiB"))
    scores = {w: np.array([np.concatenate(x["scores"]) for x in runs[w]]) for w in WAYS}
    max_diff = float(np.abs(scores["fresh_per_variant"][0] - scores["shared_base"][0]).max())
    repeats_equal = all(np.array_equal(scores[w][0], s) for w in WAYS for s in scores[w])
    figures = {}
    for w in WAYS:
        figures[w] = {"loads": runs[w][0]["loads"]}
        for k in ("peak_rss_mib", "load_seconds", "wall_seconds", "rss_before_mib"):
            vals = [x[k] for x in runs[w]]
            figures[w][f"{k}_by_run"] = vals
            figures[w][f"{k}_median"] = statistics.median(vals)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/variant_base_bench.py " + " ".join(sys.argv[1:]),
        "machine": {**machine_info(), **torch_info("cpu")},
        "model": model, "data": {"users": args.users, "candidates": args.candidates,
                                 "source": "../shared/data/amazon-beauty"},
        "repeats": args.repeats, "figures": figures,
        "peak_ratio": figures["fresh_per_variant"]["peak_rss_mib_median"] / figures["shared_base"]["peak_rss_mib_median"],
        "peak_above_start_ratio": ((figures["fresh_per_variant"]["peak_rss_mib_median"]
                                    - figures["fresh_per_variant"]["rss_before_mib_median"])
                                   / (figures["shared_base"]["peak_rss_mib_median"]
                                      - figures["shared_base"]["rss_before_mib_median"])),
        "load_ratio": (figures["fresh_per_variant"]["load_seconds_median"]
                       / max(figures["shared_base"]["load_seconds_median"], 1e-9)),
        "max_score_difference": max_diff, "repeats_identical": repeats_equal,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    md = markdown(result)
    print(md)
    if max_diff != 0.0:
        raise SystemExit(f"the two ways' scores differ by {max_diff:.3e}")
    if not args.no_write:
        write_results("variant_base_bench", result, md)


if __name__ == "__main__":
    main()
