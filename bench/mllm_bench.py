"""MLLM stages: batched generation vs one prompt at a time, captions and preference summaries.

    .venv/bin/python bench/mllm_bench.py                        # tiny models, beauty sample: ~5 min on 2 idle cores
    .venv/bin/python bench/mllm_bench.py --gpu                  # on a CUDA machine: also a random-weight LLaVA-1.5-7B
    .venv/bin/python bench/mllm_bench.py --gpu --gpu-scale 0.03 # no GPU: run that code path at 3% size (smoke test)

Inputs: the bundled sample category ``beauty`` (data/categories.yaml) through the project's own
pipeline functions (srec.ingest -> srec.sequences.build_interactions -> srec.images.resolve_item_images)
into a DuckDB file under bench/work/mllm_bench/ (git-ignored), and the tiny random-weight models of
srec.models.tiny (LLaVA captioner, Llama summariser), built there from the category's text.

Every comparison runs both ways in the same run, on the same inputs, each on its own fresh copy of the
prepared DuckDB file (caption_cache / preference_cache would otherwise serve the second way), each way
``--repeats`` times (default 2) alternating which goes first (batched, one at a time, one at a time,
batched): the machine may be shared, and a change of its load during the run then falls on both ways.
Each way's figures are over the sum of its repeats; per-repeat ratios are reported beside them.

* captions: ``srec.captions.build_item_captions`` with ``LoadedModel(max_batch_size=--batch-size)``
  against ``LoadedModel(max_batch_size=1)`` (one item per model call; same chunking and commits), on
  the same ``--naive-items`` items (a fixed md5 sample). Then the batched captioner over all items
  (``--items``) in the prepared file: the full figure, and the captions the preference prompts use.
* preferences: ``srec.preferences.build_user_preferences`` with ``cross_user_batching=True`` (rounds
  batched across users, ``LoadedModel(max_batch_size=--batch-size)``) against ``False`` (the per-user
  loop, one request per call), on the same ``--users`` users (a fixed md5 sample), modes ``--modes``.

items/s and prompts/s are per second *inside generate* (what the assets report as items_per_second);
wall seconds and CPU seconds (all threads of this process) of the whole stage are reported beside
them: the machine may be shared, and CPU seconds are the steadier comparison then. Greedy decoding:
both ways should give the same texts; the share identical is reported, not asserted (left padding can
change a float and so, rarely, a token).

``--gpu``: the same two comparisons with random-weight models of real size built in memory from
configs written below (LLaVA-1.5-7B: CLIP ViT-L/14-336 + Llama-2-7B; the summariser is that Llama-2-7B
alone), bf16, SDPA, the tiny models' tokenizer (image size 336, patch 14; the embedding and LM head
keep the real 32,064 rows, and ids the tokenizer lacks are suppressed in generation), through
srec's own ``LoadedModel`` generation code. Records items/s, generated tokens/s and peak GPU memory.
Without CUDA it only runs with ``--gpu-scale`` < 1 (a fraction of layers and width) as a smoke test
that the code path executes; such a run is recorded as that, never as a figure.

Shared machine: with OpenMP's default waiting (threads spin), 2 torch threads on 2 cores that another job
also uses ran generation 5-30x slower in trial runs, batched the most, so ratios taken then mean little.
``--omp-wait-policy PASSIVE`` (threads sleep) kept both ways within about 1.7x of their idle speed under
such load, but cost 25-40% on an idle machine. Every results file records the load average around each
timed stage and whether the machine was shared.

Results: bench/results/mllm_bench.json and bench/results/mllm_bench.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from machine_info import machine_info, torch_info  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "mllm_bench"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

CATEGORY = "beauty"
TARGET_RATIO = 3.0

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336 px + projector + Vicuna-7B v1.5 (Llama-2-7B).
REAL_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5}
REAL_TEXT = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": 32064,
             "rope_theta": 10000.0}
REAL_LLAVA = {"projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}


# ------------------------------------------------------------------------------------ helpers

def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _connect(path: Path):
    import duckdb

    return duckdb.connect(str(path), config={"threads": 2, "memory_limit": "1500MB"})


def _copy_db(src: Path, dst: Path) -> Path:
    for p in (dst, Path(str(dst) + ".wal")):
        p.unlink(missing_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _close(con) -> None:
    con.execute("CHECKPOINT")
    con.close()


def _sample_ids(con, sql: str, n: int | None) -> list[str]:
    """Ids ordered by md5 (a fixed pseudo-random sample, the same on every machine), the first n."""
    ids = sorted((r[0] for r in con.execute(sql, [CATEGORY]).fetchall()),
                 key=lambda s: hashlib.md5(str(s).encode()).hexdigest())
    return ids if n is None else ids[:n]


def keep_items(con, n: int | None) -> list[str]:
    """Restrict item_images (what build_item_captions captions) to n sampled items."""
    ids = _sample_ids(con, "SELECT item_id FROM item_images WHERE category = ?", n)
    con.execute("DELETE FROM item_images WHERE category = ? AND NOT list_contains(?::VARCHAR[], item_id)",
                [CATEGORY, ids])
    return ids


def keep_users(con, n: int | None) -> list[str]:
    """Restrict interactions (what build_user_preferences plans from) to n sampled users."""
    ids = _sample_ids(con, "SELECT DISTINCT user_id FROM interactions WHERE category = ?", n)
    con.execute("DELETE FROM interactions WHERE category = ? AND NOT list_contains(?::VARCHAR[], user_id)",
                [CATEGORY, ids])
    return ids


def count_batches(model) -> dict:
    """Count the model's generate calls (one per batch) by wrapping LoadedModel._generate_batch."""
    box = {"batches": 0, "max_batch": 0}
    inner = model._generate_batch

    def wrapped(batch):
        box["batches"] += 1
        box["max_batch"] = max(box["max_batch"], len(batch))
        return inner(batch)

    model._generate_batch = wrapped
    return box


