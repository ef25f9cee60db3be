"""Pandera schemas for every table in ``srec.tables.TABLES``, and chunked validation of a partition.

Column names, dtypes and nullability are derived from the table definitions themselves (so a
schema cannot drift from its table); each table adds value checks on top. Schemas are strict on
columns and never coerce. Dtypes are those DuckDB hands pandas: ``VARCHAR`` -> ``object``,
``BIGINT``/``INTEGER``/``TINYINT`` -> ``int64``/``int32``/``int8`` (pandas ``Int64``/``Int32``/``Int8``
for nullable columns, which pandera also accepts as the numpy dtype when a chunk happens to hold
no NULL), ``DOUBLE`` -> ``float64``, ``BOOLEAN`` -> ``bool``. ``normalize_frame`` brings a frame
read any other way (e.g. through Arrow, which turns nullable integers into float) to those dtypes.

Constraints that span rows (one row per key) cannot be checked chunk by chunk; ``validate_partition``
checks them in SQL over the whole partition and reports them as failure cases alongside pandera's.
"""
from __future__ import annotations

import copy

import json
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd
import pandera.errors as pa_errors
import pandera.pandas as pa

from srec.config import FilterSettings
from srec.db import table_exists
from srec.tables import FULL_RANKING, PROTOCOLS_SAMPLED, TABLES, ColumnDef
from srec.tables import table_columns as declared_columns

# Copy of srec.ingest.QUARANTINE_REASONS, used when that module cannot be imported.
_QUARANTINE_REASONS_FALLBACK = (
    "unparseable_line", "invalid_utf8", "empty_line", "missing_user", "missing_item",
    "rating_not_a_number", "rating_out_of_range", "missing_rating", "unusable_timestamp", "duplicate",
)
SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")
INGEST_TABLES = ("raw_reviews", "raw_items")
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01 in unix seconds: larger values are milliseconds, not seconds
MAX_FAILURE_CASES = 50
FAILURE_COLUMNS = ["column", "check", "failure_case", "index"]

# One row per key, checked in SQL over the whole partition: (key columns, extra WHERE clause).
UNIQUE_KEYS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "raw_reviews": [(("source_file", "position"), "")],
    "raw_items": [(("item_id",), "")],
    "ingest_quarantine": [],
    "ingest_log": [(("table_name", "source_file"), "")],
    "interactions": [(("user_id", "item_id"), ""), (("user_id", "seq_index"), "seq_index IS NOT NULL")],
    "interactions_funnel": [(("step_order",), "")],
    "eval_candidates": [
        (("user_id", "split", "protocol", "slot"), ""),
        (("user_id", "split", "protocol", "item_id"), ""),
    ],
    "baseline_scores": [(("model", "split", "protocol", "user_id", "slot"), "")],
    "baseline_full_ranking": [(("model", "split", "user_id"), "")],
    "baseline_runs": [(("model",), "")],
    "metric_report": [(("model", "split", "protocol", "metric"), "")],
    "item_images": [(("item_id",), "")],
    "item_captions": [(("item_id",), "")],
    "caption_cache": [(("cache_key",), "")],
    "user_preferences": [(("user_id", "split", "mode", "target_seq_index"), ""),
                         (("user_id", "split", "mode"), "split <> 'train'")],
    "preference_cache": [(("cache_key",), "")],
    "caption_snapshots": [(("snapshot", "item_id"), "")],
    "preference_snapshots": [(("snapshot", "user_id", "split", "mode", "target_seq_index"), "")],
    "sft_examples": [(("style", "user_id", "target_seq_index", "item_id"), "")],
    "recommender_scores": [(("model", "split", "protocol", "user_id", "slot"), "")],
    "sft_example_settings": [(("sft_examples_version",), "")],
    "recommender_runs": [(("model",), "")],
    "lora_adapter_history": [(("version", "variant", "run_id"), "")],
    "adapter_promotions": [(("run_id", "variant"), "")],
}
IMAGE_STATUSES = ("ok", "missing", "invalid")
IMAGE_SOURCES = ("path", "url", "placeholder", "none")
CAPTION_MODALITIES = ("image+text", "text")
PREFERENCE_MODES = ("recurrent", "direct")


