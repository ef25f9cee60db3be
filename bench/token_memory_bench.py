"""Memory of the recommender's token ids: srec's encoder (one int object per distinct id; training rows that keep
the prefix and suffix lists they were made of) vs the way before (the tokenizer's and processor's plain lists,
an int object per position past 256, and a joined copy of prefix + suffix + answer per training row).

    .venv/bin/python bench/token_memory_bench.py                   # 800 Beauty users
    .venv/bin/python bench/token_memory_bench.py --users 60 --no-write   # smoke run

Data: the first ``--users`` users of the real Amazon Beauty 5-core (``../shared/data/amazon-beauty/``) with at
least 5 items: each user's history (its last 10 titles shown) and last item as the training target's positive, one
negative drawn (seeded) from the other users' targets, as ``sft_examples`` pairs them 1:1; candidate text
"Title: <title>". Each candidate has an image: a synthetic 500 x 500 JPEG (the Beauty data carries no images; an
image's token count depends on its size only). The processor is LLaVA-NeXT's at LLaVA-1.6's settings (as in
``bench/pixel_memory_bench.py``) over the tiny LLaVA's tokenizer, with the image token an added token past the
vocabulary, as LLaVA-1.6's ``<image>`` is (id 32000; here the tiny vocabulary's size): an id above 256, which
CPython does not keep one object for. No model runs; the image tensors go to memory-mapped files (an in-memory
budget of 0), so that process memory is the ids' (and the encoder's).

Ways, each in its own child process, holding what srec holds:

* before: ``PromptEncoder`` as srec had it until 2026-12-07 (plain lists) and training rows as joined lists (the
  users' prefix lists dropped once the rows are made, as the training loader did);
* srec: ``PromptEncoder`` with ``shared_ints`` and ``make_row``'s rows.

Figures per way, after encoding every candidate and fitting every user's prefix (what scoring holds) and after
making the training rows (what training holds): process memory the kernel cannot drop (``RssAnon``), in MiB above
the encoder before encoding, and the bytes of the id lists and the distinct int objects they point to (past 256)
counted with ``sys.getsizeof``; seconds to encode. Results: bench/results/token_memory_bench.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child_runs import alternating_runs, write_results  # bench/ is on sys.path when run as a script
from machine_info import machine_info, torch_info
from pixel_memory_bench import PINPOINTS, memory_mib, write_images

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from srec.paths import SHARED_DATA_DIR  # noqa: E402

DATA = SHARED_DATA_DIR / "amazon-beauty"
WAYS = ("before", "srec")
IMAGE_TOKEN = "<image_past_vocab>"
HISTORY_SHOWN = 10
BEAUTY = {"users": 22363, "items": 12101}  # the full 5-core, for the arithmetic at the end


def say(msg: str) -> None:
    print(msg, flush=True)


def load_users(n: int) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    import csv

    users = []
    with (DATA / "user_sequence.txt").open(encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) - 1 >= 5:
                users.append((parts[0], parts[1:]))
                if len(users) == n:
                    break
    with (DATA / "item_titles.csv").open(encoding="utf-8") as fh:
        titles = {r["item_id"]: r["title"] for r in csv.DictReader(fh) if r.get("title")}
    return users, titles


def pairs(users, seed: int) -> list[tuple[list[str], str, str]]:
    """(history, positive, negative) per user; the negative one of the other users' positives it never touched."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = sorted({seq[-1] for _, seq in users})
    out = []
    for _, seq in users:
        touched = set(seq)
        while (neg := pool[int(rng.integers(len(pool)))]) in touched:
            pass
        out.append((seq[:-1], seq[-1], neg))
    return out


def encoder_for(way: str, spill: Path):
    from types import SimpleNamespace

    import torch
    import transformers
    from transformers import AutoProcessor

    from srec.models.tiny import ensure_tiny_models
    from srec.recommender.encoding import PixelStore, PromptEncoder

    tiny = AutoProcessor.from_pretrained(ensure_tiny_models()["captioner"])
    tokenizer = tiny.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor_cls = (getattr(transformers, "LlavaNextImageProcessorPil", None)
                           or transformers.LlavaNextImageProcessor)
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor_cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                            image_grid_pinpoints=PINPOINTS),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=tiny.chat_template, image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    loaded = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(model_type="llava_next")),
                             processor=processor, tokenizer=tokenizer, device="cpu", dtype=torch.bfloat16)
    encoder = PromptEncoder(loaded, max_length=1 << 20, pixels=PixelStore(0, spill))
    if way == "before":
        encoder.shared_ints = list  # the tokenizer's and processor's lists as they come (a copy of each)
    return encoder