class _Meter:
    """Wall, CPU seconds and load average around one way; peak GPU memory when on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.load0 = os.getloadavg()[0]
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
        self.load1 = os.getloadavg()[0]
        self.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None
        return False

    def as_dict(self) -> dict:
        d = {"wall_seconds": round(self.wall, 2), "cpu_seconds": round(self.cpu, 2),
             "load_avg_1m_before_after": [round(self.load0, 2), round(self.load1, 2)]}
        if self.peak_gib is not None:
            d["peak_gpu_memory_gib"] = self.peak_gib
        return d


def warm_up(model, image_path: str | None) -> None:
    """One untimed generate (lazy initialisation, first-call allocations), the same for every way."""
    from srec.models.generation import GenerationRequest

    model.generate([GenerationRequest(prompt="Describe this item.", image_path=image_path if model.processor else None)])


def _any_image(db: Path) -> str | None:
    con = _connect(db)
    row = con.execute("SELECT image_path FROM item_images WHERE category = ? AND status = 'ok' LIMIT 1",
                      [CATEGORY]).fetchone()
    con.close()
    return row[0] if row else None


def _rate(n: float, s: float) -> float:
    return round(n / s, 3) if s > 0 else 0.0


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


# ------------------------------------------------------------------------------------ preparing

def prepare(models_dir: Path) -> tuple[Path, dict, dict]:
    """The sample through the project's pipeline into a pristine DuckDB file; the tiny models."""
    from srec.config import load_categories
    from srec.images import ImageSettings, resolve_item_images
    from srec.ingest import ingest_items, ingest_reviews
    from srec.models.tiny import build_tiny_models, category_texts
    from srec.sequences import build_interactions

    t0 = time.perf_counter()
    folders = build_tiny_models(category_texts([CATEGORY]), models_dir)  # reused when the manifest matches
    t_models = time.perf_counter() - t0
    cfg = load_categories()[CATEGORY]
    db = WORK / "prepared.duckdb"
    for p in (db, Path(str(db) + ".wal")):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    con = _connect(db)
    reviews = ingest_reviews(con, cfg)
    items = ingest_items(con, cfg)
    inter = build_interactions(con, cfg.name, cfg.filtering)
    images = resolve_item_images(con, cfg.name, items_dir=(cfg.items or cfg.reviews).parent,
                                 settings=ImageSettings.from_mapping(cfg.images), cache_dir=WORK / "images")
    _close(con)
    info = {"category": CATEGORY, "source": str(cfg.reviews.relative_to(ROOT)),
            "builder": "srec pipeline (ingest, interactions, item_images)", "rows_read": reviews.rows_read,
            "items_read": items.rows_read, "users": inter.users, "items": inter.items, "positives": inter.positives,
            "images_ok": images.ok, "images_synthetic": images.synthetic,
            "prepare_seconds": round(time.perf_counter() - t0, 1), "tiny_models_seconds": round(t_models, 1)}
    return db, folders, info


# ------------------------------------------------------------------------------------ captions

def caption_run(db: Path, make_model, chunk_size: int, device: str) -> tuple[dict, dict[str, str], str]:
    """build_item_captions on ``db`` with the model ``make_model()`` returns; figures and item -> caption."""
    from srec.captions import CaptionSettings, build_item_captions

    model = make_model()
    warm_up(model, _any_image(db))
    box = count_batches(model)
    con = _connect(db)
    with _Meter(device) as meter:
        stats = build_item_captions(con, CATEGORY, model.generate, model.identity, CaptionSettings(chunk_size=chunk_size))
    captions = dict(con.execute("SELECT item_id, caption FROM item_captions WHERE category = ? AND status = 'ok'",
                                [CATEGORY]).fetchall())
    _close(con)
    fig = {
        "items": stats.items, "generated": stats.new, "failed": stats.failed,
        "image_and_text": stats.with_image, "text_only": stats.text_only,
        "max_batch_size": model.settings.max_batch_size, "srec_generate_calls": stats.chunks,
        "model_generate_calls": box["batches"], "largest_batch": box["max_batch"],
        "generate_seconds": round(stats.generate_seconds, 2),
        "items_per_second": _rate(stats.new, stats.generate_seconds),
        "generated_tokens": stats.generated_tokens,
        "generated_tokens_per_second": _rate(stats.generated_tokens, stats.generate_seconds),
        "items_per_wall_second": _rate(stats.new, meter.wall), "items_per_cpu_second": _rate(stats.new, meter.cpu),
        **meter.as_dict(),
    }
    return fig, captions, stats.snapshot