def quarantine_reasons() -> tuple[str, ...]:
    """``srec.ingest.QUARANTINE_REASONS`` if importable, else the copy kept here."""
    try:
        from srec.ingest import QUARANTINE_REASONS  # noqa: PLC0415 (lazy: ingest may import this module)
    except ImportError:
        return _QUARANTINE_REASONS_FALLBACK
    return tuple(QUARANTINE_REASONS)


# --- column types from the table definitions -----------------------------------------------------

_NOT_NULL_DTYPES = {"VARCHAR": "object", "BIGINT": "int64", "INTEGER": "int32", "TINYINT": "int8",
                    "DOUBLE": "float64", "BOOLEAN": "bool"}
_NULLABLE_DTYPES = {"VARCHAR": "object", "BIGINT": pd.Int64Dtype(), "INTEGER": pd.Int32Dtype(),
                    "TINYINT": pd.Int8Dtype(), "DOUBLE": "float64", "BOOLEAN": pd.BooleanDtype()}


def table_columns(table: str) -> list[ColumnDef]:
    """The columns of ``table`` as declared in ``srec.tables.TABLES``, in order (types srec.schemas maps)."""
    cols = declared_columns(table)
    for c in cols:
        if c.sql_type not in _NOT_NULL_DTYPES:
            raise ValueError(f"table {table}: column {c.name} has type {c.sql_type}, which srec.schemas does not map")
    return cols


def _dtype(col: ColumnDef):
    return (_NULLABLE_DTYPES if col.nullable else _NOT_NULL_DTYPES)[col.sql_type]


def normalize_frame(table: str, df: pd.DataFrame) -> pd.DataFrame:
    """Give nullable integer/boolean columns the pandas nullable dtype (as DuckDB's ``fetch_df`` does).

    Only integer-valued floats (Arrow's rendering of a nullable integer column) and numpy integers
    are converted; anything else is left for the schema to reject.
    """
    out = df
    for col in table_columns(table):
        if not col.nullable or col.name not in df.columns or col.sql_type in ("VARCHAR", "DOUBLE"):
            continue
        s = df[col.name]
        target = _dtype(col)
        if s.dtype == target:
            continue
        convertible = pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype)
        if pd.api.types.is_float_dtype(s.dtype):
            v = s.to_numpy()
            finite = v[~np.isnan(v)]
            convertible = col.sql_type != "BOOLEAN" and bool(np.all(finite == np.round(finite)))
        if convertible:
            if out is df:
                out = df.copy()
            out[col.name] = s.astype(target)
    return out


# --- checks --------------------------------------------------------------------------------------

# Row-wise (multi-column) checks: name -> the columns it involves (used to report failures compactly).
WIDE_CHECK_COLUMNS: dict[str, tuple[str, ...]] = {}


def _wide(name: str, columns: tuple[str, ...], fn) -> pa.Check:
    """A DataFrame-level check on ``columns``; all-pass when a column is missing (reported elsewhere)."""
    WIDE_CHECK_COLUMNS[name] = columns

    def check(df: pd.DataFrame):
        if any(c not in df.columns for c in columns):
            return pd.Series(True, index=df.index)
        return fn(df)

    return pa.Check(check, name=name, ignore_na=False)


def _all_str(s: pd.Series) -> bool:
    """True when every value is a ``str`` (a fast C loop; None/NaN make it False)."""
    return pd.api.types.infer_dtype(s, skipna=False) in ("string", "empty")


def _non_empty_str() -> pa.Check:
    def check(s: pd.Series) -> pd.Series:
        if _all_str(s):
            return pd.Series(s.to_numpy() != "", index=s.index)
        return s.map(lambda v: isinstance(v, str) and v != "")

    return pa.Check(check, name="non_empty_string")


def _is_str() -> pa.Check:
    def check(s: pd.Series) -> pd.Series:
        if _all_str(s):
            return pd.Series(True, index=s.index)
        return s.map(lambda v: isinstance(v, str))

    return pa.Check(check, name="is_string")


