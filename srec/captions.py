"""Fused item captions (MLLM-SRec's image + text fusion, MLLM-MSR's item summariser), cached and resumable.

Each item of the category gets one description from the captioner: the image and the item's text
when the image is usable, the text alone otherwise. A caption is determined by (item content, model,
prompt version, generation settings), so that tuple's hash is its key in ``caption_cache``: a
re-materialization generates only items whose key is new, and a killed run loses at most the chunk
in flight, because every chunk is committed as soon as it is generated.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb
import pandas as pd

from srec.db import ensure_tables, partition_content_hash, replace_partition, scalar_row
from srec.models.generation import GenerateFn, GenerationRequest, ModelIdentity
from srec.prompts import CAPTION_FUSED, CAPTION_TEXT_ONLY, item_text

ScoreFn = Callable[[list[str], list[str]], list[float]]  # (image paths, texts) -> cosine per pair


@dataclass(frozen=True)
class CaptionSettings:
    chunk_size: int = 64                # items generated and committed together (resume granularity)
    max_description_chars: int = 600


@dataclass
class CaptionStats:
    items: int = 0
    ok: int = 0
    failed: int = 0
    new: int = 0                        # generated in this call
    cached: int = 0                     # reused from caption_cache
    with_image: int = 0
    text_only: int = 0
    synthetic_images: int = 0
    chunks: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    clip_scored: int = 0
    snapshot: str = ""                  # content hash of the partition's captions: its DataVersion
    failures: dict[str, str] = field(default_factory=dict)  # item_id -> reason (first few)

    @property
    def items_per_second(self) -> float:
        return self.new / self.generate_seconds if self.generate_seconds > 0 else 0.0


def _sha(*parts: object) -> str:
    return hashlib.sha256("\x00".join("" if p is None else str(p) for p in parts).encode()).hexdigest()


def caption_inputs(con: duckdb.DuckDBPyConnection, category: str) -> pd.DataFrame:
    """One row per item of ``item_images`` (every item in interactions) with its text fields."""
    (n,) = scalar_row(con, "SELECT count(*) FROM item_images WHERE category = ?", [category])
    if n == 0:
        raise ValueError(f"item_images has no rows for category {category!r}: materialize item_images first")
    return con.execute(
        """
        SELECT i.item_id, r.title, r.description, r.brand, r.categories,
               i.status AS image_status, i.image_path, i.image_sha256, i.synthetic
        FROM item_images i LEFT JOIN raw_items r ON r.category = i.category AND r.item_id = i.item_id
        WHERE i.category = ? ORDER BY i.item_id
        """,
        [category],
    ).fetch_df()


def plan_captions(items: pd.DataFrame, identity: ModelIdentity, settings: CaptionSettings) -> pd.DataFrame:
    """Adds ``modality``, ``prompt``, ``prompt_version``, ``item_content_hash`` and ``cache_key`` per item."""
    df = items.copy()
    df["modality"] = ["image+text" if s == "ok" else "text" for s in df["image_status"]]
    fields = df[["title", "brand", "categories", "description"]].astype(object)
    fields = fields.where(fields.notna(), None)  # item_text leaves out absent fields, never prints 'None'/'nan'
    texts = [item_text(t, b, c, d, settings.max_description_chars) for t, b, c, d in fields.itertuples(index=False)]
    templates = [CAPTION_FUSED if m == "image+text" else CAPTION_TEXT_ONLY for m in df["modality"]]
    df["prompt"] = [t.render(item_text=x) for t, x in zip(templates, texts)]
    df["system"] = [t.system for t in templates]
    df["prompt_version"] = [t.version for t in templates]
    df["item_content_hash"] = [
        _sha(x, sha if m == "image+text" else None)[:32]
        for x, sha, m in zip(texts, df["image_sha256"], df["modality"])
    ]
    df["cache_key"] = [_sha(h, identity.key, v)[:32] for h, v in zip(df["item_content_hash"], df["prompt_version"])]
    return df


def _insert_cache(con: duckdb.DuckDBPyConnection, rows: pd.DataFrame) -> None:
    """Commit one chunk of generated captions (keys already present are left as they are)."""
    con.register("new_captions", rows)
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute(
            "INSERT INTO caption_cache BY NAME SELECT n.* FROM new_captions n "
            "ANTI JOIN caption_cache c ON c.cache_key = n.cache_key"
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("new_captions")


def _generate_chunk(generate: GenerateFn, chunk: pd.DataFrame) -> tuple[list, dict[str, str]]:
    """Results per row (None where it failed) and the failures' reasons; a failing batch is retried item by item."""
    requests = [GenerationRequest(prompt=p, image_path=(ip if m == "image+text" else None), system=s)
                for p, ip, m, s in zip(chunk["prompt"], chunk["image_path"], chunk["modality"], chunk["system"])]
    try:
        return list(generate(requests)), {}
    except Exception:  # noqa: BLE001 (one bad item must not cost the chunk: retry one at a time)
        results, failures = [], {}
        for item_id, req in zip(chunk["item_id"], requests):
            try:
                results.append(generate([req])[0])
            except Exception as e:  # noqa: BLE001
                results.append(None)
                failures[item_id] = f"{type(e).__name__}: {e}"[:300]
        return results, failures