def id_bytes(lists) -> int:
    """Bytes of the lists and of the distinct int objects past 256 they point to (smaller ones exist anyway)."""
    seen, total = set(), 0
    for ids in lists:
        total += sys.getsizeof(ids)
        for i in ids:
            if i > 256 and id(i) not in seen:
                seen.add(id(i))
                total += sys.getsizeof(i)
    return total


def child(way: str, users: int, image: str, spill: Path, seed: int) -> dict:
    from srec.recommender.encoding import YES, NO, ItemView, UserView
    from srec.recommender.training import make_row

    people, titles = load_users(users)
    examples = pairs(people, seed)
    encoder = encoder_for(way, spill)
    image_id = encoder.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    gc.collect()
    start = memory_mib()["RssAnon"]
    t0 = time.perf_counter()
    prefixes, candidates = [], []
    for history, pos, neg in examples:
        user = UserView(profile=f"User profile: {len(history)} purchases.", preference=None,
                        history=tuple(titles.get(i, f"Item {i}") for i in history[-HISTORY_SHOWN:]))
        encoded = []
        for item in (pos, neg):
            suffix = encoder.render(user, ItemView(f"Title: {titles.get(item, f'Item {item}')}", image))[1]
            encoded.append(encoder.encode_item(suffix.replace("<image>", IMAGE_TOKEN), image))
        prefixes.append(encoder.fit_prefix(user, max(len(e.ids) for e in encoded) + encoder.answer_len,
                                           who=f"user of {pos}").ids)
        candidates.append(encoded)
    encode_s = time.perf_counter() - t0
    gc.collect()
    scoring_anon = memory_mib()["RssAnon"] - start
    item_lists = [e.ids for e in encoder._items.values()]
    scoring_bytes = id_bytes([*item_lists, *prefixes])
    answers = (encoder.answer_ids[YES], encoder.answer_ids[NO])
    if way == "before":  # one joined list a row; the prefix lists go once the rows are made
        rows = [(list(p) + list(e.ids) + list(answers[k]), len(answers[k]), e.vision, len(p))
                for p, encoded in zip(prefixes, candidates) for k, e in enumerate(encoded)]
        row_lists = [r[0] for r in rows]
    else:
        rows = [make_row(p, e, answers[k]) for p, encoded in zip(prefixes, candidates) for k, e in enumerate(encoded)]
        row_lists = [*{id(r.prefix): r.prefix for r in rows}.values()]  # the rows' own lists are the prefixes
    del prefixes
    gc.collect()
    training_anon = memory_mib()["RssAnon"] - start
    training_bytes = id_bytes([*item_lists, *row_lists])
    first = candidates[0][0].ids
    return {
        "way": way, "users": len(examples), "rows": len(rows), "items": len(encoder._items),
        "image_token_id": image_id, "item_ids_mean": sum(map(len, item_lists)) / len(item_lists),
        "image_tokens_per_item": sum(i == image_id for i in first),
        "prefix_ids_mean": sum(r.prefix_len if way == "srec" else r[3] for r in rows) / len(rows),
        "scoring_anon_mib": round(scoring_anon, 1), "scoring_id_mib": round(scoring_bytes / 2**20, 1),
        "training_anon_mib": round(training_anon, 1), "training_id_mib": round(training_bytes / 2**20, 1),
        "items_id_bytes": id_bytes(item_lists), "encode_seconds": round(encode_s, 2),
        "checksum": sum(sum(r.ids if way == "srec" else r[0]) for r in rows),
    }