def _finite() -> pa.Check:
    return pa.Check(lambda s: pd.Series(np.isfinite(s.to_numpy(dtype=float)), index=s.index), name="finite")


def _is_json_object() -> pa.Check:
    def ok(v) -> bool:
        try:
            return isinstance(json.loads(v), dict)
        except (TypeError, ValueError):
            return False

    return pa.Check(lambda s: s.map(ok), name="json_object")


def _max_len(n: int) -> pa.Check:
    return pa.Check(lambda s: s.map(lambda v: isinstance(v, str) and len(v) <= n), name=f"max_length_{n}")


def _value_checks(settings: FilterSettings) -> dict[str, dict[str, list[pa.Check]]]:
    rating = [pa.Check.in_range(settings.rating_min, settings.rating_max)]
    timestamp = [pa.Check.ge(0), pa.Check.lt(MAX_TIMESTAMP)]
    eval_split = [pa.Check.isin(list(EVAL_SPLITS))]
    sampled = [pa.Check.isin(list(PROTOCOLS_SAMPLED))]
    k_max = max(PROTOCOLS_SAMPLED.values())
    unit = [pa.Check.in_range(0.0, 1.0)]
    return {
        "raw_reviews": {
            "user_id": [_non_empty_str()], "item_id": [_non_empty_str()], "rating": rating,
            "timestamp": timestamp, "position": [pa.Check.ge(0)], "source_file": [_non_empty_str()],
            "source_line": [pa.Check.ge(1)],
        },
        "raw_items": {
            "item_id": [_non_empty_str()], "source_file": [_non_empty_str()], "source_line": [pa.Check.ge(1)],
        },
        "ingest_quarantine": {
            "table_name": [pa.Check.isin(list(INGEST_TABLES))], "source_file": [_non_empty_str()],
            "source_line": [pa.Check.ge(1)],
            "reason": [pa.Check(lambda s: s.isin(quarantine_reasons()), name="isin_quarantine_reasons")],
            "raw_text": [_max_len(500)],
        },
        "ingest_log": {
            "table_name": [pa.Check.isin(list(INGEST_TABLES))], "source_file": [_non_empty_str()],
            "source_sha256": [pa.Check.str_matches(r"^[0-9a-f]{64}$")],
            "rows_read": [pa.Check.ge(0)], "rows_kept": [pa.Check.ge(0)], "rows_quarantined": [pa.Check.ge(0)],
        },
        "interactions": {
            "user_id": [_non_empty_str()], "item_id": [_non_empty_str()], "rating": rating,
            "timestamp": timestamp, "position": [pa.Check.ge(0)], "label": [pa.Check.isin([0, 1])],
            "seq_index": [pa.Check.ge(0)], "split": [pa.Check.isin(list(SPLITS))],
        },
        "interactions_funnel": {
            "step_order": [pa.Check.ge(0)], "step": [_non_empty_str()], "rows_in": [pa.Check.ge(0)],
            "dropped": [pa.Check.ge(0)], "rows_out": [pa.Check.ge(0)],
        },
        "eval_candidates": {
            "split": eval_split, "protocol": sampled, "user_id": [_non_empty_str()],
            "slot": [pa.Check.in_range(0, k_max)], "item_id": [_non_empty_str()],
        },
        "baseline_scores": {
            "model": [_non_empty_str()], "split": eval_split, "protocol": sampled, "user_id": [_non_empty_str()],
            "slot": [pa.Check.in_range(0, k_max)], "item_id": [_non_empty_str()], "score": [_finite()],
        },
        "sft_examples": {
            "style": [_non_empty_str()], "user_id": [_non_empty_str()], "target_seq_index": [pa.Check.ge(1)],
            "item_id": [_non_empty_str()], "label": [pa.Check.isin([0, 1])],
            "label_source": [pa.Check.isin(["target", "low_rating", "sampled"])],
            "answer": [pa.Check.isin(["Yes.", "No."])], "prefix_text": [_non_empty_str()],
            "suffix_text": [_non_empty_str()], "history_kept": [pa.Check.ge(0)], "history_dropped": [pa.Check.ge(0)],
            "prompt_tokens": [pa.Check.ge(1)], "prompt_version": [_non_empty_str()], "model": [_non_empty_str()],
            "model_fingerprint": [_non_empty_str()],
        },
        "recommender_scores": {
            "model": [_non_empty_str()], "split": eval_split, "protocol": sampled, "user_id": [_non_empty_str()],
            "slot": [pa.Check.in_range(0, k_max)], "item_id": [_non_empty_str()], "score": unit,
        },
        "sft_example_settings": {
            "settings": [_is_json_object()], "sft_examples_version": [_non_empty_str()], "built_at": [_finite()],
            "input_key": [_non_empty_str()], "stats": [_is_json_object()], "built_run_id": [_non_empty_str()],
        },
        "recommender_runs": {
            "model": [_non_empty_str()], "variant": [_non_empty_str()], "base_model": [_non_empty_str()],
            "base_fingerprint": [_non_empty_str()], "valid_auc": unit, "prompt_version": [_non_empty_str()],
            "device": [_non_empty_str()], "rows": [pa.Check.ge(1)], "seconds": [_finite(), pa.Check.ge(0)],
            "scoring_key": [_non_empty_str()], "scored_run_id": [_non_empty_str()], "scored_at": [_finite()],
        },
        "lora_adapter_history": {
            "version": [_non_empty_str()], "created_at": [_finite()], "variant": [_non_empty_str()],
            "valid_auc": unit, "base_valid_auc": unit, "best_epoch": [pa.Check.ge(0)],
        },
        "adapter_promotions": {
            "run_id": [_non_empty_str()], "decided_at": [_finite()], "candidate_version": [_non_empty_str()],
            "variant": [_non_empty_str()], "candidate_valid_auc": unit, "current_valid_auc": unit,
            "margin": [pa.Check.in_range(0.0, 1.0)], "reason": [_non_empty_str()],
        },
        "baseline_full_ranking": {
            "model": [_non_empty_str()], "split": eval_split, "user_id": [_non_empty_str()],
            "item_id": [_non_empty_str()], "n_greater": [pa.Check.ge(0)], "n_ties": [pa.Check.ge(0)],
            "n_negatives": [pa.Check.ge(0)],
        },
        "baseline_runs": {
            "model": [_non_empty_str()], "settings": [_is_json_object()], "epochs_run": [pa.Check.ge(0)],
            "best_epoch": [pa.Check.ge(0)], "best_valid_ndcg10": unit,
            "train_seconds": [_finite(), pa.Check.ge(0)], "device": [_non_empty_str()],
            "input_key": [_non_empty_str()], "trained_run_id": [_non_empty_str()], "trained_at": [_finite()],
        },
        "metric_report": {
            "model": [_non_empty_str()], "split": eval_split,
            "protocol": [pa.Check.isin([*PROTOCOLS_SAMPLED, FULL_RANKING])], "metric": [_non_empty_str()],
            "value": unit, "ci_low": unit, "ci_high": unit, "n_users": [pa.Check.ge(1)],
        },
        "item_images": {
            "item_id": [_non_empty_str()], "status": [pa.Check.isin(list(IMAGE_STATUSES))],
            "source": [pa.Check.isin(list(IMAGE_SOURCES))],
            "image_sha256": [pa.Check.str_matches(r"^[0-9a-f]{64}$")],
            "width": [pa.Check.ge(1)], "height": [pa.Check.ge(1)],
            "original_width": [pa.Check.ge(1)], "original_height": [pa.Check.ge(1)],
        },
        "item_captions": {
            "item_id": [_non_empty_str()], "status": [pa.Check.isin(["ok", "failed"])],
            "modality": [pa.Check.isin(list(CAPTION_MODALITIES))], "item_content_hash": [_non_empty_str()],
            "cache_key": [_non_empty_str()], "model": [_non_empty_str()], "model_fingerprint": [_non_empty_str()],
            "prompt_version": [_non_empty_str()], "generation": [_is_json_object()],
            "generated_tokens": [pa.Check.ge(0)], "clip_score": [pa.Check.in_range(-1.0, 1.0)],
        },
        "caption_cache": {
            "cache_key": [_non_empty_str()], "item_id": [_non_empty_str()], "generated_tokens": [pa.Check.ge(0)],
            "model": [_non_empty_str()], "model_fingerprint": [_non_empty_str()],
            "prompt_version": [_non_empty_str()], "generation": [_is_json_object()], "created_at": [_finite()],
        },
        "user_preferences": {
            "user_id": [_non_empty_str()], "split": [pa.Check.isin(list(SPLITS))],
            "mode": [pa.Check.isin(list(PREFERENCE_MODES))],
            "target_seq_index": [pa.Check.ge(1)], "history_items": [pa.Check.ge(1)],
            "history_last_seq_index": [pa.Check.ge(0)], "blocks": [pa.Check.ge(1)],
            "status": [pa.Check.isin(["ok", "failed"])], "profile": [_non_empty_str()],
            "history_hash": [_non_empty_str()], "cache_key": [_non_empty_str()], "model": [_non_empty_str()],
            "model_fingerprint": [_non_empty_str()], "prompt_version": [_non_empty_str()],
            "caption_snapshot": [_non_empty_str()],
        },
        "preference_cache": {
            "cache_key": [_non_empty_str()], "generated_tokens": [pa.Check.ge(0)], "model": [_non_empty_str()],
            "model_fingerprint": [_non_empty_str()], "prompt_version": [_non_empty_str()], "created_at": [_finite()],
        },
        "caption_snapshots": {
            "snapshot": [_non_empty_str()], "item_id": [_non_empty_str()], "cache_key": [_non_empty_str()],
            "status": [pa.Check.isin(["ok", "failed"])], "modality": [pa.Check.isin(list(CAPTION_MODALITIES))],
            "model": [_non_empty_str()], "model_fingerprint": [_non_empty_str()],
            "prompt_version": [_non_empty_str()], "recorded_at": [_finite()],
        },
        "preference_snapshots": {
            "snapshot": [_non_empty_str()], "user_id": [_non_empty_str()], "split": [pa.Check.isin(list(SPLITS))],
            "mode": [pa.Check.isin(list(PREFERENCE_MODES))], "target_seq_index": [pa.Check.ge(1)],
            "cache_key": [_non_empty_str()], "status": [pa.Check.isin(["ok", "failed"])],
            "model": [_non_empty_str()], "model_fingerprint": [_non_empty_str()],
            "prompt_version": [_non_empty_str()], "caption_snapshot": [_non_empty_str()],
            "recorded_at": [_finite()],
        },
    }


