"""The DuckDB tables srec writes: one definition per table, shared by writers, readers and schemas.

Every table carries a ``category`` column (the Dagster partition); a materialization
replaces exactly its category's rows (see ``srec.db.replace_partition``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TABLES: dict[str, str] = {
    # One row per interaction that survived ingest, in source order.
    "raw_reviews": """
        category VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,
        rating DOUBLE,               -- NULL where the source has no ratings
        timestamp BIGINT,            -- unix seconds UTC; NULL where the source has no times
        position BIGINT NOT NULL,    -- 0-based order in the source (file order, then order in line)
        source_file VARCHAR NOT NULL,
        source_line BIGINT NOT NULL  -- 1-based line (or record) number in source_file
    """,
    "raw_items": """
        category VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,
        title VARCHAR,
        description VARCHAR,
        brand VARCHAR,
        categories VARCHAR,          -- category paths joined: 'A > B > C | D > E'
        image_url VARCHAR,
        image_path VARCHAR,          -- local file, where the source provides one
        source_file VARCHAR NOT NULL,
        source_line BIGINT NOT NULL
    """,
    # Rows that ingest could not keep, with why. read = kept + quarantined, per table.
    "ingest_quarantine": """
        category VARCHAR NOT NULL,
        table_name VARCHAR NOT NULL, -- 'raw_reviews' or 'raw_items'
        source_file VARCHAR NOT NULL,
        source_line BIGINT NOT NULL,
        reason VARCHAR NOT NULL,     -- one of srec.ingest.QUARANTINE_REASONS
        detail VARCHAR,
        raw_text VARCHAR             -- the offending line, cut to 500 characters
    """,
    # Per source file: what ingest read and where it went. rows_read = rows_kept + rows_quarantined.
    "ingest_log": """
        category VARCHAR NOT NULL,
        table_name VARCHAR NOT NULL,
        source_file VARCHAR NOT NULL,
        source_sha256 VARCHAR NOT NULL,
        rows_read BIGINT NOT NULL,
        rows_kept BIGINT NOT NULL,
        rows_quarantined BIGINT NOT NULL
    """,
    # Deduplicated, labelled, k-cored interactions with the leave-one-out split.
    "interactions": """
        category VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,
        rating DOUBLE,
        timestamp BIGINT,
        position BIGINT NOT NULL,
        label TINYINT NOT NULL,      -- 1 positive, 0 explicit negative (low rating)
        seq_index INTEGER,           -- 0-based chronological index among the user's positives; NULL for negatives
        split VARCHAR NOT NULL       -- 'train' | 'valid' | 'test' (negatives: the window they fall in)
    """,
    # Each step from raw_reviews to interactions: rows_out = rows_in - dropped, nothing unaccounted.
    "interactions_funnel": """
        category VARCHAR NOT NULL,
        step_order INTEGER NOT NULL,
        step VARCHAR NOT NULL,       -- e.g. 'dedupe_user_item', 'drop_neutral', 'k_core'
        rows_in BIGINT NOT NULL,
        dropped BIGINT NOT NULL,
        rows_out BIGINT NOT NULL,
        detail VARCHAR
    """,
    # Seeded candidate sets, shared by every model. slot 0 holds the positive.
    "eval_candidates": """
        category VARCHAR NOT NULL,
        split VARCHAR NOT NULL,      -- 'valid' | 'test'
        protocol VARCHAR NOT NULL,   -- '1+20' | '1+99'
        user_id VARCHAR NOT NULL,
        slot INTEGER NOT NULL,
        item_id VARCHAR NOT NULL,
        is_positive BOOLEAN NOT NULL
    """,
    # Classic-model scores for every stored candidate.
    "baseline_scores": """
        category VARCHAR NOT NULL,
        model VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        protocol VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        slot INTEGER NOT NULL,
        item_id VARCHAR NOT NULL,
        score DOUBLE NOT NULL
    """,
    # Full ranking over all items (history excluded): where the target landed.
    "baseline_full_ranking": """
        category VARCHAR NOT NULL,
        model VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,    -- the target
        n_greater BIGINT NOT NULL,   -- non-history items scored strictly above the target
        n_ties BIGINT NOT NULL,      -- non-history items scored equal to the target
        n_negatives BIGINT NOT NULL  -- all non-history items other than the target
    """,
    "baseline_runs": """
        category VARCHAR NOT NULL,
        model VARCHAR NOT NULL,
        settings VARCHAR NOT NULL,   -- JSON of the hyper-parameters
        epochs_run INTEGER NOT NULL,
        best_epoch INTEGER NOT NULL,
        best_valid_ndcg10 DOUBLE,
        train_seconds DOUBLE NOT NULL,   -- of the run that trained it, when kept
        device VARCHAR NOT NULL,
        -- Added after the first release (NULL in rows from before; srec.db.add_missing_columns adds them):
        input_key VARCHAR,           -- what the results depend on (srec.baselines.run.baseline_key)
        trained_run_id VARCHAR,      -- the Dagster run that trained and scored it: an earlier one when kept
        trained_at DOUBLE            -- unix seconds, when it was trained
    """,
    # Per item of the category (every item in interactions): where its image came from and whether it is usable.
    "item_images": """
        category VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,
        status VARCHAR NOT NULL,     -- 'ok' | 'missing' | 'invalid'
        reason VARCHAR,              -- why not ok (NULL when ok)
        source VARCHAR NOT NULL,     -- 'path' | 'url' | 'placeholder' | 'none'
        source_ref VARCHAR,          -- the path or URL as the source gave it
        synthetic BOOLEAN NOT NULL,  -- TRUE: a placeholder srec rendered, not a real product image
        image_path VARCHAR,          -- the normalised RGB image (content-addressed file); NULL unless ok
        image_sha256 VARCHAR,        -- of the normalised file; NULL unless ok
        width INTEGER,
        height INTEGER,
        original_mode VARCHAR,       -- Pillow mode before conversion (CMYK, RGBA, P, I;16 ...)
        original_width INTEGER,
        original_height INTEGER
    """,
    # One fused description per item (the latest materialization's snapshot).
    "item_captions": """
        category VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,
        status VARCHAR NOT NULL,     -- 'ok' | 'failed'
        reason VARCHAR,              -- why failed (NULL when ok)
        caption VARCHAR,             -- NULL when failed
        modality VARCHAR NOT NULL,   -- 'image+text' | 'text' (image missing or invalid)
        from_cache BOOLEAN NOT NULL, -- TRUE: reused from caption_cache, not generated in this run
        item_content_hash VARCHAR NOT NULL,  -- title, description, brand, categories, image sha
        cache_key VARCHAR NOT NULL,  -- (item content hash, model, prompt version, generation settings)
        model VARCHAR NOT NULL,      -- model id or path as configured
        model_fingerprint VARCHAR NOT NULL,  -- hash of the model's config and weights files
        prompt_version VARCHAR NOT NULL,
        generation VARCHAR NOT NULL, -- JSON of the generation settings
        generated_tokens INTEGER,
        clip_score DOUBLE,           -- CLIP image-caption cosine (hallucination score); NULL without an image
        clip_model VARCHAR,
        image_synthetic BOOLEAN NOT NULL
    """,
    # Every caption ever generated, keyed by what determines it: re-materializing reuses these rows,
    # and a killed run resumes from the chunks it committed.
    "caption_cache": """
        cache_key VARCHAR NOT NULL,
        category VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,
        caption VARCHAR NOT NULL,
        generated_tokens INTEGER NOT NULL,
        model VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        prompt_version VARCHAR NOT NULL,
        generation VARCHAR NOT NULL,
        run_id VARCHAR,
        created_at DOUBLE NOT NULL   -- unix seconds
    """,
    # Per (user, target, mode): the preference summary over the history before that target. Targets: the valid
    # and test targets, and each user's last N training positives (split 'train': the SFT targets).
    "user_preferences": """
        category VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL,      -- 'train' | 'valid' | 'test': whose target the history precedes
        mode VARCHAR NOT NULL,       -- 'recurrent' (blocks, each prompt carries the previous summary) | 'direct'
        target_seq_index INTEGER NOT NULL,
        history_items INTEGER NOT NULL,       -- items the summary saw (most recent max_history)
        history_last_seq_index INTEGER NOT NULL,  -- always < target_seq_index (no leakage)
        history_item_ids VARCHAR NOT NULL,    -- JSON list, oldest first
        blocks INTEGER NOT NULL,     -- LLM calls chained for this summary (1 in direct mode)
        status VARCHAR NOT NULL,     -- 'ok' | 'failed'
        reason VARCHAR,
        summary VARCHAR,             -- NULL when failed
        profile VARCHAR NOT NULL,    -- user profile text computed from the same history
        history_hash VARCHAR NOT NULL,
        cache_key VARCHAR NOT NULL,  -- of the last block's summary
        from_cache BOOLEAN NOT NULL,
        model VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        prompt_version VARCHAR NOT NULL,
        caption_snapshot VARCHAR NOT NULL  -- DataVersion of the item_captions partition the prompts used
    """,
    # Every summary step ever generated (one row per block prompt), keyed by the chain that determines it.
    "preference_cache": """
        cache_key VARCHAR NOT NULL,
        category VARCHAR NOT NULL,
        summary VARCHAR NOT NULL,
        generated_tokens INTEGER NOT NULL,
        model VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        prompt_version VARCHAR NOT NULL,
        run_id VARCHAR,
        created_at DOUBLE NOT NULL   -- unix seconds
    """,
    # Append-only: which caption (cache_key) each item had in every caption snapshot ever materialized, so the
    # captions an old adapter was trained on stay answerable after item_captions is re-materialized (srec.lineage).
    "caption_snapshots": """
        category VARCHAR NOT NULL,
        snapshot VARCHAR NOT NULL,   -- item_captions DataVersion (srec.captions.caption_snapshot)
        item_id VARCHAR NOT NULL,
        cache_key VARCHAR NOT NULL,  -- the caption in caption_cache (none there when failed)
        status VARCHAR NOT NULL,     -- 'ok' | 'failed'
        modality VARCHAR NOT NULL,   -- 'image+text' | 'text'
        model VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        prompt_version VARCHAR NOT NULL,
        run_id VARCHAR,              -- the run whose item_captions materialization first recorded the snapshot
        recorded_at DOUBLE NOT NULL  -- unix seconds
    """,
    # Append-only: the preference summary (cache_key of its last block) of every row of every preference
    # snapshot ever materialized (the same, for user_preferences).
    "preference_snapshots": """
        category VARCHAR NOT NULL,
        snapshot VARCHAR NOT NULL,   -- user_preferences DataVersion (srec.preferences.preference_snapshot)
        user_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        mode VARCHAR NOT NULL,
        target_seq_index INTEGER NOT NULL,
        cache_key VARCHAR NOT NULL,  -- the last block's summary in preference_cache (none there when failed)
        status VARCHAR NOT NULL,     -- 'ok' | 'failed'
        model VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        prompt_version VARCHAR NOT NULL,
        caption_snapshot VARCHAR NOT NULL,  -- the caption snapshot the prompts read
        run_id VARCHAR,              -- the run whose user_preferences materialization first recorded the snapshot
        recorded_at DOUBLE NOT NULL  -- unix seconds
    """,
    # The recommender's supervised examples: per prompt style x training target x candidate, the exact
    # prompt (fitted to max_length) and the answer the loss is on.
    "sft_examples": """
        category VARCHAR NOT NULL,
        style VARCHAR NOT NULL,      -- prompt style: '<modality>+<preference>[+cot]'
        user_id VARCHAR NOT NULL,
        target_seq_index INTEGER NOT NULL,  -- the training target (a train positive); history is before it
        item_id VARCHAR NOT NULL,    -- the candidate: the target (label 1) or a negative (label 0)
        label TINYINT NOT NULL,
        label_source VARCHAR NOT NULL,  -- 'target' | 'low_rating' (explicit negative) | 'sampled'
        answer VARCHAR NOT NULL,     -- 'Yes.' | 'No.': the only tokens the loss covers
        prefix_text VARCHAR NOT NULL,   -- the user part as the chat template renders it (shared by candidates)
        suffix_text VARCHAR NOT NULL,   -- the candidate part and the assistant header
        image_path VARCHAR,          -- the candidate's image, when the style shows it
        reasoning VARCHAR,           -- chain-of-thought step (cot styles), by the base model
        history_kept INTEGER NOT NULL,
        history_dropped INTEGER NOT NULL,  -- oldest history lines dropped to fit max_length
        summary_cut BOOLEAN NOT NULL,   -- the summary's start was cut too
        prompt_tokens INTEGER NOT NULL, -- prefix + suffix + answer
        prompt_version VARCHAR NOT NULL,
        model VARCHAR NOT NULL,      -- the recommender whose tokenizer fitted the prompt
        model_fingerprint VARCHAR NOT NULL
    """,
    # What built a category's sft_examples: lora_adapter trains on those rows and must validate on prompts
    # built the same way (it checks; a different run config is an error, not a silent mismatch).
    "sft_example_settings": """
        category VARCHAR NOT NULL,
        settings VARCHAR NOT NULL,   -- JSON: RecommenderSettings.example_json(), data_seed, styles
        sft_examples_version VARCHAR NOT NULL,  -- the sft_examples content hash these settings produced
        built_at DOUBLE NOT NULL,    -- unix seconds
        -- Added after the first release (NULL in rows from before; srec.db.add_missing_columns adds them):
        input_key VARCHAR,           -- what the rows depend on (srec.recommender.pipeline.sft_input_key)
        stats VARCHAR,               -- JSON: the build's counts (SftStats), shown again when the rows are kept
        built_run_id VARCHAR         -- the Dagster run that built the rows
    """,
    # The MLLM recommender's P(yes) / (P(yes) + P(no)) for stored candidates: the columns of baseline_scores.
    "recommender_scores": """
        category VARCHAR NOT NULL,
        model VARCHAR NOT NULL,      -- 'LLM <adapter>:<style> @ <base model>' (+ '(tiny, random weights)')
        split VARCHAR NOT NULL,
        protocol VARCHAR NOT NULL,
        user_id VARCHAR NOT NULL,
        slot INTEGER NOT NULL,
        item_id VARCHAR NOT NULL,
        score DOUBLE NOT NULL
    """,
    # One row per scored variant: what produced the recommender_scores rows of that model name.
    "recommender_runs": """
        category VARCHAR NOT NULL,
        model VARCHAR NOT NULL,      -- as in recommender_scores
        variant VARCHAR NOT NULL,    -- '<adapter>:<style>'
        base_model VARCHAR NOT NULL,
        base_fingerprint VARCHAR NOT NULL,
        tiny_random_weights BOOLEAN NOT NULL,
        adapter_path VARCHAR,        -- NULL for zero-shot
        adapter_version VARCHAR,     -- the lora_adapter DataVersion it came from; NULL for zero-shot
        valid_auc DOUBLE,            -- best validation AUC in training (NULL for zero-shot)
        prompt_version VARCHAR NOT NULL,
        device VARCHAR NOT NULL,
        rows BIGINT NOT NULL,
        seconds DOUBLE NOT NULL,     -- scoring time (of the run that scored them, when reused)
        -- Added after the first release (NULL in rows from before; srec.db.add_missing_columns adds them):
        scoring_key VARCHAR,         -- what the scores depend on (srec.recommender.pipeline.scoring_key)
        scored_run_id VARCHAR,       -- the Dagster run that computed the scores: an earlier one when reused
        scored_at DOUBLE             -- unix seconds, when they were computed
    """,
    # One row per (lora_adapter materialization, variant): what the regression check compares.
    "lora_adapter_history": """
        category VARCHAR NOT NULL,
        version VARCHAR NOT NULL,    -- the adapter set's DataVersion (its folder under artifacts/lora_adapter)
        run_id VARCHAR,
        created_at DOUBLE NOT NULL,  -- unix seconds
        variant VARCHAR NOT NULL,
        valid_auc DOUBLE,            -- best validation AUC (valid 1+20)
        base_valid_auc DOUBLE,       -- the untrained base model's, same users
        best_epoch INTEGER NOT NULL  -- 0: no epoch beat the base model
    """,
    # One row per (lora_adapter materialization, gated variant): the promotion gate's decision and figures.
    "adapter_promotions": """
        category VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        decided_at DOUBLE NOT NULL,      -- unix seconds
        candidate_version VARCHAR NOT NULL,  -- the adapter just trained
        current_version VARCHAR,         -- the serving adapter it was compared with (NULL: none yet)
        variant VARCHAR NOT NULL,
        candidate_valid_auc DOUBLE NOT NULL,
        current_valid_auc DOUBLE,        -- the current adapter re-scored on the same validation candidates
        margin DOUBLE NOT NULL,          -- the candidate may be at most this much worse
        promoted BOOLEAN NOT NULL,       -- the whole set's decision (every gated variant must pass)
        reason VARCHAR NOT NULL
    """,
    "metric_report": """
        category VARCHAR NOT NULL,
        model VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        protocol VARCHAR NOT NULL,   -- '1+20' | '1+99' | 'full_ranking'
        metric VARCHAR NOT NULL,
        value DOUBLE NOT NULL,
        ci_low DOUBLE NOT NULL,
        ci_high DOUBLE NOT NULL,
        n_users BIGINT NOT NULL
    """,
}

PROTOCOLS_SAMPLED: dict[str, int] = {"1+20": 20, "1+99": 99}  # protocol -> number of negatives
FULL_RANKING = "full_ranking"


def create_table_sql(name: str) -> str:
    return f"CREATE TABLE IF NOT EXISTS {name} ({TABLES[name]})"


@dataclass(frozen=True)
class ColumnDef:
    name: str
    sql_type: str
    nullable: bool


def table_columns(table: str) -> list[ColumnDef]:
    """The columns of ``table`` as declared in ``TABLES``, in order."""
    body = re.sub(r"--[^\n]*", "", TABLES[table])
    cols = []
    for part in body.split(","):
        words = part.split()
        if words:
            cols.append(ColumnDef(words[0], words[1].upper(), "NOT NULL" not in " ".join(words[2:]).upper()))
    return cols
