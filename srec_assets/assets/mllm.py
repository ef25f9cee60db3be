"""The MLLM stages: item images -> fused item captions (+ CLIP hallucination score) -> user preference summaries."""

from dataclasses import asdict

import dagster as dg
import pandas as pd

from resources import HallucinationScorer, ModelRunner, SrecStorage
from srec.captions import CaptionSettings, build_item_captions, caption_snapshot
from srec.db import partition_content_hash
from srec.images import ImageSettings, resolve_item_images
from srec.preferences import PREFERENCE_CONTENT_COLUMNS, PreferenceSettings, build_user_preferences  # noqa: F401
from srec.prompts import CAPTION_FUSED, CAPTION_TEXT_ONLY, PREFERENCE_DIRECT, PREFERENCE_FIRST_BLOCK, PREFERENCE_NEXT_BLOCK
from srec_assets.assets.ingest import raw_items
from srec_assets.assets.sequences import interactions
from srec_assets.partitions import category_config, category_partitions


def _md(frame: pd.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.to_markdown(index=False) if not frame.empty else "_none_")


@dg.asset(
    pool="duckdb",
    partitions_def=category_partitions,
    group_name="mllm",
    kinds={"duckdb", "pillow"},
    code_version="1",
    deps=[interactions, raw_items],
    description=(
        "Per item: its image from the source (local path, or URL through a content-addressed download cache), "
        "validated with Pillow, converted to RGB and downscaled; status ok / missing / invalid with the reason. "
        "Sources without images get deterministic placeholder images, marked synthetic."
    ),
)
def item_images(context: dg.AssetExecutionContext, storage: SrecStorage) -> dg.MaterializeResult:
    cfg = category_config(context)
    settings = ImageSettings.from_mapping(cfg.images)
    items_dir = (cfg.items or cfg.reviews).parent
    with storage.connect() as con:
        stats = resolve_item_images(con, cfg.name, items_dir=items_dir, settings=settings,
                                    cache_dir=storage.artifact_dir("images"))
        version = partition_content_hash(con, "item_images", cfg.name,
                                         ("item_id", "status", "reason", "source", "image_sha256"))
    reasons = pd.DataFrame(sorted(stats.reasons.items(), key=lambda kv: -kv[1]), columns=["reason", "items"])
    return dg.MaterializeResult(
        metadata={
            "items": stats.items,
            "ok": stats.ok,
            "missing": stats.missing,
            "invalid": stats.invalid,
            "synthetic": stats.synthetic,
            "synthetic_images": dg.MetadataValue.bool(stats.synthetic > 0),
            "downloaded": stats.downloaded,
            "download_cache_hits": stats.download_cache_hits,
            "reasons": _md(reasons),
            "settings": dg.MetadataValue.json(asdict(settings)),
        },
        data_version=dg.DataVersion(version),
    )


class ItemCaptionsConfig(dg.Config):
    chunk_size: int = 64                # items generated and committed per chunk: a killed run resumes from here
    max_description_chars: int = 600
    clip_scoring: bool = True           # CLIP image-caption cosine as the hallucination score


@dg.asset(
    pool="gpu",
    partitions_def=category_partitions,
    group_name="mllm",
    kinds={"duckdb", "transformers"},
    code_version="1",
    deps=[item_images, raw_items],
    description=(
        "One fused description per item from the captioner (image + title/description/brand/categories; text only "
        "when the image is missing or invalid), cached by (item content, model, prompt version, generation settings) "
        "and committed in chunks; CLIP image-caption cosine as the hallucination score."
    ),
)
def item_captions(
    context: dg.AssetExecutionContext,
    config: ItemCaptionsConfig,
    storage: SrecStorage,
    captioner: ModelRunner,
    hallucination_scorer: HallucinationScorer,
) -> dg.MaterializeResult:
    cfg = category_config(context)
    settings = CaptionSettings(chunk_size=config.chunk_size, max_description_chars=config.max_description_chars)
    with storage.connect() as con:
        stats = build_item_captions(
            con, cfg.name, captioner.generate, captioner.identity, settings,
            clip_score=hallucination_scorer.score if config.clip_scoring else None,
            clip_model=hallucination_scorer.model, run_id=context.run.run_id, progress=context.log.info,
        )
        samples = con.execute(
            "SELECT item_id, modality, image_synthetic, round(clip_score, 3) AS clip, left(caption, 160) AS caption "
            "FROM item_captions WHERE category = ? AND status = 'ok' ORDER BY hash(item_id) LIMIT 5",
            [cfg.name],
        ).fetch_df()
        clip = con.execute(
            "SELECT count(clip_score) AS scored, round(avg(clip_score), 4) AS mean, "
            "round(quantile_cont(clip_score, 0.1), 4) AS p10, round(median(clip_score), 4) AS median "
            "FROM item_captions WHERE category = ?",
            [cfg.name],
        ).fetch_df()
    return dg.MaterializeResult(
        metadata={
            "items": stats.items,
            "new": stats.new,
            "cached": stats.cached,
            "failed": stats.failed,
            "image_and_text": stats.with_image,
            "text_only": stats.text_only,
            "synthetic_images": stats.synthetic_images,
            "items_per_second": round(stats.items_per_second, 2),
            "generated_tokens": stats.generated_tokens,
            "chunks": stats.chunks,
            "caption_snapshot": stats.snapshot,
            "captioner": dg.MetadataValue.json(captioner.describe()),
            "prompt_versions": dg.MetadataValue.json({"fused": CAPTION_FUSED.version, "text_only": CAPTION_TEXT_ONLY.version}),
            "clip_model": hallucination_scorer.model if config.clip_scoring else "off",
            "clip_scores": _md(clip),
            "samples": _md(samples),
            "failures": dg.MetadataValue.json(stats.failures),
        },
        data_version=dg.DataVersion(stats.snapshot),
    )