def _wide_checks() -> dict[str, list[pa.Check]]:
    k_of = dict(PROTOCOLS_SAMPLED)
    slot_within_protocol = _wide("slot_within_protocol", ("protocol", "slot"),
                                 lambda d: d.slot <= d.protocol.map(k_of).fillna(-1))
    return {
        "ingest_log": [_wide("rows_read_eq_kept_plus_quarantined", ("rows_read", "rows_kept", "rows_quarantined"),
                             lambda d: d.rows_read == d.rows_kept + d.rows_quarantined)],
        "interactions": [_wide("seq_index_null_iff_negative", ("label", "seq_index"),
                               lambda d: (d.label == 1) == d.seq_index.notna())],
        "interactions_funnel": [_wide("rows_out_eq_rows_in_minus_dropped", ("rows_in", "dropped", "rows_out"),
                                      lambda d: d.rows_out == d.rows_in - d.dropped)],
        "eval_candidates": [
            _wide("positive_iff_slot_0", ("slot", "is_positive"), lambda d: d.is_positive == (d.slot == 0)),
            slot_within_protocol,
        ],
        "baseline_scores": [slot_within_protocol],
        "baseline_full_ranking": [_wide("greater_plus_ties_le_negatives", ("n_greater", "n_ties", "n_negatives"),
                                        lambda d: d.n_greater + d.n_ties <= d.n_negatives)],
        "baseline_runs": [_wide("best_epoch_le_epochs_run", ("best_epoch", "epochs_run"),
                                lambda d: d.best_epoch <= d.epochs_run)],
        "metric_report": [_wide("ci_low_le_value_le_ci_high", ("ci_low", "value", "ci_high"),
                                lambda d: (d.ci_low <= d.value) & (d.value <= d.ci_high))],
        "item_images": [
            _wide("image_path_iff_ok", ("status", "image_path"), lambda d: (d.status == "ok") == d.image_path.notna()),
            _wide("reason_iff_not_ok", ("status", "reason"), lambda d: (d.status == "ok") == d.reason.isna()),
        ],
        "item_captions": [
            _wide("caption_iff_ok", ("status", "caption"), lambda d: (d.status == "ok") == d.caption.notna()),
            _wide("reason_iff_failed", ("status", "reason"), lambda d: (d.status == "ok") == d.reason.isna()),
        ],
        "sft_examples": [
            _wide("answer_matches_label", ("label", "answer"), lambda d: (d.label == 1) == (d.answer == "Yes.")),
            _wide("positive_iff_target", ("label", "label_source"),
                  lambda d: (d.label == 1) == (d.label_source == "target")),
        ],
        "recommender_scores": [slot_within_protocol],
        "user_preferences": [
            _wide("history_before_target", ("history_last_seq_index", "target_seq_index"),
                  lambda d: d.history_last_seq_index < d.target_seq_index),
            _wide("summary_iff_ok", ("status", "summary"), lambda d: (d.status == "ok") == d.summary.notna()),
        ],
    }