ADDITIVE = ("generated", "prompts_generated", "generated_tokens", "generate_seconds", "wall_seconds", "cpu_seconds",
            "srec_generate_calls", "model_generate_calls", "failed", "ok", "rows")


def combine(figs: list[dict], unit: str) -> dict:
    """One way's figures over its repeats: counts and seconds summed, rates recomputed from the sums."""
    out = dict(figs[0])
    for k in ADDITIVE:
        if k in out:
            out[k] = round(sum(f[k] for f in figs), 2) if isinstance(out[k], float) else sum(f[k] for f in figs)
    n = out["generated" if unit == "items" else "prompts_generated"]
    out[f"{unit}_per_second"] = _rate(n, out["generate_seconds"])
    out["generated_tokens_per_second"] = _rate(out["generated_tokens"], out["generate_seconds"])
    out[f"{unit}_per_wall_second"] = _rate(n, out["wall_seconds"])
    out[f"{unit}_per_cpu_second"] = _rate(n, out["cpu_seconds"])
    out["largest_batch"] = max(f["largest_batch"] for f in figs)
    out["load_avg_1m_before_after"] = [f["load_avg_1m_before_after"] for f in figs]
    if "peak_gpu_memory_gib" in out:
        out["peak_gpu_memory_gib"] = max(f["peak_gpu_memory_gib"] for f in figs)
    out["repeats"] = len(figs)
    out[f"{unit}_per_second_by_repeat"] = [f[f"{unit}_per_second"] for f in figs]
    return out


def _verdict(b: dict, n: dict, key: str) -> dict:
    r = _ratio(b[key], n[key])
    return {"ratio_batched_over_one_at_a_time": {
                key: r,
                "generated_tokens_per_second": _ratio(b["generated_tokens_per_second"], n["generated_tokens_per_second"]),
                "wall": _ratio(n["wall_seconds"], b["wall_seconds"]),
                "cpu": _ratio(n["cpu_seconds"], b["cpu_seconds"])},
            "target": f">= {TARGET_RATIO:g}x {key} (batched / one at a time)",
            "pass": bool(r is not None and r >= TARGET_RATIO)}


def _orders(ways: tuple[str, str], repeats: int) -> list[tuple[int, str]]:
    """Both ways per repeat, alternating which goes first (A B, B A, A B ...): drift in the machine's load
    between the start and the end of the run falls on both ways alike."""
    seq = []
    for r in range(repeats):
        seq += [(r, w) for w in (ways if r % 2 == 0 else ways[::-1])]
    return seq


def _identical(texts: dict, ways: tuple[str, str], repeats: int) -> dict:
    compared = same = 0
    for r in range(repeats):
        a, b = texts[(ways[0], r)], texts[(ways[1], r)]
        common = set(a) & set(b)
        compared += len(common)
        same += sum(a[k] == b[k] for k in common)
    # and the batched way against itself across repeats: generation is deterministic
    rep = [texts[(ways[0], r)] for r in range(repeats)]
    stable = all(x == rep[0] for x in rep[1:])
    return {"compared": compared, "identical": same, "share": round(same / compared, 4) if compared else None,
            "batched_repeats_identical": stable}


def compare_captions(src: Path, n_items: int, make_batched, make_naive, chunk_size: int, device: str,
                     tag: str, repeats: int) -> dict:
    """Both ways, ``repeats`` times each, on fresh copies of ``src`` restricted to the same sampled items."""
    ways = ("batched", "one_at_a_time")
    make = {"batched": make_batched, "one_at_a_time": make_naive}
    figs: dict[str, list[dict]] = {w: [] for w in ways}
    texts: dict = {}
    ids: list[str] = []
    for r, way in _orders(ways, repeats):
        db = _copy_db(src, WORK / f"{tag}_captions_{way}_{r}.duckdb")
        con = _connect(db)
        ids = keep_items(con, n_items)
        _close(con)
        say(f"{tag} captions, {way}, repeat {r + 1}/{repeats}: {len(ids)} items ...")
        fig, texts[(way, r)], _ = caption_run(db, make[way], chunk_size, device)
        figs[way].append(fig)
        say(f"  {fig['items_per_second']} items/s, {fig['generated_tokens_per_second']} tokens/s, "
            f"{fig['wall_seconds']} s wall, {fig['model_generate_calls']} model calls")
    out: dict = {"items": len(ids), "item_sample": "first n item_ids by md5(item_id)", "repeats": repeats,
                 "order": [f"{w} {r + 1}" for r, w in _orders(ways, repeats)]}
    for w in ways:
        out[w] = combine(figs[w], "items")
    out.update(_verdict(out["batched"], out["one_at_a_time"], "items_per_second"))
    out["ratio_batched_over_one_at_a_time"]["items_per_second_by_repeat"] = [
        _ratio(b["items_per_second"], n["items_per_second"]) for b, n in zip(figs["batched"], figs["one_at_a_time"])]
    out["identical_outputs"] = _identical(texts, ways, repeats)
    return out