def markdown(r: dict) -> str:
    f, m = r["figures"], r["machine"]
    s = f["srec"]
    lines = [
        "# Token ids the recommender holds: memory by way",
        "",
        f"{r['date']} on {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; torch {m['torch']}; "
        f"`{r['command']}`.",
        "",
        f"The first {s['users']} Amazon Beauty users with at least 5 items, one training target each (its last item) "
        f"and one negative: {s['rows']} rows, {s['items']} distinct candidates. LLaVA-NeXT's processor at LLaVA-1.6's "
        f"settings, a 500 x 500 image per candidate: {s['item_ids_mean']:,.0f} ids a candidate on average, "
        f"{s['image_tokens_per_item']:,} of them the image token (id {s['image_token_id']}, past the vocabulary as "
        f"LLaVA-1.6's 32000 is); prefixes {s['prefix_ids_mean']:,.0f} ids on average. Image tensors memory-mapped "
        f"(not counted). Each way in its own process, {r['repeats']} runs alternating the order (encode time: the "
        "median; memory: the first run's). MiB above the encoder before encoding.",
        "",
        "| way | scoring: process MiB | id lists + ints MiB | training: process MiB | id lists + ints MiB | "
        "encode s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for w in WAYS:
        x = f[w]
        lines.append(f"| {w} | {x['scoring_anon_mib']:,.1f} | {x['scoring_id_mib']:,.1f} | "
                     f"{x['training_anon_mib']:,.1f} | {x['training_id_mib']:,.1f} | {x['encode_seconds']:.1f} |")
    lines += [
        "",
        f"Before / srec, id lists and ints: scoring **{r['ratio_scoring_ids']:.2f}x**, training "
        f"**{r['ratio_training_ids']:.2f}x**; process memory: scoring {r['ratio_scoring_anon']:.2f}x, training "
        f"{r['ratio_training_anon']:.2f}x. Encoding, srec / before: {r['ratio_encode']:.2f}x the time. The rows' ids "
        f"agree: {r['checksums_agree']}.",
        "",
        f"Arithmetic from the counted bytes per candidate, per prefix and per row (not measured at that size): the "
        f"full Beauty 5-core ({BEAUTY['users']:,} users, {BEAUTY['items']:,} items, two rows a user) would hold "
        f"{r['beauty_training_gib']['before']:.2f} GiB of ids in training before and "
        f"{r['beauty_training_gib']['srec']:.2f} GiB with srec's way.",
    ]
    return "\n".join(lines) + "\n"


def beauty_gib(x: dict) -> float:
    """Training's counted id bytes scaled: candidates' share by items, the rest (prefixes or rows) by users."""
    items_share = x["items_id_bytes"] / x["items"] * BEAUTY["items"]
    rest = (x["training_id_mib"] * 2**20 - x["items_id_bytes"]) / x["users"] * BEAUTY["users"]
    return (items_share + rest) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating the order")
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    ap.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        image = str(next((args.folder / "images").iterdir()))
        print(json.dumps(child(args.child, args.users, image, args.folder / "spill", args.seed)))
        return

    started = time.perf_counter()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="srec_token_bench_", dir=ROOT / "bench") as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        write_images(folder / "images", 1)
        runs = alternating_runs(
            __file__, WAYS, args.repeats,
            ["--folder", str(folder), "--users", str(args.users), "--seed", str(args.seed)],
            lambda x: (f"scoring +{x['scoring_anon_mib']:,.1f} MiB ({x['scoring_id_mib']:,.1f} MiB of ids), training "
                       f"+{x['training_anon_mib']:,.1f} MiB ({x['training_id_mib']:,.1f} MiB of ids); encode "
                       f"{x['encode_seconds']} s"))
    for w in WAYS:  # the first run's figures (the counted bytes are the same every run), the median time
        figures[w] = {**runs[w][0], "encode_seconds_by_run": [x["encode_seconds"] for x in runs[w]],
                      "encode_seconds": statistics.median(x["encode_seconds"] for x in runs[w]),
                      "training_anon_mib_by_run": [x["training_anon_mib"] for x in runs[w]]}
    b, s = figures["before"], figures["srec"]
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/token_memory_bench.py " + " ".join(sys.argv[1:]),
        "machine": {**machine_info(), **torch_info("cpu")}, "data": str(DATA), "repeats": args.repeats,
        "figures": figures,
        "ratio_scoring_ids": b["scoring_id_mib"] / s["scoring_id_mib"],
        "ratio_training_ids": b["training_id_mib"] / s["training_id_mib"],
        "ratio_scoring_anon": b["scoring_anon_mib"] / max(s["scoring_anon_mib"], 1.0),
        "ratio_training_anon": b["training_anon_mib"] / max(s["training_anon_mib"], 1.0),
        "ratio_encode": s["encode_seconds"] / b["encode_seconds"],
        "checksums_agree": b["checksum"] == s["checksum"],
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    result["beauty_training_gib"] = {w: beauty_gib(figures[w]) for w in WAYS}
    md = markdown(result)
    print(md)
    if not result["checksums_agree"]:
        raise SystemExit(f"the ways' rows differ: checksums {b['checksum']} vs {s['checksum']}")
    if not args.no_write:
        write_results("token_memory_bench", result, md)


if __name__ == "__main__":
    main()