def build_schemas(settings: FilterSettings | None = None) -> dict[str, pa.DataFrameSchema]:
    """One schema per table; ``settings`` gives the rating range (default: ``FilterSettings()``)."""
    settings = settings or FilterSettings()
    values, wide = _value_checks(settings), _wide_checks()
    schemas = {}
    for table in TABLES:
        columns = {}
        for col in table_columns(table):
            checks = list(values.get(table, {}).get(col.name, []))
            if col.name == "category":
                checks = [_non_empty_str()]
            elif col.sql_type == "VARCHAR" and not any(c.name in ("non_empty_string", "is_string") for c in checks):
                checks.insert(0, _is_str())
            if not col.nullable:
                # NULLs already fail the column's not-null check; skipping pandera's per-check NA
                # filtering saves an isna() pass per check over object columns (the dominant cost).
                # Copies: the same Check objects (e.g. the 0..1 range) also guard nullable columns elsewhere.
                checks = [copy.copy(c) for c in checks]
                for c in checks:
                    c.ignore_na = False
            columns[col.name] = pa.Column(_dtype(col), checks=checks, nullable=col.nullable, coerce=False)
        schemas[table] = pa.DataFrameSchema(
            columns, checks=wide.get(table, []), strict=True, coerce=False, name=table
        )
    return schemas