# ------------------------------------------------------------------------------------ preferences

def preference_run(db: Path, model, modes: tuple[str, ...], batched: bool, snapshot: str, device: str):
    from srec.preferences import PreferenceSettings, build_user_preferences

    warm_up(model, None)
    box = count_batches(model)
    con = _connect(db)
    settings = PreferenceSettings(modes=modes)
    with _Meter(device) as meter:
        stats = build_user_preferences(con, CATEGORY, model.generate, model.identity, settings,
                                       caption_snapshot=snapshot, cross_user_batching=batched)
    rows = con.execute("SELECT user_id, split, mode, summary FROM user_preferences WHERE category = ? AND status = 'ok'",
                       [CATEGORY]).fetchall()
    _close(con)
    fig = {
        "users": stats.users, "rows": stats.rows, "ok": stats.ok, "failed": stats.failed,
        "prompts_generated": stats.generated, "rounds": stats.rounds, "round_prompts": stats.round_prompts,
        "max_batch_size": model.settings.max_batch_size if batched else 1, "chunk_size": settings.chunk_size,
        "srec_generate_calls": stats.generate_calls, "model_generate_calls": box["batches"],
        "largest_batch": box["max_batch"],
        "generate_seconds": round(stats.generate_seconds, 2),
        "prompts_per_second": _rate(stats.generated, stats.generate_seconds),
        "generated_tokens": stats.generated_tokens,
        "generated_tokens_per_second": _rate(stats.generated_tokens, stats.generate_seconds),
        "prompts_per_wall_second": _rate(stats.generated, meter.wall),
        "prompts_per_cpu_second": _rate(stats.generated, meter.cpu),
        **meter.as_dict(),
    }
    return fig, {(u, s, m): t for u, s, m, t in rows}


def compare_preferences(src: Path, n_users: int, model, modes: tuple[str, ...], snapshot: str, device: str,
                        tag: str, repeats: int) -> dict:
    """Both ways, ``repeats`` times each, on fresh copies of ``src`` restricted to the same sampled users."""
    ways = ("batched", "per_user")
    figs: dict[str, list[dict]] = {w: [] for w in ways}
    texts: dict = {}
    ids: list[str] = []
    for r, way in _orders(ways, repeats):
        db = _copy_db(src, WORK / f"{tag}_preferences_{way}_{r}.duckdb")
        con = _connect(db)
        ids = keep_users(con, n_users)
        _close(con)
        say(f"{tag} preferences, {way}, repeat {r + 1}/{repeats}: {len(ids)} users, modes {','.join(modes)} ...")
        fig, texts[(way, r)] = preference_run(db, model, modes, way == "batched", snapshot, device)
        figs[way].append(fig)
        say(f"  {fig['prompts_per_second']} prompts/s, {fig['generated_tokens_per_second']} tokens/s, "
            f"{fig['wall_seconds']} s wall, {fig['model_generate_calls']} model calls")
    out: dict = {"users": len(ids), "modes": list(modes), "user_sample": "first n user_ids by md5(user_id)",
                 "repeats": repeats, "order": [f"{w} {r + 1}" for r, w in _orders(ways, repeats)]}
    for w in ways:
        out[w] = combine(figs[w], "prompts")
    v = _verdict(out["batched"], out["per_user"], "prompts_per_second")
    v["ratio_batched_over_per_user"] = v.pop("ratio_batched_over_one_at_a_time")
    v["ratio_batched_over_per_user"]["prompts_per_second_by_repeat"] = [
        _ratio(b["prompts_per_second"], n["prompts_per_second"]) for b, n in zip(figs["batched"], figs["per_user"])]
    v["target"] = v["target"].replace("one at a time", "per-user loop")
    out.update(v)
    out["identical_outputs"] = {**_identical(texts, ways, repeats), "unit": "user_preferences rows (user, split, mode)"}
    return out


# ------------------------------------------------------------------------------------ real size

