"""Pandera schemas for every table, and chunked validate_partition."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pandera.errors as pe
import pytest

from srec.db import ensure_tables
from srec.schemas import SCHEMAS, normalize_frame, table_columns, validate_partition
from srec.tables import TABLES

SHA = "0" * 63 + "a"

# Two good rows per table, as (column -> values).
GOOD: dict[str, dict[str, list]] = {
    "raw_reviews": {
        "category": ["c", "c"], "user_id": ["A1YJEY40YUW4SE", "A60XNB876KYML"], "item_id": ["B004756YJA", "B0009P4PZC"],
        "rating": [5.0, None], "timestamp": [1_400_000_000, None], "position": [0, 1],
        "source_file": ["user_sequence.txt", "user_sequence.txt"], "source_line": [1, 2],
    },
    "raw_items": {
        "category": ["c", "c"], "item_id": ["B004756YJA", "B0009P4PZC"], "title": ["Lip balm", None],
        "description": [None, "x"], "brand": ["b", None], "categories": ["Beauty > Skin", None],
        "image_url": [None, "http://x/y.jpg"], "image_path": [None, None],
        "source_file": ["meta.json", "meta.json"], "source_line": [1, 2],
    },
    "ingest_quarantine": {
        "category": ["c", "c"], "table_name": ["raw_reviews", "raw_items"], "source_file": ["r.json", "m.json"],
        "source_line": [3, 9], "reason": ["rating_out_of_range", "unparseable_line"], "detail": ["rating 7", None],
        "raw_text": ['{"overall": 7}', "{"],
    },
    "ingest_log": {
        "category": ["c", "c"], "table_name": ["raw_reviews", "raw_items"], "source_file": ["r.json", "m.json"],
        "source_sha256": [SHA, SHA], "rows_read": [10, 5], "rows_kept": [9, 4], "rows_quarantined": [1, 1],
    },
    "interactions": {
        "category": ["c", "c"], "user_id": ["u", "u"], "item_id": ["a", "b"], "rating": [5.0, 1.0],
        "timestamp": [None, 5], "position": [0, 1], "label": [1, 0], "seq_index": [0, None], "split": ["train", "valid"],
    },
    "interactions_funnel": {
        "category": ["c", "c"], "step_order": [1, 2], "step": ["dedupe_user_item", "drop_neutral"],
        "rows_in": [10, 9], "dropped": [1, 0], "rows_out": [9, 9], "detail": [None, "x"],
    },
    "eval_candidates": {
        "category": ["c", "c"], "split": ["valid", "test"], "protocol": ["1+20", "1+99"], "user_id": ["u", "u"],
        "slot": [0, 99], "item_id": ["a", "b"], "is_positive": [True, False],
    },
    "baseline_scores": {
        "category": ["c", "c"], "model": ["sasrec", "sasrec"], "split": ["valid", "test"], "protocol": ["1+20", "1+99"],
        "user_id": ["u", "u"], "slot": [0, 99], "item_id": ["a", "b"], "score": [0.5, -3.0],
    },
    "baseline_full_ranking": {
        "category": ["c", "c"], "model": ["pop", "pop"], "split": ["valid", "test"], "user_id": ["u", "v"],
        "item_id": ["a", "b"], "n_greater": [0, 5], "n_ties": [3, 0], "n_negatives": [100, 5],
    },
    "baseline_runs": {
        "category": ["c", "c"], "model": ["pop", "sasrec"], "settings": ["{}", json.dumps({"lr": 0.001})],
        "epochs_run": [0, 20], "best_epoch": [0, 12], "best_valid_ndcg10": [None, 0.31],
        "train_seconds": [0.0, 12.5], "device": ["cpu", "cuda"],
        "input_key": ["k1", None], "trained_run_id": ["r1", None], "trained_at": [1.7e9, None],  # None: older srec
    },
    "metric_report": {
        "category": ["c", "c"], "model": ["pop", "pop"], "split": ["test", "test"],
        "protocol": ["1+99", "full_ranking"], "metric": ["hr@10", "ndcg@10"], "value": [0.34, 0.0068],
        "ci_low": [0.33, 0.006], "ci_high": [0.35, 0.0075], "n_users": [22363, 22363],
    },
    "item_images": {
        "category": ["c", "c"], "item_id": ["B004756YJA", "B0009P4PZC"], "status": ["ok", "invalid"],
        "reason": [None, "invalid image: truncated"], "source": ["placeholder", "path"],
        "source_ref": [None, "img/b.jpg"], "synthetic": [True, False], "image_path": ["/x/a.png", None],
        "image_sha256": [SHA, None], "width": [96, None], "height": [96, None], "original_mode": ["RGB", None],
        "original_width": [96, None], "original_height": [96, None],
    },
    "item_captions": {
        "category": ["c", "c"], "item_id": ["B004756YJA", "B0009P4PZC"], "status": ["ok", "failed"],
        "reason": [None, "RuntimeError: x"], "caption": ["A lip balm.", None], "modality": ["image+text", "text"],
        "from_cache": [True, False], "item_content_hash": ["h1", "h2"], "cache_key": ["k1", "k2"],
        "model": ["m", "m"], "model_fingerprint": ["f", "f"], "prompt_version": ["caption_fused/v1+ab", "caption_text_only/v1+cd"],
        "generation": ['{"max_new_tokens": 24}'] * 2, "generated_tokens": [5, None], "clip_score": [0.27, None],
        "clip_model": ["clip", None], "image_synthetic": [True, False],
    },
    "caption_cache": {
        "cache_key": ["k1", "k3"], "category": ["c", "c"], "item_id": ["B004756YJA", "B0009P4PZC"],
        "caption": ["A lip balm.", ""], "generated_tokens": [5, 0], "model": ["m", "m"], "model_fingerprint": ["f", "f"],
        "prompt_version": ["caption_fused/v1+ab"] * 2, "generation": ["{}", "{}"], "run_id": ["r", None],
        "created_at": [1.7e9, 1.7e9],
    },
    "user_preferences": {
        "category": ["c", "c"], "user_id": ["u", "u"], "split": ["valid", "test"], "mode": ["recurrent", "direct"],
        "target_seq_index": [5, 6], "history_items": [5, 6], "history_last_seq_index": [4, 5],
        "history_item_ids": ['["a"]', '["a"]'], "blocks": [2, 1], "status": ["ok", "failed"], "reason": [None, "x"],
        "summary": ["Likes lip care.", None], "profile": ["User profile: 5 purchases.", "User profile: 6 purchases."],
        "history_hash": ["h", "h2"], "cache_key": ["k", "k2"], "from_cache": [False, False], "model": ["m", "m"],
        "model_fingerprint": ["f", "f"], "prompt_version": ["p", "p"], "caption_snapshot": ["s", "s"],
    },
    "preference_cache": {
        "cache_key": ["k", "k3"], "category": ["c", "c"], "summary": ["Likes lip care.", "x"], "generated_tokens": [4, 1],
        "model": ["m", "m"], "model_fingerprint": ["f", "f"], "prompt_version": ["p", "p"], "run_id": [None, "r"],
        "created_at": [1.7e9, 1.7e9],
    },
    "caption_snapshots": {
        "category": ["c", "c"], "snapshot": ["s1", "s1"], "item_id": ["B004756YJA", "B0009P4PZC"],
        "cache_key": ["k1", "k2"], "status": ["ok", "failed"], "modality": ["image+text", "text"],
        "model": ["m", "m"], "model_fingerprint": ["f", "f"],
        "prompt_version": ["caption_fused/v1+ab", "caption_text_only/v1+cd"], "run_id": ["r", None],
        "recorded_at": [1.7e9, 1.7e9],
    },
    "preference_snapshots": {
        "category": ["c", "c"], "snapshot": ["p1", "p1"], "user_id": ["u", "u"], "split": ["train", "test"],
        "mode": ["recurrent", "direct"], "target_seq_index": [4, 6], "cache_key": ["k", "k2"],
        "status": ["ok", "failed"], "model": ["m", "m"], "model_fingerprint": ["f", "f"],
        "prompt_version": ["p", "p"], "caption_snapshot": ["s1", "s1"], "run_id": ["r", None],
        "recorded_at": [1.7e9, 1.7e9],
    },
    "sft_examples": {
        "category": ["c", "c"], "style": ["fused+recurrent"] * 2, "user_id": ["u", "u"], "target_seq_index": [4, 4],
        "item_id": ["B004756YJA", "B0009P4PZC"], "label": [1, 0], "label_source": ["target", "sampled"],
        "answer": ["Yes.", "No."], "prefix_text": ["<s><|system|>...", "<s><|system|>..."],
        "suffix_text": ["Candidate item:...", "Candidate item:..."], "image_path": ["/i/a.png", None],
        "reasoning": [None, None], "history_kept": [3, 3], "history_dropped": [0, 0], "summary_cut": [False, False],
        "prompt_tokens": [310, 305], "prompt_version": ["p", "p"], "model": ["m", "m"], "model_fingerprint": ["f", "f"],
    },
    "recommender_scores": {
        "category": ["c", "c"], "model": ["LLM lora:fused+recurrent @ m"] * 2, "split": ["test", "test"],
        "protocol": ["1+20", "1+20"], "user_id": ["u", "u"], "slot": [0, 1], "item_id": ["B004756YJA", "B0009P4PZC"],
        "score": [0.61, 0.2],
    },
    "sft_example_settings": {
        "category": ["c", "d"], "settings": ['{"history_items": 20}', '{"history_items": 10}'],
        "sft_examples_version": ["v1", "v2"], "built_at": [1.7e9, 1.8e9],
        "input_key": ["k1", None], "stats": ['{"rows": 2}', None], "built_run_id": ["r1", None],  # None: older srec
    },
    "recommender_runs": {
        "category": ["c", "c"], "model": ["LLM lora:fused+recurrent @ m", "LLM zero-shot:fused+recurrent @ m"],
        "variant": ["lora:fused+recurrent", "zero-shot:fused+recurrent"], "base_model": ["m", "m"],
        "base_fingerprint": ["f", "f"], "tiny_random_weights": [True, True], "adapter_path": ["/a/x", None],
        "adapter_version": ["v1", None], "valid_auc": [0.55, None], "prompt_version": ["p", "p"],
        "device": ["cpu", "cpu"], "rows": [21, 21], "seconds": [1.5, 1.2],
        "scoring_key": ["k1", None], "scored_run_id": ["r1", None], "scored_at": [1.7e9, None],  # None: older srec
    },
    "lora_adapter_history": {
        "category": ["c", "c"], "version": ["v1", "v2"], "run_id": ["r1", "r2"], "created_at": [1.7e9, 1.8e9],
        "variant": ["lora:fused+recurrent"] * 2, "valid_auc": [0.55, 0.56], "base_valid_auc": [0.5, 0.5],
        "best_epoch": [2, 0],
    },
    "adapter_promotions": {
        "category": ["c", "c"], "run_id": ["r1", "r2"], "decided_at": [1.7e9, 1.8e9],
        "candidate_version": ["v1", "v2"], "current_version": [None, "v1"], "variant": ["lora:fused+recurrent"] * 2,
        "candidate_valid_auc": [0.55, 0.52], "current_valid_auc": [None, 0.55], "margin": [0.0, 0.01],
        "promoted": [True, False], "reason": ["first adapter", "worse by 0.03 > margin 0.01"],
    },
}

# table -> (column, bad value, row, check name expected in the failure cases)
BROKEN: dict[str, list[tuple[str, object, int, str]]] = {
    "raw_reviews": [("rating", 6.0, 0, "in_range"), ("timestamp", 1_400_000_000_000, 0, "less_than"),
                    ("user_id", "", 1, "non_empty_string")],
    "raw_items": [("item_id", "", 1, "non_empty_string"), ("source_line", 0, 0, "greater_than_or_equal_to")],
    "ingest_quarantine": [("reason", "bogus", 0, "isin_quarantine_reasons"), ("table_name", "x", 1, "isin"),
                          ("raw_text", "x" * 501, 0, "max_length_500")],
    "ingest_log": [("rows_kept", 8, 0, "rows_read_eq_kept_plus_quarantined"), ("source_sha256", "XYZ", 1, "str_matches")],
    "interactions": [("split", "holdout", 0, "isin"), ("label", 2, 1, "isin"),
                     ("seq_index", 3, 1, "seq_index_null_iff_negative")],
    "interactions_funnel": [("rows_out", 8, 0, "rows_out_eq_rows_in_minus_dropped"), ("dropped", -1, 1, "greater_than")],
    "eval_candidates": [("protocol", "1+50", 0, "isin"), ("is_positive", True, 1, "positive_iff_slot_0"),
                        ("split", "train", 0, "isin")],
    "baseline_scores": [("score", np.inf, 0, "finite"), ("score", np.nan, 1, "not_nullable"),
                        ("slot", 50, 0, "slot_within_protocol")],
    "baseline_full_ranking": [("n_ties", 101, 0, "greater_plus_ties_le_negatives"), ("n_greater", -1, 1, "greater_than")],
    "baseline_runs": [("settings", "lr=3", 1, "json_object"), ("best_epoch", 30, 1, "best_epoch_le_epochs_run"),
                      ("best_valid_ndcg10", 1.5, 1, "in_range")],
    "metric_report": [("value", 0.5, 0, "ci_low_le_value_le_ci_high"), ("protocol", "1+10", 1, "isin"),
                      ("n_users", 0, 0, "greater_than_or_equal_to")],
    "item_images": [("status", "broken", 0, "isin"), ("image_path", None, 0, "image_path_iff_ok"),
                    ("reason", "x", 0, "reason_iff_not_ok")],
    "item_captions": [("modality", "audio", 0, "isin"), ("caption", None, 0, "caption_iff_ok"),
                      ("clip_score", 1.5, 0, "in_range"), ("generation", "x", 1, "json_object")],
    "sft_example_settings": [("settings", "history_items=20", 1, "json_object"), ("built_at", np.inf, 0, "finite")],
    "user_preferences": [("history_last_seq_index", 5, 0, "history_before_target"), ("mode", "x", 1, "isin"),
                         ("summary", None, 0, "summary_iff_ok")],
}


def frame_via_duckdb(table: str, data: dict[str, list]) -> pd.DataFrame:
    con = duckdb.connect()
    ensure_tables(con, [table])
    df = pd.DataFrame(data)
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM df")
    out = con.execute(f"SELECT * FROM {table}").fetch_df()
    con.close()
    return out


def test_every_table_has_a_schema_matching_its_columns():
    assert set(SCHEMAS) == set(TABLES)
    for table, schema in SCHEMAS.items():
        assert list(schema.columns) == [c.name for c in table_columns(table)]
        assert schema.strict is True and schema.coerce is False
        assert set(GOOD[table]) == set(schema.columns)


@pytest.mark.parametrize("table", list(TABLES))
def test_good_frame_passes(table):
    df = frame_via_duckdb(table, GOOD[table])
    SCHEMAS[table].validate(df, lazy=True)


@pytest.mark.parametrize("table,column,value,row,check", [(t, *b) for t, bs in BROKEN.items() for b in bs])
def test_broken_frame_is_rejected_with_its_failure_case(table, column, value, row, check):
    df = frame_via_duckdb(table, GOOD[table])
    df[column] = df[column].astype(object) if isinstance(value, str) and df[column].dtype != object else df[column]
    df.loc[row, column] = value
    with pytest.raises(pe.SchemaErrors) as err:
        SCHEMAS[table].validate(df, lazy=True)
    fc = err.value.failure_cases
    hits = fc[fc["check"].astype(str).str.contains(check)]
    assert len(hits), fc.to_string()
    assert row in set(hits["index"].dropna().astype(int)), fc.to_string()


def test_strict_columns_and_dtypes():
    df = frame_via_duckdb("eval_candidates", GOOD["eval_candidates"])
    extra = df.assign(score=1.0)
    with pytest.raises(pe.SchemaErrors) as err:
        SCHEMAS["eval_candidates"].validate(extra, lazy=True)
    assert "column_in_schema" in set(err.value.failure_cases["check"])
    with pytest.raises(pe.SchemaErrors) as err:
        SCHEMAS["eval_candidates"].validate(df.drop(columns=["slot"]), lazy=True)
    assert "column_in_dataframe" in set(err.value.failure_cases["check"])
    with pytest.raises(pe.SchemaErrors) as err:  # no coercion: a float slot is a type error
        SCHEMAS["eval_candidates"].validate(df.assign(slot=df.slot.astype(float)), lazy=True)
    assert any("dtype" in str(c) for c in err.value.failure_cases["check"])


def test_normalize_frame_restores_nullable_integers():
    df = frame_via_duckdb("interactions", GOOD["interactions"])
    arrowish = df.assign(seq_index=[0.0, np.nan], timestamp=[np.nan, 5.0])
    out = normalize_frame("interactions", arrowish)
    assert str(out.seq_index.dtype) == "Int32" and str(out.timestamp.dtype) == "Int64"
    SCHEMAS["interactions"].validate(out, lazy=True)
    fractional = df.assign(seq_index=[0.5, np.nan])  # not an integer column: left for the schema to reject
    assert normalize_frame("interactions", fractional).seq_index.dtype == float


# --- validate_partition ---------------------------------------------------------------------------

@pytest.fixture
def con():
    c = duckdb.connect()
    c.execute("SET enable_progress_bar = false")
    ensure_tables(c)
    yield c
    c.close()


def _insert_candidates(con, category: str, n_users: int) -> None:
    rows = []
    for u in range(n_users):
        for slot in range(21):
            rows.append((category, "test", "1+20", f"u{u:03d}", slot, f"i{(u + slot) % 500:03d}", slot == 0))
    df = pd.DataFrame(rows, columns=["category", "split", "protocol", "user_id", "slot", "item_id", "is_positive"])
    con.execute("INSERT INTO eval_candidates BY NAME SELECT * FROM df")


def test_validate_partition_passes_good_rows(con):
    _insert_candidates(con, "c", 10)
    out = validate_partition(con, "eval_candidates", "c", chunk_rows=50)
    assert out.passed and out.n_rows == 210 and out.n_failures == 0 and out.failure_cases.empty


def test_validate_partition_finds_a_failure_in_a_later_chunk(con):
    _insert_candidates(con, "c", 10)
    _insert_candidates(con, "other", 3)  # other categories are not read
    # Row 30 (0-based, insertion order) is user u001's slot 9: in the 2nd chunk of 25 rows.
    con.execute("UPDATE eval_candidates SET protocol = '1+7' WHERE category = 'c' AND user_id = 'u001' AND slot = 9")
    con.execute("UPDATE eval_candidates SET protocol = '1+7' WHERE category = 'other' AND user_id = 'u000'")
    out = validate_partition(con, "eval_candidates", "c", chunk_rows=25)
    assert not out.passed and out.n_rows == 210
    fc = out.failure_cases
    assert list(fc.columns) == ["column", "check", "failure_case", "index"]
    bad = fc[fc.column == "protocol"]
    assert bad["index"].tolist() == [30] and bad["failure_case"].tolist() == ["1+7"]
    # the wide check (slot <= k of the protocol) also fails for the unknown protocol, reported once per row
    wide = fc[fc.check == "slot_within_protocol"]
    assert wide["index"].tolist() == [30] and wide.column.iloc[0] == "protocol,slot"
    assert out.n_failures == len(fc) == 2


def test_validate_partition_checks_uniqueness_across_chunks(con):
    _insert_candidates(con, "c", 10)
    # the same (user, split, protocol, slot) again, far away in insertion order (another chunk)
    con.execute("INSERT INTO eval_candidates VALUES ('c', 'test', '1+20', 'u000', 5, 'zzz', false)")
    out = validate_partition(con, "eval_candidates", "c", chunk_rows=20)
    assert not out.passed and out.n_failures == 1
    row = out.failure_cases.iloc[0]
    assert row.check == "unique(user_id, split, protocol, slot)"
    assert "user_id=u000" in row.failure_case and "(2 rows)" in row.failure_case


def test_validate_partition_caps_failure_cases_but_counts_all(con):
    _insert_candidates(con, "c", 10)
    con.execute("UPDATE eval_candidates SET split = 'train' WHERE category = 'c'")
    out = validate_partition(con, "eval_candidates", "c", chunk_rows=64)
    assert out.n_failures == 210 and len(out.failure_cases) == 50 and not out.passed


def test_validate_partition_empty_or_missing_is_a_failure(con):
    out = validate_partition(con, "eval_candidates", "nothing")
    assert not out.passed and out.n_rows == 0 and out.failure_cases.check.tolist() == ["no rows"]
    fresh = duckdb.connect()
    out = validate_partition(fresh, "metric_report", "c")
    assert not out.passed and "does not exist" in out.failure_cases.failure_case.iloc[0]
    with pytest.raises(ValueError):
        validate_partition(con, "no_such_table", "c")


def test_validate_partition_nullable_integers_through_arrow(con):
    df = pd.DataFrame(GOOD["interactions"])
    con.execute("INSERT INTO interactions BY NAME SELECT * FROM df")
    for chunk_rows in (1, 2, 1000):  # chunks with and without NULLs in the nullable integer columns
        out = validate_partition(con, "interactions", "c", chunk_rows=chunk_rows)
        assert out.passed, out.failure_cases


def test_validate_partition_after_a_fetchone(con):
    """A caller's unfinished execute() result must not break the streaming read."""
    _insert_candidates(con, "c", 2)
    con.execute("SELECT * FROM eval_candidates").fetchone()
    assert validate_partition(con, "eval_candidates", "c").passed


def test_validate_partition_on_pipeline_output(con):
    from pathlib import Path

    from srec.candidates import draw_eval_candidates
    from srec.config import FilterSettings
    from srec.sequences import build_interactions

    path = Path("/work/shared/data/amazon-beauty/user_sequence.txt")
    lines = [ln.split() for ln, _ in zip(open(path), range(150))]
    users = [p[0] for p in lines for _ in p[1:]]
    items = [i for p in lines for i in p[1:]]
    raw = pd.DataFrame({"user_id": users, "item_id": items, "position": range(len(users))})
    con.execute("INSERT INTO raw_reviews SELECT 'b', user_id, item_id, NULL, NULL, position, 'f', position + 1 FROM raw")
    build_interactions(con, "b", FilterSettings(user_k_core=5, item_k_core=1))
    draw_eval_candidates(con, "b", seed=1)
    for table in ("raw_reviews", "interactions", "interactions_funnel", "eval_candidates"):
        out = validate_partition(con, table, "b", chunk_rows=5000)
        assert out.passed, (table, out.failure_cases)
