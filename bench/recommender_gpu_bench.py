"""The recommender at real model size on a GPU: LoRA (bf16) and QLoRA (4-bit NF4) training tokens/s, peak
memory and model FLOPs utilisation, and yes/no scoring candidates/s (shared prefix vs a forward each).

    .venv/bin/python bench/recommender_gpu_bench.py                 # on a CUDA machine: LLaVA-1.5-7B size
    .venv/bin/python bench/recommender_gpu_bench.py --scale 0.02    # anywhere: the same code path at 2% size
                                                                    # (smoke test; no figures are written)

Model: a random-weight LLaVA-1.5-7B (CLIP ViT-L/14-336 vision tower, 2-layer GELU projector, Llama-2-7B
language model: 32 layers, hidden 4096, MLP 11008, vocabulary 32,064), built in memory in bf16 with SDPA
attention by ``bench/mllm_bench.py``'s builder, the tiny tokenizer's ids (random weights: what is measured
is throughput, not quality). Nothing is downloaded.

Training: srec's own code path. ``lora_target_modules`` (every language-model linear layer, not the vision
tower, projector or lm_head), PEFT LoRA r 16 / alpha 32 / dropout 0.1, ``answer_loss`` (loss on the last
3 answer tokens, ``logits_to_keep``), AdamW lr 2e-4. Rows are text-only prompts of ``--seq-len`` random
token ids (no image: the language model is where the FLOPs are). QLoRA: every language-model linear layer
replaced by a bitsandbytes ``Linear4bit`` (NF4, bf16 compute, the weights quantized from the random bf16
ones) and ``prepare_model_for_kbit_training``, as ``srec.models.runner`` does for ``quantization: 4bit``.
``--warmup`` untimed steps, then ``--steps`` timed ones (``torch.cuda.synchronize`` around them).

Model FLOPs utilisation: model FLOPs per trained token = 4 x the language model's parameters (forward 2N
plus the backward pass's activation gradients 2N; the frozen base gets no weight gradient) + attention
(12 x layers x hidden x seq_len, forward and backward), over the device's dense bf16 peak (H100 / H200
SXM: 989 TFLOP/s). Recomputation by gradient checkpointing is not counted (``--grad-checkpointing``).

Scoring: ``score_shared_prefix`` (prefix once, 21 suffixes batched; on CUDA by default on a batch view of its
KV cache), the same with ``prefix_attention=True`` (the shared-prefix attention; on CUDA its plain float32 path)
and ``score_naive`` (one forward per candidate), each way's candidates/s and peak memory, on ``--users`` users
of random ids, ``--prefix-len`` + ``--suffix-len`` tokens.

Without CUDA and at ``--scale 1`` the script writes the results file saying the GPU figures are
unmeasured and exits 0. Results: bench/results/recommender_gpu_bench.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

from machine_info import machine_info, torch_info  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
ANSWER_LEN = 3   # "Yes." / "No." + end of turn, as the chat template renders them


def say(msg: str) -> None:
    print(msg, flush=True)


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def lm_parameters(model) -> int:
    """The language model's matmul parameters: its decoder without the embedding table (a lookup, no FLOPs);
    lm_head runs only at the kept answer positions."""
    lm = model.get_decoder() if hasattr(model, "get_decoder") else model
    return sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()


def quantize_lm_4bit(model):
    """Every language-model linear layer (srec's LoRA targets) -> bitsandbytes Linear4bit NF4, on CUDA."""
    import bitsandbytes as bnb
    import torch

    from srec.recommender.training import lora_target_modules

    for name in lora_target_modules(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(parent, child, q.to(lin.weight.device))  # moving to CUDA quantizes
    return model


def train_figures(model, args, device: str, qlora: bool) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from srec.recommender.training import TrainRow, answer_loss, lora_target_modules

    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.grad_checkpointing)
    elif args.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, bias="none",
                                                  target_modules=lora_target_modules(model)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-4)
    rng = np.random.default_rng(2024)
    vocab = peft_model.get_input_embeddings().weight.shape[0]

    def step() -> None:
        rows = [TrainRow((), ids[:-ANSWER_LEN], ids[-ANSWER_LEN:])
                for ids in (rng.integers(8, min(vocab, 2000), args.seq_len).tolist() for _ in range(args.batch))]
        loss = answer_loss(peft_model, rows, 0, device, torch.bfloat16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peft_model.train()
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len
    out = {"trainable_parameters": trainable, "step_seconds": [round(t, 4) for t in times],
           "median_step_seconds": statistics.median(times),
           "tokens_per_second": tokens / statistics.median(times)}
    if device.startswith("cuda"):
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def scoring_figures(model, args, device: str) -> dict:
    import numpy as np
    import torch

    from srec.recommender.encoding import EncodedItem
    from srec.recommender.scoring import prefix_attention_by_default, score_naive, score_shared_prefix

    rng = np.random.default_rng(7)
    users = [(rng.integers(8, 2000, args.prefix_len).tolist(),
              [EncodedItem(rng.integers(8, 2000, args.suffix_len).tolist(), None) for _ in range(21)])
             for _ in range(args.users)]
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.eval()
    out, scores = {"default_uses_prefix_attention": prefix_attention_by_default(model, device)}, {}
    # shared_prefix: the scorer's default on this device (on CUDA: the suffixes on a batch view of the prefix KV
    # cache); shared_prefix_attention: the shared-prefix attention asked for (on CUDA its plain float32 path).
    ways = ("shared_prefix", "shared_prefix_attention", "naive", "shared_prefix", "shared_prefix_attention")
    for way in ways:   # the first run of each shared way warms up
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        got = []
        for prefix, items in users:
            if way != "naive":
                got.append(score_shared_prefix(model, prefix, items, yes_id=9, no_id=10, pad_id=0, batch_size=21,
                                               device=device, dtype=torch.bfloat16,
                                               prefix_attention=True if way == "shared_prefix_attention" else None))
            else:
                got.append(score_naive(model, prefix, items, yes_id=9, no_id=10, device=device, dtype=torch.bfloat16))
        sync()
        out[way] = 21 * len(users) / (time.perf_counter() - t0)
        if cuda:
            out[f"{way}_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        scores[way] = np.concatenate(got)
    out["ratio"] = out["shared_prefix"] / out["naive"]
    out["ratio_prefix_attention"] = out["shared_prefix_attention"] / out["naive"]
    # bf16: the ways round differently; the CPU fp32 test holds them to 1e-4.
    out["max_abs_difference"] = float(np.abs(scores["shared_prefix"] - scores["naive"]).max())
    out["max_abs_difference_prefix_attention"] = float(np.abs(scores["shared_prefix_attention"] - scores["naive"]).max())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real layers / width (1 = 7B)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--prefix-len", type=int, default=900)
    ap.add_argument("--suffix-len", type=int, default=120)
    ap.add_argument("--no-qlora", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import mllm_bench
    from srec.models.runner import resolve_device
    from srec.models.tiny import build_tiny_models, category_texts

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = {"when": stamp, "command": "bench/recommender_gpu_bench.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(), "torch": torch_info(device), "settings": vars(args), "device": device}
    if not cuda and args.scale >= 1:
        result["gpu"] = "unmeasured: no CUDA device on this machine"
        write(result)
        say("no CUDA device: GPU figures unmeasured (results file says so)")
        return 0
    folders = build_tiny_models(category_texts(["beauty"]))
    result["device_name"] = torch.cuda.get_device_name() if cuda else "cpu"
    for way in ("lora", *(() if args.no_qlora or not cuda else ("qlora",))):
        model, _, tok, info = mllm_bench._build_real("captioner", args.scale, device, folders)
        n_lm = lm_parameters(model)
        if way == "qlora":
            model = quantize_lm_4bit(model)
        say(f"{way}: {info['parameters']:,} parameters ({n_lm:,} in the language model) on {device}")
        figs = train_figures(model, args, device, qlora=way == "qlora")
        text = info["architecture"]["text"]
        flops_per_token = 4 * n_lm + 12 * text["num_hidden_layers"] * text["hidden_size"] * args.seq_len
        peak = peak_flops(result["device_name"])
        figs["model_flops_per_token"] = flops_per_token
        figs["mfu"] = figs["tokens_per_second"] * flops_per_token / peak if (peak and cuda) else None
        if way == "lora":
            figs["scoring"] = scoring_figures(model, args, device)
        result[way] = {"architecture": info["architecture"], "parameters": info["parameters"], **figs}
        say(json.dumps({k: v for k, v in figs.items() if k != "step_seconds"}, default=str))
        del model
        if cuda:
            torch.cuda.empty_cache()
    if args.scale < 1 or not cuda:
        say("smoke run (reduced size or no CUDA): nothing written")
        return 0
    write(result)
    return 0


def write(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recommender_gpu_bench.json").write_text(json.dumps(result, indent=1, default=str))
    lines = ["# Recommender at real model size on a GPU", "", f"{result['when']}; `{result['command']}`", ""]
    if "gpu" in result:
        lines += [f"**GPU figures: {result['gpu']}.** Run this script on a CUDA machine to measure LoRA / QLoRA "
                  "training tokens/s, peak memory, MFU and scoring candidates/s at LLaVA-1.5-7B size.", ""]
    for way in ("lora", "qlora"):
        f = result.get(way)
        if not f:
            continue
        mfu = f"{100 * f['mfu']:.1f}%" if f.get("mfu") else "n/a"
        lines += [f"## {way.upper()} ({f['parameters']:,} parameters, {f['trainable_parameters']:,} trainable)", "",
                  f"- {f['tokens_per_second']:,.0f} training tokens/s (batch {result['settings']['batch']} x "
                  f"{result['settings']['seq_len']} tokens, median of {len(f['step_seconds'])} steps); peak "
                  f"memory {f.get('peak_memory_gib', float('nan')):.1f} GiB; MFU {mfu}"]
        if "scoring" in f:
            s = f["scoring"]
            def peak(way: str) -> str:
                return f", peak {s[way + '_peak_memory_gib']:.1f} GiB" if way + "_peak_memory_gib" in s else ""

            lines += [f"- scoring: shared prefix (default here: "
                      f"{'shared-prefix attention' if s['default_uses_prefix_attention'] else 'KV cache view'}) "
                      f"{s['shared_prefix']:,.0f} candidates/s{peak('shared_prefix')} vs naive {s['naive']:,.0f}"
                      f"{peak('naive')} ({s['ratio']:.1f}x); max |difference| {s['max_abs_difference']:.2e} (bf16)",
                      f"- scoring with the shared-prefix attention asked for: {s['shared_prefix_attention']:,.0f} "
                      f"candidates/s{peak('shared_prefix_attention')} ({s['ratio_prefix_attention']:.1f}x over "
                      f"naive); max |difference| {s['max_abs_difference_prefix_attention']:.2e}"]
        lines.append("")
    lines += [f"Machine: {json.dumps(result['machine'])}", "", f"Torch: {json.dumps(result['torch'])}"]
    (RESULTS / "recommender_gpu_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