def _scaled(real: dict, scale: float, head_dim: int) -> dict:
    if scale >= 1:
        return dict(real)
    d = dict(real)
    heads = max(1, round(real["num_attention_heads"] * scale))
    d["num_attention_heads"] = heads
    if "num_key_value_heads" in d:
        d["num_key_value_heads"] = heads
    d["hidden_size"] = heads * head_dim
    d["num_hidden_layers"] = max(2, round(real["num_hidden_layers"] * scale))
    d["intermediate_size"] = max(16, round(real["intermediate_size"] * scale))
    return d


def in_memory_model(settings, model, processor, tokenizer, fingerprint: str):
    """srec's LoadedModel (its prompt encoding, batching and generation code) around a model built in memory."""
    from srec.models.runner import LoadedModel, resolve_device

    class _InMemory(LoadedModel):
        def __init__(self):  # the attributes LoadedModel.__init__ sets after loading from a folder
            import torch

            self.settings = settings
            self.folder = Path("(in memory)")
            self.task = "image-text-to-text" if processor is not None else "causal-lm"
            self.device = resolve_device(settings.device)
            self.dtype = next(model.parameters()).dtype
            self.processor, self.tokenizer, self.model = processor, tokenizer, model.eval()
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.load_seconds = 0.0
            self.fingerprint = fingerprint
            self.torch = torch

    return _InMemory()