def preference_modes(cfg, configured: list[str] | None) -> tuple[str, ...]:
    """The run config's modes, else those the category's recommender variants read (recurrent at least)."""
    if configured is not None:
        return tuple(configured)
    from srec.recommender.data import variant_needs  # noqa: PLC0415
    from srec.recommender.settings import RecommenderSettings  # noqa: PLC0415

    needs = variant_needs(RecommenderSettings.from_mapping(cfg.recommender).parsed_variants)
    return tuple(m for m in ("recurrent", "direct") if m in needs | {"recurrent"})


class UserPreferencesConfig(dg.Config):
    block_size: int = 3                            # MLLM-MSR: 3 items per recurrent block
    # 'recurrent' (MLLM-MSR) and/or 'direct' (one prompt over the whole history, the ablation). Default: the
    # modes the category's recommender variants read (no summaries nobody uses), recurrent at least.
    modes: list[str] | None = None
    chunk_size: int = 256                          # prompts generated and committed per chunk
    max_item_chars: int = 300
    train_targets: int = 1                         # summaries before each user's last N training positives (SFT)


@dg.asset(
    pool="gpu",
    partitions_def=category_partitions,
    group_name="mllm",
    kinds={"duckdb", "transformers"},
    code_version="1",
    deps=[item_captions, interactions, raw_items],
    description=(
        "Per user and eval target (valid, test): MLLM-MSR's recurrent preference summary over blocks of the history "
        "before the target (each block's prompt carries the previous summary), temporal-aware when timestamps exist, "
        "a direct one-prompt summary for the ablation, and a user profile; batched across users round by round."
    ),
)
def user_preferences(
    context: dg.AssetExecutionContext,
    config: UserPreferencesConfig,
    storage: SrecStorage,
    summariser: ModelRunner,
) -> dg.MaterializeResult:
    cfg = category_config(context)
    settings = PreferenceSettings(block_size=config.block_size, modes=preference_modes(cfg, config.modes),
                                  max_history=cfg.filtering.max_history, chunk_size=config.chunk_size,
                                  max_item_chars=config.max_item_chars, train_targets=config.train_targets)
    with storage.connect() as con:
        snapshot = caption_snapshot(con, cfg.name)
        stats = build_user_preferences(con, cfg.name, summariser.generate, summariser.identity, settings,
                                       caption_snapshot=snapshot, run_id=context.run.run_id,
                                       progress=context.log.info)
        samples = con.execute(
            "SELECT user_id, split, mode, blocks, left(profile, 120) AS profile, left(summary, 160) AS summary "
            "FROM user_preferences WHERE category = ? AND status = 'ok' ORDER BY hash(user_id), split, mode LIMIT 6",
            [cfg.name],
        ).fetch_df()
    return dg.MaterializeResult(
        metadata={
            **{k: v for k, v in asdict(stats).items() if isinstance(v, (int, float, str)) and k != "snapshot"},
            "preference_snapshot": stats.snapshot,   # = the DataVersion; its rows stay in preference_snapshots
            "caption_snapshot": snapshot,
            "summariser": dg.MetadataValue.json(summariser.describe()),
            "prompt_versions": dg.MetadataValue.json({t.name: t.version for t in (
                PREFERENCE_FIRST_BLOCK, PREFERENCE_NEXT_BLOCK, PREFERENCE_DIRECT)}),
            "settings": dg.MetadataValue.json(asdict(settings)),
            "samples": _md(samples),
        },
        data_version=dg.DataVersion(stats.snapshot),
    )
