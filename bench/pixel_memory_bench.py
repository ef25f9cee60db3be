"""Memory of the candidates' image tensors while a split is encoded for scoring: srec's encoder (bf16 tensors of a
bf16 model, memory-mapped past a budget) vs the way before (the processor's float32 tensors, all in memory).

    .venv/bin/python bench/pixel_memory_bench.py                # 600 images, LLaVA-NeXT (LLaVA-1.6) image sizes
    .venv/bin/python bench/pixel_memory_bench.py --items 40 --no-write     # smoke run

An encoder keeps every distinct candidate image's tensors while a split's prompts are built and scored (the
negatives are drawn uniformly, so nearly every item of a category comes up). The processor here is LLaVA-NeXT's
at LLaVA-1.6's settings (336 x 336 tiles, anyres pinpoints up to 1008, patch 14: a 500 x 500 image becomes 5 tiles,
[1, 5, 3, 336, 336]) over the tiny LLaVA's tokenizer and chat template; no model runs, only
``srec.recommender.encoding.PromptEncoder.encode_item`` as scoring calls it. Items: the first ``--items`` item
titles of the real Amazon Beauty 5-core (``../shared/data/amazon-beauty/item_titles.csv``) as the candidate text,
each with its own synthetic 500 x 500 JPEG (seeded noise: the Beauty data carries no images; what is measured is
the tensors' size, which the image's pixel values do not change).

Ways, each in its own child process:

* before: float32 tensors as the processor returns them, all in process memory (srec before 2026-12-07);
* bf16 in memory: the encoder of a bf16 model, no budget;
* bf16, mapped past 256 MiB: srec's way with ``--budget-mib`` (default 256; srec's default is 2 GiB) -- past the
  budget each image's tensors go to a file, memory-mapped and unlinked (and every 64 MiB spilled, glibc's
  ``malloc_trim`` returns what the processor's temporaries freed, which glibc otherwise kept: about one image's
  tensors per image).

Figures per way: process memory the kernel cannot drop (``RssAnon`` of ``/proc/self/status``) and file-backed
memory (``RssFile``: page cache it can drop) after encoding and after one pass that reads every image's tensors
(as scoring's batches do), in MiB above the process before encoding; seconds to encode and to read.
Results: bench/results/pixel_memory_bench.{json,md}.
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
from srec.paths import SHARED_DATA_DIR  # noqa: E402

TITLES = SHARED_DATA_DIR / "amazon-beauty" / "item_titles.csv"
WAYS = ("before", "bf16_in_memory", "bf16_mapped")
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def say(msg: str) -> None:
    print(msg, flush=True)


def memory_mib() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def titles(n: int) -> list[str]:
    import csv

    with TITLES.open(encoding="utf-8") as fh:
        rows = [r["title"] for r in csv.DictReader(fh) if r.get("title")]
    if len(rows) < n:
        raise SystemExit(f"{TITLES} has {len(rows)} titles, fewer than --items {n}")
    return rows[:n]


def write_images(folder: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"item{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (500, 500, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def next_encoder(way: str, spill: Path, budget_mib: int):
    """A PromptEncoder on LLaVA-NeXT's image processor at LLaVA-1.6's settings (no model weights)."""
    from types import SimpleNamespace

    import torch
    import transformers
    from transformers import AutoProcessor

    from srec.models.tiny import ensure_tiny_models
    from srec.recommender.encoding import PixelStore, PromptEncoder

    tiny = AutoProcessor.from_pretrained(ensure_tiny_models()["captioner"])
    image_processor_cls = (getattr(transformers, "LlavaNextImageProcessorPil", None)
                           or transformers.LlavaNextImageProcessor)
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor_cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                            image_grid_pinpoints=PINPOINTS),
        tokenizer=tiny.tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=tiny.chat_template, image_token="<image>", num_additional_image_tokens=1)
    loaded = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(model_type="llava_next")),
                             processor=processor, tokenizer=tiny.tokenizer, device="cpu",
                             dtype=torch.float32 if way == "before" else torch.bfloat16)
    budget = budget_mib << 20 if way == "bf16_mapped" else 1 << 62
    encoder = PromptEncoder(loaded, max_length=1 << 20, pixels=PixelStore(budget, spill))
    if way == "before":
        encoder.vision_dtype = None  # the processor's float32, as kept before
    return encoder


def child(way: str, images: list[str], texts: list[str], spill: Path, budget_mib: int) -> dict:
    from srec.recommender.encoding import ItemView, UserView

    encoder = next_encoder(way, spill, budget_mib)
    user = UserView(profile="User profile: 5 purchases.", preference=None, history=("a", "b"))
    start = memory_mib()
    t0 = time.perf_counter()
    encoded = [encoder.encode_item(encoder.render(user, ItemView(f"Title: {t}", p))[1], p)
               for t, p in zip(texts, images)]
    encode_s = time.perf_counter() - t0
    after_encode = memory_mib()
    t0 = time.perf_counter()
    total = 0.0
    for e in encoded:  # every image's tensors read once, as a scoring batch reads them
        total += float(e.vision["pixel_values"].float().sum())
    read_s = time.perf_counter() - t0
    after_read = memory_mib()
    shape = list(encoded[0].vision["pixel_values"].shape)
    return {
        "way": way, "items": len(encoded), "pixel_values_shape": shape,
        "pixel_values_dtype": str(encoded[0].vision["pixel_values"].dtype).removeprefix("torch."),
        "tensor_mib": round((encoder.pixels.resident_bytes + encoder.pixels.mapped_bytes) / 2**20, 1),
        "in_memory_mib": round(encoder.pixels.resident_bytes / 2**20, 1),
        "mapped_mib": round(encoder.pixels.mapped_bytes / 2**20, 1),
        "anon_mib_after_encode": round(after_encode["RssAnon"] - start["RssAnon"], 1),
        "file_mib_after_encode": round(after_encode["RssFile"] - start["RssFile"], 1),
        "anon_mib_after_read": round(after_read["RssAnon"] - start["RssAnon"], 1),
        "file_mib_after_read": round(after_read["RssFile"] - start["RssFile"], 1),
        "encode_seconds": round(encode_s, 2), "read_seconds": round(read_s, 2), "checksum": total,
        "spill_files_left": len(list(spill.iterdir())) if spill.exists() else 0,
    }


def markdown(r: dict) -> str:
    m, f = r["machine"], r["figures"]
    first = f["before"]
    lines = [
        "# Candidate image tensors while a split is encoded: memory by way",
        "",
        f"{r['date']} on {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; torch {m['torch']}; "
        f"`{r['command']}`.",
        "",
        f"{r['items']} Beauty item titles, each with its own 500 x 500 JPEG, through LLaVA-NeXT's image processor at "
        f"LLaVA-1.6's settings: `pixel_values` {first['pixel_values_shape']} per image. MiB above the process "
        "before encoding; anonymous memory is what the kernel cannot drop, file-backed memory is page cache it can. "
        f"Each way in its own process, {r['repeats']} runs alternating the order (times: medians; memory: the first "
        "run's, anonymous after reading by run: "
        + "; ".join(f"{w.replace('_', ' ')} {f[w]['anon_mib_after_read_by_run']}" for w in WAYS) + ").",
        "",
        "| way | tensors MiB | in memory / mapped MiB | anonymous MiB after encoding | after reading all | "
        "file-backed MiB after reading all | encode s | read s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in WAYS:
        x = f[w]
        lines.append(f"| {w.replace('_', ' ')} ({x['pixel_values_dtype']}) | {x['tensor_mib']:,.0f} | "
                     f"{x['in_memory_mib']:,.0f} / {x['mapped_mib']:,.0f} | {x['anon_mib_after_encode']:,.0f} | "
                     f"{x['anon_mib_after_read']:,.0f} | {x['file_mib_after_read']:,.0f} | "
                     f"{x['encode_seconds']:.1f} | {x['read_seconds']:.2f} |")
    lines += [
        "",
        f"Anonymous memory after reading all, before / bf16 mapped: **{r['anon_ratio_before_vs_mapped']:.1f}x**; "
        f"before / bf16 in memory: {r['anon_ratio_before_vs_bf16']:.2f}x. Encoding, bf16 mapped / before: "
        f"{r['encode_ratio_mapped_vs_before']:.2f}x the time. The tensors' checksums agree across ways: "
        f"{r['checksums_agree']}. Spill files left after each way: {[f[w]['spill_files_left'] for w in WAYS]}.",
        "",
        f"At this size a category of 12,101 items (Beauty) holds {r['per_image_mib_bf16'] * 12101 / 1024:,.1f} GiB of "
        f"bf16 tensors ({r['per_image_mib_fp32'] * 12101 / 1024:,.1f} GiB in float32), arithmetic from the measured "
        "size per image.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--budget-mib", type=int, default=256, help="in-memory budget of the mapped way")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating the order")
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    ap.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        images = sorted(str(p) for p in (args.folder / "images").iterdir())
        images.sort(key=lambda p: int(Path(p).stem.removeprefix("item")))
        print(json.dumps(child(args.child, images, titles(len(images)), args.folder / "spill", args.budget_mib)))
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="srec_pixel_bench_", dir=ROOT / "bench") as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        say(f"writing {args.items} synthetic 500 x 500 JPEGs ...")
        write_images(folder / "images", args.items)
        for path in (folder / "images").iterdir():  # into the page cache: no way pays the first read
            path.read_bytes()
        runs = alternating_runs(
            __file__, WAYS, args.repeats, ["--folder", str(folder), "--budget-mib", str(args.budget_mib)],
            lambda x: (f"{x['tensor_mib']:,.0f} MiB of tensors; anonymous +{x['anon_mib_after_read']:,.0f} MiB, "
                       f"file-backed +{x['file_mib_after_read']:,.0f} MiB after reading; encode "
                       f"{x['encode_seconds']} s, read {x['read_seconds']} s"))
    # Per way: the memory figures of its first run (the same every run), the median of the times.
    figures = {}
    for w in WAYS:
        figures[w] = dict(runs[w][0])
        for k in ("encode_seconds", "read_seconds"):
            figures[w][f"{k}_by_run"] = [x[k] for x in runs[w]]
            figures[w][k] = statistics.median(x[k] for x in runs[w])
        figures[w]["anon_mib_after_read_by_run"] = [x["anon_mib_after_read"] for x in runs[w]]
    per_image = {w: figures[w]["tensor_mib"] / figures[w]["items"] for w in WAYS}
    sums = [figures[w]["checksum"] for w in WAYS]
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/pixel_memory_bench.py " + " ".join(sys.argv[1:]),
        "machine": {**machine_info(), **torch_info("cpu")},
        "items": args.items, "budget_mib": args.budget_mib, "repeats": args.repeats, "titles": str(TITLES), "figures": figures,
        "per_image_mib_fp32": per_image["before"], "per_image_mib_bf16": per_image["bf16_in_memory"],
        "anon_ratio_before_vs_mapped": (figures["before"]["anon_mib_after_read"]
                                        / max(figures["bf16_mapped"]["anon_mib_after_read"], 1.0)),
        "anon_ratio_before_vs_bf16": (figures["before"]["anon_mib_after_read"]
                                      / max(figures["bf16_in_memory"]["anon_mib_after_read"], 1.0)),
        "encode_ratio_mapped_vs_before": figures["bf16_mapped"]["encode_seconds"] / figures["before"]["encode_seconds"],
        # bf16 rounds the float32 values: the two bf16 ways must agree exactly, float32 to bf16's precision
        "checksums_agree": sums[1] == sums[2] and abs(sums[0] - sums[1]) <= 1e-2 * max(1.0, abs(sums[0])),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    md = markdown(result)
    print(md)
    if not result["checksums_agree"]:
        raise SystemExit(f"the ways' tensors differ: checksums {sums}")
    if not args.no_write:
        write_results("pixel_memory_bench", result, md)


if __name__ == "__main__":
    main()