def _build_real(kind: str, scale: float, device: str, folders: dict):
    """A random-weight LLaVA-1.5-7B (kind 'captioner') or Llama-2-7B ('summariser'), bf16, on ``device``."""
    import torch
    from transformers import (AutoProcessor, AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from srec.models.tiny import CHAT_TEMPLATE, IMAGE

    text_cfg = _scaled(REAL_TEXT, scale, 128)
    if kind == "captioner":
        tok = AutoProcessor.from_pretrained(folders["captioner"], local_files_only=True).tokenizer
    else:
        tok = AutoTokenizer.from_pretrained(folders["summariser"], local_files_only=True)
    text = LlamaConfig(**text_cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(2024)
    processor = None
    with torch.device(device):
        if kind == "captioner":
            vis_cfg = _scaled(REAL_VISION, scale, 64)
            config = LlavaConfig(vision_config=CLIPVisionConfig(**vis_cfg), text_config=text,
                                 image_token_index=tok.convert_tokens_to_ids(IMAGE), **REAL_LLAVA,
                                 image_seq_length=(REAL_VISION["image_size"] // REAL_VISION["patch_size"]) ** 2)
            model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
            size = REAL_VISION["image_size"]
            processor = LlavaProcessor(
                image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                      crop_size={"height": size, "width": size}),
                tokenizer=tok, patch_size=REAL_VISION["patch_size"], vision_feature_select_strategy="default",
                num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE)
            arch = {"vision": vis_cfg, "text": text_cfg, **REAL_LLAVA}
        else:
            model = LlamaForCausalLM._from_config(text, dtype=torch.bfloat16, attn_implementation="sdpa")
            arch = {"text": text_cfg}
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    # The real vocabulary has 32,064 rows; the tiny tokenizer has fewer tokens: the others are never chosen.
    gc.suppress_tokens = list(range(len(tok), text_cfg["vocab_size"]))
    params = sum(p.numel() for p in model.parameters())
    fp = hashlib.sha256(json.dumps({"kind": kind, "arch": arch, "seed": 2024}, sort_keys=True).encode()).hexdigest()[:16]
    return model, processor, tok, {"architecture": arch, "parameters": params, "dtype": "bfloat16",
                                   "attn_implementation": "sdpa", "tokenizer_tokens": len(tok), "fingerprint": fp}


def real_size(args, pristine: Path, captioned: Path, snapshot: str, folders: dict, device: str) -> dict:
    import torch

    from srec.models.runner import RunnerSettings

    smoke = args.gpu_scale < 1 or not device.startswith("cuda")
    n_items = args.gpu_items if not smoke else min(args.gpu_items, 8)
    n_users = args.gpu_users if not smoke else min(args.gpu_users, 3)
    out: dict = {"scale": args.gpu_scale, "device": device,
                 "model": "random-weight LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 + Llama-2-7B), built in memory",
                 "summariser": "random-weight Llama-2-7B architecture, built in memory"}
    t0 = time.perf_counter()
    model, processor, tok, info = _build_real("captioner", args.gpu_scale, device, folders)
    out["captioner_model"] = {**info, "build_seconds": round(time.perf_counter() - t0, 1)}
    base = RunnerSettings(model=f"bench:llava-1.5-7b-random@{args.gpu_scale:g}", device=device,
                          max_new_tokens=args.max_new_tokens, max_batch_size=args.gpu_batch_size)
    b = in_memory_model(base, model, processor, tok, info["fingerprint"])
    n = in_memory_model(dataclasses.replace(base, max_batch_size=1), model, processor, tok, info["fingerprint"])
    out["captions"] = compare_captions(pristine, n_items, lambda: b, lambda: n, args.chunk_size, device, "real",
                                       args.repeats)
    del model, b, n
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model, _, tok, info = _build_real("summariser", args.gpu_scale, device, folders)
    out["summariser_model"] = {**info, "build_seconds": round(time.perf_counter() - t0, 1)}
    s = in_memory_model(dataclasses.replace(base, model=f"bench:llama-2-7b-random@{args.gpu_scale:g}"),
                        model, None, tok, info["fingerprint"])
    out["preferences"] = compare_preferences(captioned, n_users, s, tuple(args.modes), snapshot, device, "real",
                                             args.repeats)
    del model, s
    out["status"] = "smoke" if smoke else "measured"
    return out


def smoke_summary(out: dict) -> dict:
    """What a reduced-size or CPU run of the real-size path shows: that it executes; no figures."""
    return {"status": "smoke test: code path executes (not a figure)", "scale": out["scale"], "device": out["device"],
            "items": out["captions"]["items"], "users": out["preferences"]["users"],
            "captioner_parameters": out["captioner_model"]["parameters"],
            "summariser_parameters": out["summariser_model"]["parameters"],
            "captions_identical_share": out["captions"]["identical_outputs"]["share"],
            "preferences_identical_share": out["preferences"]["identical_outputs"]["share"],
            "captions_failed": out["captions"]["batched"]["failed"] + out["captions"]["one_at_a_time"]["failed"],
            "preference_rows_failed": out["preferences"]["batched"]["failed"] + out["preferences"]["per_user"]["failed"],
            "executed": True}


# ------------------------------------------------------------------------------------ report

def machine(threads: int, device: str) -> dict:
    return {**machine_info(), **torch_info(device, threads)}


def _loads(x: list) -> str:
    pairs = x if x and isinstance(x[0], list) else [x]
    return ", ".join(f"{a:.1f}-{b:.1f}" for a, b in pairs)


def _loads_seen(res: dict) -> list[float]:
    vals = []
    for block, ways in ((res["captions"], ("batched", "one_at_a_time")), (res["preferences"], ("batched", "per_user"))):
        for w in ways:
            for pair in block[w]["load_avg_1m_before_after"]:
                vals += pair
    vals += res["captions_full_batched"]["load_avg_1m_before_after"]
    return vals


def _load_range(res: dict) -> str:
    vals = _loads_seen(res)
    return f"{min(vals):.1f}-{max(vals):.1f}"


def _pf(x: bool) -> str:
    return "PASS" if x else "FAIL"


def markdown(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    c, p, full = res["captions"], res["preferences"], res["captions_full_batched"]
    lines = [
        "# MLLM benchmark: batched generation vs one prompt at a time",
        "",
        f"{res['date']} on {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}; device {m['device']}. "
        f"Total run {res['total_seconds']:.0f} s.",
        "",
        f"Sample `{res['inputs']['category']}` through the srec pipeline: {res['inputs']['users']:,} users, "
        f"{res['inputs']['items']:,} items ({res['inputs']['images_synthetic']:,} with synthetic placeholder images: "
        "the sample ships no images). Tiny random-weight models of `srec.models.tiny` (captioner "
        f"{res['models']['captioner']['parameters']:,} parameters, summariser "
        f"{res['models']['summariser']['parameters']:,}), {res['models']['captioner']['resolved_dtype']}, greedy, "
        f"max_new_tokens {s['max_new_tokens']}. Each way on its own copy of the prepared DuckDB file, same inputs. "
        "items/s and prompts/s count time inside `generate` (as the assets' items_per_second); wall and CPU "
        "seconds are the whole stage (CPU = all threads of the process, the steadier figure on a shared machine).",
        "",
        "| stage | way | items / prompts | model calls | per s (generate) | tokens/s | wall s | CPU s | load 1m before/after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, block, ways, unit in (("captions", c, ("batched", "one_at_a_time"), "items"),
                                    ("preferences", p, ("batched", "per_user"), "prompts")):
        for w in ways:
            f = block[w]
            n = f["generated"] if unit == "items" else f["prompts_generated"]
            lines.append(f"| {name} | {w.replace('_', ' ')} (batch {f['max_batch_size']}) | {n:,} | "
                         f"{f['model_generate_calls']:,} | {f[unit + '_per_second']:.2f} | "
                         f"{f['generated_tokens_per_second']:.1f} | {f['wall_seconds']:.1f} | {f['cpu_seconds']:.1f} | "
                         f"{_loads(f['load_avg_1m_before_after'])} |")
    f = full
    lines.append(f"| captions, all items | batched (batch {f['max_batch_size']}) | {f['generated']:,} | "
                 f"{f['model_generate_calls']:,} | {f['items_per_second']:.2f} | {f['generated_tokens_per_second']:.1f} | "
                 f"{f['wall_seconds']:.1f} | {f['cpu_seconds']:.1f} | {_loads(f['load_avg_1m_before_after'])} |")
    cr, pr = c["ratio_batched_over_one_at_a_time"], p["ratio_batched_over_per_user"]
    ci, pi = c["identical_outputs"], p["identical_outputs"]
    lines += [
        "",
        f"Each way ran {c['repeats']} times on fresh copies, alternating which went first ({', '.join(c['order'])}); "
        f"the table sums the repeats. 1-minute load average during the timed stages: {_load_range(res)} on "
        f"{m['cores']} cores, of which this process's {m['torch_threads']} torch threads account for about "
        f"{m['torch_threads']}; above that, another job shared the cores and per-second figures are lower and noisier. "
        f"OMP_WAIT_POLICY: {m['omp_wait_policy']}; for shared machines see `--omp-wait-policy` in the script's docstring."
        + (" **The machine was shared during this run** (load above cores + 0.5): take the ratios with care."
           if res["machine_shared_during_run"] else " The machine was not otherwise busy during this run."),
        "",
        f"- Captions, {c['items']} items (the same for both ways): batched {cr['items_per_second']}x the items/s of "
        f"one at a time (per repeat {cr['items_per_second_by_repeat']}; tokens/s {cr['generated_tokens_per_second']}x, "
        f"wall {cr['wall']}x, CPU {cr['cpu']}x). Target {c['target']}: **{_pf(c['pass'])}**. "
        f"Identical captions: {ci['identical']}/{ci['compared']} ({ci['share']:.1%}); batched repeats identical: "
        f"{ci['batched_repeats_identical']}.",
        f"- Preferences, {p['users']} users, modes {', '.join(p['modes'])} (the same for both ways; "
        f"{p['batched']['rounds']} rounds, prompts per round {p['batched']['round_prompts']}): batched across users "
        f"{pr['prompts_per_second']}x the prompts/s of the per-user loop (per repeat {pr['prompts_per_second_by_repeat']}; "
        f"tokens/s {pr['generated_tokens_per_second']}x, wall {pr['wall']}x, CPU {pr['cpu']}x). "
        f"Target {p['target']}: **{_pf(p['pass'])}**. Identical summaries: {pi['identical']}/{pi['compared']} "
        f"({pi['share']:.1%}); batched repeats identical: {pi['batched_repeats_identical']}.",
        f"- All {full['generated']:,} items captioned batched (once): {full['items_per_second']:.2f} items/s, "
        f"{full['generated_tokens_per_second']:.0f} generated tokens/s ({full['wall_seconds']:.0f} s wall); these "
        "captions are the item text of the preference prompts.",
    ]
    g = res["gpu"]
    lines += ["", "## GPU", ""]
    if g.get("status") == "measured":
        gc, gp = g["captions"], g["preferences"]
        lines += [f"{m.get('gpu', 'GPU')}: {g['model']}, {g['captioner_model']['parameters']:,} parameters, bf16, SDPA "
                  f"(tokenizer of the tiny models, {g['captioner_model']['tokenizer_tokens']} tokens; other ids "
                  f"suppressed). Summariser: the Llama-2-7B alone ({g['summariser_model']['parameters']:,} parameters). "
                  f"Captions on {gc['items']} items, preferences for {gp['users']} users (modes {', '.join(gp['modes'])}), "
                  f"each way {gc['repeats']} times; peak GPU memory is the largest of the repeats.", "",
                  "| stage | way | n | per s | tokens/s | wall s | peak GPU GiB |", "|---|---|---:|---:|---:|---:|---:|"]
        for name, block, ways, unit in (("captions", gc, ("batched", "one_at_a_time"), "items"),
                                        ("preferences", gp, ("batched", "per_user"), "prompts")):
            for w in ways:
                f = block[w]
                n = f["generated"] if unit == "items" else f["prompts_generated"]
                lines.append(f"| {name} | {w.replace('_', ' ')} | {n} | {f[unit + '_per_second']:.2f} | "
                             f"{f['generated_tokens_per_second']:.1f} | {f['wall_seconds']:.1f} | "
                             f"{f.get('peak_gpu_memory_gib')} |")
        lines += ["", f"- captions: {gc['ratio_batched_over_one_at_a_time']['items_per_second']}x ({_pf(gc['pass'])}); "
                  f"preferences: {gp['ratio_batched_over_per_user']['prompts_per_second']}x ({_pf(gp['pass'])}); "
                  f"identical: captions {gc['identical_outputs']['share']}, preferences {gp['identical_outputs']['share']}."]
    else:
        lines.append(f"GPU: {g['status']}.")
        if "smoke_test" in g:
            st = g["smoke_test"]
            lines.append(f"The real-size code path (`--gpu`) was run at scale {st['scale']} on {st['device']} "
                         f"({st['captioner_parameters']:,} / {st['summariser_parameters']:,} parameters, "
                         f"{st['items']} items, {st['users']} users): {st['status']}.")
    lines += ["", f"Settings: `{json.dumps(s)}`", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=None, help="items captioned batched in the full run (default: all)")
    ap.add_argument("--naive-items", type=int, default=300, help="items captioned both ways for the comparison")
    ap.add_argument("--users", type=int, default=150, help="users summarised both ways")
    ap.add_argument("--modes", default="recurrent,direct", help="preference modes, comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="captions and summaries (the demo's defaults)")
    ap.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched way")
    ap.add_argument("--chunk-size", type=int, default=64, help="caption chunk (items per srec generate call)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating which goes first")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None,
                    help="set OMP_WAIT_POLICY before torch is imported (default: leave it as it is)")
    ap.add_argument("--gpu", action="store_true", help="also random-weight models of real size (needs CUDA, "
                    "or --gpu-scale < 1 for a smoke test)")
    ap.add_argument("--gpu-scale", type=float, default=1.0, help="fraction of layers / width of the real-size models")
    ap.add_argument("--gpu-items", type=int, default=128)
    ap.add_argument("--gpu-users", type=int, default=32)
    ap.add_argument("--gpu-batch-size", type=int, default=32)
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.omp_wait_policy:
        if "torch" in sys.modules:
            ap.error("--omp-wait-policy must be set before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    load = os.getloadavg()[0]
    if load > 1.0 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        say(f"note: 1-minute load average {load:.1f} before the start: another job may share the cores; "
            "consider --omp-wait-policy PASSIVE (see the docstring)")

    import torch

    from srec.models.runner import LoadedModel, RunnerSettings, resolve_device

    torch.set_num_threads(args.torch_threads)
    device = resolve_device(args.device)
    if args.gpu and not device.startswith("cuda") and args.gpu_scale >= 1:
        ap.error("--gpu at full size needs CUDA; without it pass --gpu-scale < 1 (a smoke test of the code path)")
    t_start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)

    say("preparing the sample and the tiny models ...")
    pristine, folders, inputs = prepare(WORK / "models")
    say(f"  {inputs['users']} users, {inputs['items']} items, {inputs['prepare_seconds']} s")

    def runner(role: str, batch: int) -> LoadedModel:
        return LoadedModel(RunnerSettings(model=str(folders[role]), device=args.device,
                                          max_new_tokens=args.max_new_tokens, max_batch_size=batch))

    models = {"captioner": runner("captioner", args.batch_size).describe(),
              "summariser": runner("summariser", args.batch_size).describe()}

    # 1. captions, the same subset both ways
    captions = compare_captions(pristine, args.naive_items, lambda: runner("captioner", args.batch_size),
                                lambda: runner("captioner", 1), args.chunk_size, device, "tiny", args.repeats)

    # 2. captions, every item, batched: the item text of the preference prompts
    captioned = _copy_db(pristine, WORK / "captioned.duckdb")
    con = _connect(captioned)
    n_full = len(keep_items(con, args.items))
    _close(con)
    say(f"tiny captions, batched, all {n_full} items ...")
    full, _, snapshot = caption_run(captioned, lambda: runner("captioner", args.batch_size), args.chunk_size, device)
    say(f"  {full['items_per_second']} items/s, {full['generated_tokens_per_second']} tokens/s, {full['wall_seconds']} s")

    # 3. preferences, the same users both ways
    summariser = runner("summariser", args.batch_size)
    prefs = compare_preferences(captioned, args.users, summariser, tuple(args.modes), snapshot, device, "tiny",
                                args.repeats)

    # 4. real size
    if args.gpu:
        rs = real_size(args, pristine, captioned, snapshot, folders, device)
        if rs["status"] == "measured":
            gpu = rs
        elif device.startswith("cuda"):
            gpu = {"status": "real-size models not measured (--gpu-scale < 1)", "smoke_test": smoke_summary(rs)}
        else:
            gpu = {"status": "unmeasured (no GPU available to this session)", "smoke_test": smoke_summary(rs)}
    elif device.startswith("cuda"):
        gpu = {"status": "real-size models not run (pass --gpu); the tiny-model figures above ran on CUDA"}
    else:
        gpu = {"status": "unmeasured (no GPU available to this session)"}

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "bench/mllm_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(args.torch_threads, device),
        "settings": {k: v for k, v in vars(args).items()},
        "inputs": inputs,
        "models": models,
        "captions": captions,
        "captions_full_batched": full,
        "preferences": prefs,
        "targets": {"captions": f">= {TARGET_RATIO:g}x items/s, batched vs one item at a time",
                    "preferences": f">= {TARGET_RATIO:g}x prompts/s, rounds batched across users vs a per-user loop"},
        "gpu": gpu,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    result["machine_shared_during_run"] = max(_loads_seen(result)) > (os.cpu_count() or 1) + 0.5
    (RESULTS / "mllm_bench.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (RESULTS / "mllm_bench.md").write_text(md)
    print(md)
    print(f"results: {RESULTS / 'mllm_bench.json'}, {RESULTS / 'mllm_bench.md'}")


if __name__ == "__main__":
    main()