SCHEMAS: dict[str, pa.DataFrameSchema] = build_schemas()


# --- validation of a stored partition ------------------------------------------------------------

@dataclass
class ValidationOutcome:
    passed: bool
    n_rows: int
    n_failures: int
    failure_cases: pd.DataFrame  # at most MAX_FAILURE_CASES rows: column, check, failure_case, index


def _compact_failures(fc: pd.DataFrame) -> pd.DataFrame:
    """pandera's failure cases as (column, check, failure_case, index); one row per failing row of a wide check."""
    fc = fc.reset_index(drop=True)
    is_wide = fc["check"].isin(list(WIDE_CHECK_COLUMNS)) & fc["index"].notna() & (fc["schema_context"] == "DataFrameSchema")
    plain = fc.loc[~is_wide, FAILURE_COLUMNS]
    rows = []
    for (check, index), g in fc[is_wide].groupby(["check", "index"], sort=False):
        involved = WIDE_CHECK_COLUMNS[check]
        g = g[g["column"].isin(involved)]
        rows.append({
            "column": ",".join(involved), "check": check, "index": index,
            "failure_case": ", ".join(f"{c}={v}" for c, v in zip(g["column"], g["failure_case"])),
        })
    wide_df = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    parts = [p for p in (plain, wide_df) if len(p)]
    if not parts:
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    return pd.concat(parts, ignore_index=True)[FAILURE_COLUMNS]


