"""The DuckDB tables srec writes: one definition per table, shared by writers, readers and schemas.

Every table carries a ``category`` column (the Dagster partition); a materialization
replaces exactly its category's rows (see ``srec.db.replace_partition``).
"""
from __future__ import annotations

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
        train_seconds DOUBLE NOT NULL,
        device VARCHAR NOT NULL
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