def build_item_captions(
    con: duckdb.DuckDBPyConnection,
    category: str,
    generate: GenerateFn,
    identity: ModelIdentity,
    settings: CaptionSettings | None = None,
    *,
    clip_score: ScoreFn | None = None,
    clip_model: str | None = None,
    run_id: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> CaptionStats:
    """Caption every item of ``category`` not yet in ``caption_cache``; write the ``item_captions`` partition."""
    settings = settings or CaptionSettings()
    ensure_tables(con, ["caption_cache", "item_captions", "caption_snapshots"])
    plan = plan_captions(caption_inputs(con, category), identity, settings)
    stats = CaptionStats(items=len(plan))
    cached_keys = {r[0] for r in con.execute(
        "SELECT cache_key FROM caption_cache WHERE cache_key IN (SELECT unnest(?::VARCHAR[]))",
        [plan["cache_key"].unique().tolist()],
    ).fetchall()}
    todo = plan[~plan["cache_key"].isin(cached_keys)].drop_duplicates("cache_key")
    failures: dict[str, str] = {}
    generated_keys: set[str] = set()
    for start in range(0, len(todo), settings.chunk_size):
        chunk = todo.iloc[start:start + settings.chunk_size]
        t0 = time.perf_counter()
        results, chunk_failures = _generate_chunk(generate, chunk)
        stats.generate_seconds += time.perf_counter() - t0
        failures.update(chunk_failures)
        ok = [(row, r) for row, r in zip(chunk.itertuples(index=False), results) if r is not None]
        if ok:
            _insert_cache(con, pd.DataFrame({
                "cache_key": [row.cache_key for row, _ in ok],
                "category": category,
                "item_id": [row.item_id for row, _ in ok],
                "caption": [r.text for _, r in ok],
                "generated_tokens": [r.generated_tokens for _, r in ok],
                "model": identity.model,
                "model_fingerprint": identity.fingerprint,
                "prompt_version": [row.prompt_version for row, _ in ok],
                "generation": identity.generation_json,
                "run_id": run_id,
                "created_at": time.time(),
            }))
        generated_keys.update(row.cache_key for row, _ in ok)
        stats.chunks += 1
        stats.new += len(ok)
        stats.generated_tokens += sum(r.generated_tokens for _, r in ok)
        if progress:
            progress(f"caption chunk {stats.chunks} committed: {start + len(chunk)}/{len(todo)} items to generate")
    _write_captions(con, category, plan, failures, generated_keys, identity, clip_score, clip_model, stats)
    record_caption_snapshot(con, category, stats.snapshot, run_id)
    stats.failures = dict(list(failures.items())[:20])
    return stats


def _write_captions(con, category: str, plan: pd.DataFrame, failures: dict[str, str], generated_keys: set[str],
                    identity: ModelIdentity, clip_score: ScoreFn | None, clip_model: str | None,
                    stats: CaptionStats) -> None:
    cache = con.execute(
        "SELECT cache_key, caption, generated_tokens, run_id, created_at FROM caption_cache "
        "WHERE cache_key IN (SELECT unnest(?::VARCHAR[]))",
        [plan["cache_key"].unique().tolist()],
    ).fetch_df().set_index("cache_key")
    out = plan[["item_id", "modality", "item_content_hash", "cache_key", "prompt_version", "image_path",
                "synthetic"]].copy()
    out["caption"] = out["cache_key"].map(cache["caption"])
    out["generated_tokens"] = out["cache_key"].map(cache["generated_tokens"]).astype("Int32")
    out["status"] = ["ok" if pd.notna(c) else "failed" for c in out["caption"]]
    out["reason"] = [None if s == "ok" else failures.get(i, "not generated") for s, i in zip(out["status"], out["item_id"])]
    out["from_cache"] = (out["status"] == "ok") & ~out["cache_key"].isin(generated_keys)
    out["clip_score"] = pd.Series([None] * len(out), dtype="float64")
    scorable = (out["modality"] == "image+text") & (out["status"] == "ok")
    if clip_score is not None and scorable.any():
        scores = clip_score(out.loc[scorable, "image_path"].tolist(), out.loc[scorable, "caption"].tolist())
        out.loc[scorable, "clip_score"] = scores
        stats.clip_scored = int(scorable.sum())
    out["clip_model"] = clip_model if clip_score is not None else None
    out["clip_model"] = out["clip_model"].where(out["clip_score"].notna(), None)
    out["image_synthetic"] = out["synthetic"].fillna(False).astype(bool) & (out["modality"] == "image+text")
    out["model"] = identity.model
    out["model_fingerprint"] = identity.fingerprint
    out["generation"] = identity.generation_json
    out["category"] = category
    out = out.drop(columns=["image_path", "synthetic"])
    con.register("captions_out", out)
    try:
        replace_partition(con, "item_captions", category, "SELECT * FROM captions_out")
    finally:
        con.unregister("captions_out")
    stats.ok = int((out["status"] == "ok").sum())
    stats.failed = int((out["status"] == "failed").sum())
    stats.cached = int((out["from_cache"] & (out["status"] == "ok")).sum())
    stats.with_image = int((out["modality"] == "image+text").sum())
    stats.text_only = int((out["modality"] == "text").sum())
    stats.synthetic_images = int(out["image_synthetic"].sum())
    stats.snapshot = caption_snapshot(con, category)
    if stats.ok + stats.failed != stats.items:
        raise AssertionError(f"captions do not reconcile: {stats.ok} ok + {stats.failed} failed != {stats.items} items")


CAPTION_CONTENT_COLUMNS = ("item_id", "cache_key", "caption", "status", "modality")


def caption_snapshot(con: duckdb.DuckDBPyConnection, category: str) -> str:
    """Content hash of the category's captions: the snapshot id (and DataVersion) lineage refers to."""
    return partition_content_hash(con, "item_captions", category, CAPTION_CONTENT_COLUMNS)


def record_caption_snapshot(con: duckdb.DuckDBPyConnection, category: str, snapshot: str | None = None,
                            run_id: str | None = None) -> int:
    """Append the partition's item -> caption membership to ``caption_snapshots`` under ``snapshot`` (its
    current content hash, computed when not given), unless that snapshot is recorded already; returns the rows
    added (0 when it was).

    ``item_captions`` keeps only the latest snapshot; this table keeps every one, so the captions an older
    adapter was trained on can still be listed (their text stays in ``caption_cache`` by ``cache_key``).
    """
    ensure_tables(con, ["caption_snapshots"])
    snapshot = snapshot or caption_snapshot(con, category)
    before = scalar_row(con, "SELECT count(*) FROM caption_snapshots WHERE category = ? AND snapshot = ?",
                        [category, snapshot])[0]
    if before:
        return 0
    con.execute(
        """
        INSERT INTO caption_snapshots BY NAME
        SELECT category, ?::VARCHAR AS snapshot, item_id, cache_key, status, modality, model, model_fingerprint,
               prompt_version, ?::VARCHAR AS run_id, ?::DOUBLE AS recorded_at
        FROM item_captions WHERE category = ?
        """,
        [snapshot, run_id, time.time(), category],
    )
    return int(scalar_row(con, "SELECT count(*) FROM caption_snapshots WHERE category = ? AND snapshot = ?",
                          [category, snapshot])[0])