def _unique_failures(con: duckdb.DuckDBPyConnection, table: str, category: str) -> tuple[int, pd.DataFrame]:
    n_total, frames = 0, []
    for key, where in UNIQUE_KEYS.get(table, []):
        cols = ", ".join(f'"{c}"' for c in key)
        extra = f" AND {where}" if where else ""
        # Distinct hashes imply distinct keys: the cheap hash count rules duplicates out.
        (n_hash_dup,) = con.execute(
            f"SELECT count(*) - count(DISTINCT hash({cols})) FROM {table} WHERE category = ?{extra}", [category]
        ).fetchall()[0]
        if not n_hash_dup:
            continue
        base = f"SELECT {cols}, count(*) AS n FROM {table} WHERE category = ?{extra} GROUP BY ALL HAVING count(*) > 1"
        (n_dup,) = con.execute(f"SELECT count(*) FROM ({base})", [category]).fetchall()[0]
        if not n_dup:
            continue
        n_total += int(n_dup)
        ex = con.execute(f"{base} ORDER BY n DESC, {cols} LIMIT {MAX_FAILURE_CASES}", [category]).fetchall()
        frames.append(pd.DataFrame({
            "column": ",".join(key),
            "check": f"unique({', '.join(key)})",
            "failure_case": [", ".join(f"{c}={v}" for c, v in zip(key, r[:-1])) + f" ({r[-1]} rows)" for r in ex],
            "index": None,
        }))
    return n_total, (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=FAILURE_COLUMNS))




def validate_partition(
    con: duckdb.DuckDBPyConnection,
    table: str,
    category: str,
    chunk_rows: int = 500_000,
    settings: FilterSettings | None = None,
) -> ValidationOutcome:
    """Validate ``category``'s rows of ``table`` against its schema, ``chunk_rows`` rows at a time.

    Failure cases from all chunks (indexed by row offset within the partition) and from the SQL
    uniqueness checks are collected; at most ``MAX_FAILURE_CASES`` are kept, all are counted.
    An empty (or missing) partition fails with a ``no rows`` failure case.
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(TABLES)}")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    schema = SCHEMAS[table] if settings is None else build_schemas(settings)[table]

    def empty_outcome(why: str) -> ValidationOutcome:
        fc = pd.DataFrame([{"column": None, "check": "no rows", "failure_case": why, "index": None}])
        return ValidationOutcome(False, 0, 1, fc[FAILURE_COLUMNS])

    if not table_exists(con, table):
        return empty_outcome(f"table {table} does not exist")

    kept: list[pd.DataFrame] = []
    n_kept = n_failures = n_rows = 0
    # A relation cannot start while an execute() result is unfinished (DuckDB >= 2: e.g. a caller's
    # fetchone()); a fully fetched execute() closes it.
    con.execute("SELECT 1").fetchall()
    reader = con.sql(f"SELECT * FROM {table} WHERE category = $1", params=[category]).to_arrow_reader(chunk_rows)
    for batch in reader:
        if batch.num_rows == 0:
            continue
        chunk = normalize_frame(table, batch.to_pandas())
        chunk.index = pd.RangeIndex(n_rows, n_rows + len(chunk))
        n_rows += len(chunk)
        try:
            schema.validate(chunk, lazy=True)
        except pa_errors.SchemaErrors as e:
            fc = _compact_failures(e.failure_cases)
            n_failures += len(fc)
            if n_kept < MAX_FAILURE_CASES:
                kept.append(fc.head(MAX_FAILURE_CASES - n_kept))
                n_kept += len(kept[-1])
        del chunk
    if n_rows == 0:
        return empty_outcome(f"no rows in {table} for category {category!r}")

    n_dup, dup_fc = _unique_failures(con, table, category)
    n_failures += n_dup
    if len(dup_fc) and n_kept < MAX_FAILURE_CASES:
        kept.append(dup_fc.head(MAX_FAILURE_CASES - n_kept))
    failure_cases = (
        pd.concat(kept, ignore_index=True)[FAILURE_COLUMNS] if kept else pd.DataFrame(columns=FAILURE_COLUMNS)
    )
    return ValidationOutcome(n_failures == 0, n_rows, n_failures, failure_cases)
