"""Interaction readers: one per source format, all filling the same stage (see ``stage.py``).

The line formats (Amazon JSON lines, P5 sequences, RecBole ``.inter``) stream the file in
batches of lines (``source.iter_line_batches``) and parse and validate each batch with one
vectorised DuckDB statement: nothing per line runs in Python, and memory is bounded by the
batch size. Only the small preprocessed ``{"user": [items]}`` form is read whole with ``json``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from srec.config import CategoryConfig
from srec.ingest.common import RAW_TEXT_MAX, IngestError
from srec.ingest.source import LineBatch, SourceFile, iter_line_batches, prefetched
from srec.ingest.stage import Stage

# Timestamps outside [1990-01-01, now + 1 day] are not believable for review data.
TIMESTAMP_MIN = 631_152_000  # 1990-01-01T00:00:00Z
FUTURE_SLACK_S = 86_400

_WS = "concat(' ', chr(9), chr(10), chr(11), chr(12), chr(13))"  # whitespace for blank-line tests
_EOL = "concat(chr(13), chr(10))"
NOT_A_NUMBER = " = '{}' is not a number"


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _num(x: float) -> str:
    return f"CAST({_lit(repr(float(x)))} AS DOUBLE)"


@dataclass(frozen=True)
class Fields:
    """Where a record format keeps its fields (names as they appear in details)."""

    user: str
    items: tuple[str, ...]          # first non-empty wins (amazon2023: parent_asin, then asin)
    rating: str | None              # None: the format has no ratings
    timestamp: str | None           # None: the format has no times
    ts_divisor: int = 1             # 1000 where the source counts milliseconds


JSON_FIELDS: dict[str, Fields] = {
    "amazon2014": Fields("reviewerID", ("asin",), "overall", "unixReviewTime"),
    "amazon2018": Fields("reviewerID", ("asin",), "overall", "unixReviewTime"),
    "amazon2023": Fields("user_id", ("parent_asin", "asin"), "rating", "timestamp", ts_divisor=1000),
}


def _classify_sql(parsed_sql: str, f: Fields, cfg: CategoryConfig, now_s: int, first_data_line: int = 1) -> str:
    """One statement turning a parsed batch into stage rows with a reason (NULL: kept).

    ``parsed_sql`` yields ``line, text, bad_parse`` (why the line did not parse, NULL if it did)
    and the raw field values ``u_raw, i_raw, r_raw, t_raw`` as text. Ids are kept verbatim (an
    empty string is missing); ``position`` is the line's ordinal among the file's data lines."""
    fr = cfg.filtering
    checks = [
        "WHEN bad_parse IS NOT NULL THEN CASE WHEN trim(text, " + _WS + ") = '' THEN 'empty_line' ELSE 'unparseable_line' END",
        "WHEN u IS NULL THEN 'missing_user'",
        "WHEN i IS NULL THEN 'missing_item'",
    ]
    details = [
        "WHEN 'empty_line' THEN 'blank line'",
        "WHEN 'unparseable_line' THEN bad_parse",
        f"WHEN 'missing_user' THEN {_lit(f'no {f.user}' + ' (or an empty one)')}",
        f"WHEN 'missing_item' THEN {_lit('no ' + ' / '.join(f.items) + ' (or an empty one)')}",
    ]
    if f.rating:
        lo, hi = _num(fr.rating_min), _num(fr.rating_max)
        checks += [
            "WHEN r_raw IS NULL THEN 'missing_rating'",
            "WHEN r IS NULL THEN 'rating_not_a_number'",
            f"WHEN NOT (r BETWEEN {lo} AND {hi}) THEN 'rating_out_of_range'",
        ]
        details += [
            f"WHEN 'missing_rating' THEN {_lit('no ' + f.rating)}",
            f"WHEN 'rating_not_a_number' THEN format({_lit(f.rating + NOT_A_NUMBER)}, r_raw)",
            f"WHEN 'rating_out_of_range' THEN format({_lit(f.rating + ' = {} is outside [{}, {}]')}, r_raw, {lo}, {hi})",
        ]
    if f.timestamp:
        d = f"CAST({f.ts_divisor} AS DOUBLE)"
        unit = " ms" if f.ts_divisor == 1000 else ""
        checks.append(
            f"WHEN t IS NULL OR NOT isfinite(t) OR t / {d} < {TIMESTAMP_MIN} OR t / {d} > {now_s + FUTURE_SLACK_S} "
            "THEN 'unusable_timestamp'"
        )
        details.append(
            "WHEN 'unusable_timestamp' THEN CASE "
            f"WHEN t_raw IS NULL THEN {_lit('no ' + f.timestamp)} "
            f"WHEN t IS NULL OR NOT isfinite(t) THEN format({_lit(f.timestamp + NOT_A_NUMBER)}, t_raw) "
            f"WHEN t / {d} < {TIMESTAMP_MIN} THEN format({_lit(f.timestamp + ' = {}' + unit + ' is before 1990-01-01')}, t_raw) "
            f"ELSE format({_lit(f.timestamp + ' = {}' + unit + ' is more than a day in the future')}, t_raw) END"
        )
    rating = "CASE WHEN reason IS NULL THEN r END" if f.rating else "CAST(NULL AS DOUBLE)"
    ts = (
        f"CASE WHEN reason IS NULL THEN CAST(floor(t / {f.ts_divisor}) AS BIGINT) END"
        if f.timestamp else "CAST(NULL AS BIGINT)"
    )
    return f"""
        WITH parsed AS ({parsed_sql}),
        f AS (
            SELECT line, text, bad_parse,
                   nullif(u_raw, '') AS u, nullif(i_raw, '') AS i,
                   r_raw, TRY_CAST(r_raw AS DOUBLE) AS r, t_raw, TRY_CAST(t_raw AS DOUBLE) AS t
            FROM (SELECT * REPLACE (nullif(r_raw, '') AS r_raw, nullif(t_raw, '') AS t_raw) FROM parsed)
        ),
        c AS (SELECT *, CASE {' '.join(checks)} END AS reason FROM f)
        SELECT line AS source_line, 0 AS sub, line - {first_data_line} AS position, u AS user_id, i AS item_id,
               {rating} AS rating, {ts} AS timestamp, reason,
               CASE reason {' '.join(details)} END AS detail,
               CASE WHEN reason IS NOT NULL THEN left(rtrim(text, {_EOL}), {RAW_TEXT_MAX}) END AS raw_text
        FROM c
    """


def _json_parsed_sql(f: Fields) -> str:
    paths = [f.user, *f.items] + ([f.rating] if f.rating else []) + ([f.timestamp] if f.timestamp else [])
    path_list = "[" + ", ".join(_lit("$." + json.dumps(p) if not p.isidentifier() else "$." + p) for p in paths) + "]"
    k = 2 + len(f.items)
    items = ", ".join(f"nullif(v[{2 + j}], '')" for j in range(len(f.items)))
    r = f"v[{k}]" if f.rating else "CAST(NULL AS VARCHAR)"
    t = f"v[{k + (1 if f.rating else 0)}]" if f.timestamp else "CAST(NULL AS VARCHAR)"
    return f"""
        SELECT line, text,
               CASE WHEN NOT ok THEN 'not valid JSON'
                    WHEN v[1] IS NULL AND json_type(text) <> 'OBJECT'
                    THEN format('valid JSON but not an object ({{}})', json_type(text)) END AS bad_parse,
               v[1] AS u_raw, coalesce({items}) AS i_raw, {r} AS r_raw, {t} AS t_raw
        FROM (
            -- try(): one parse per line; NULL exactly where json_valid() is false
            SELECT line, text, v IS NOT NULL AS ok, v
            FROM (SELECT line, text, try(json_extract_string(text, {path_list})) AS v FROM {{batch}} WHERE text IS NOT NULL)
        )
    """


def _stage_bad_utf8(stage: Stage, batch: LineBatch, first_data_line: int) -> None:
    if batch.bad_utf8:
        stage.insert_rows({
            "source_line": [batch.first_line + i for i, _, _ in batch.bad_utf8],
            "sub": [0] * len(batch.bad_utf8),
            "position": [batch.first_line + i - first_data_line for i, _, _ in batch.bad_utf8],
            "reason": ["invalid_utf8"] * len(batch.bad_utf8),
            "detail": [d for _, d, _ in batch.bad_utf8],
            "raw_text": [r for _, _, r in batch.bad_utf8],
        })


def _stream(stage: Stage, src: SourceFile, sql: str, skip_header: bool = False) -> str | None:
    """Run ``sql`` over every line batch of ``src``; return the header line when ``skip_header``."""
    header = None
    for batch in prefetched(iter_line_batches(src)):
        if skip_header and header is None:
            if batch.text[0].as_py() is None:
                raise IngestError(f"{src.path}: line 1 (the header) is not valid UTF-8")
            header = batch.text[0].as_py()
            batch = LineBatch(
                batch.first_line + 1, batch.binary.slice(1), batch.text.slice(1),
                [(i - 1, d, r) for i, d, r in batch.bad_utf8 if i > 0],
            )
            if batch.n == 0:
                continue
        _stage_bad_utf8(stage, batch, 2 if skip_header else 1)
        stage.insert_sql(sql, batch.table())
    return header


def read_json_lines(stage: Stage, src: SourceFile, cfg: CategoryConfig) -> None:
    f = JSON_FIELDS[cfg.format]
    _stream(stage, src, _classify_sql(_json_parsed_sql(f), f, cfg, int(time.time())))


def read_p5_sequences(stage: Stage, src: SourceFile, cfg: CategoryConfig) -> None:
    """``USER ITEM ITEM ...`` per line: one row per item, ``sub`` = its index in the line."""
    sql = f"""
        WITH p AS (
            SELECT line, text, regexp_split_to_array(trim(text, {_WS}), '[ \\t]+') AS toks
            FROM {{batch}} WHERE text IS NOT NULL
        )
        SELECT line AS source_line, 0 AS sub, 'empty_line' AS reason, 'blank line' AS detail,
               left(rtrim(text, {_EOL}), {RAW_TEXT_MAX}) AS raw_text
        FROM p WHERE toks[1] = ''
        UNION ALL BY NAME
        SELECT line AS source_line, 0 AS sub, toks[1] AS user_id, 'missing_item' AS reason,
               format('user {{}} has no items', toks[1]) AS detail,
               left(rtrim(text, {_EOL}), {RAW_TEXT_MAX}) AS raw_text
        FROM p WHERE toks[1] <> '' AND len(toks) = 1
        UNION ALL BY NAME
        SELECT line AS source_line, unnest(range(len(toks) - 1)) AS sub, toks[1] AS user_id,
               unnest(toks[2:]) AS item_id
        FROM p WHERE len(toks) > 1
    """
    _stream(stage, src, sql)
    # position: the running count of (line, item-in-line) over every row read (small files: one sort)
    stage.con.execute(
        f"""
        UPDATE {stage.name} AS s SET position = o.pos
        FROM (SELECT source_line, sub, row_number() OVER (ORDER BY source_line, sub) - 1 AS pos FROM {stage.name}) o
        WHERE s.source_line = o.source_line AND s.sub = o.sub
        """
    )


RECBOLE_USER, RECBOLE_ITEM, RECBOLE_RATING, RECBOLE_TIME = "user_id", "item_id", "rating", "timestamp"


def parse_recbole_header(src: SourceFile, header: str) -> list[str]:
    """Field names of a RecBole header line (``name:type`` separated by tabs)."""
    names = [h.split(":", 1)[0].strip() for h in header.rstrip("\r\n").split("\t")]
    if not all(":" in h for h in header.rstrip("\r\n").split("\t")):
        raise IngestError(
            f"{src.path}: line 1 is not a RecBole header (expected tab-separated name:type fields): {header[:200]!r}"
        )
    return names


def _peek_first_line(src: SourceFile) -> str:
    for batch in iter_line_batches(src, batch_bytes=1 << 16):
        first = batch.text[0].as_py()
        if first is None:
            raise IngestError(f"{src.path}: line 1 (the header) is not valid UTF-8")
        return first
    raise IngestError(f"{src.path}: empty file (0 lines)")


def read_recbole_inter(stage: Stage, src: SourceFile, cfg: CategoryConfig) -> None:
    names = parse_recbole_header(src, _peek_first_line(src))
    for need in (RECBOLE_USER, RECBOLE_ITEM):
        if need not in names:
            raise IngestError(f"{src.path}: the RecBole header has no {need} field (fields: {', '.join(names)})")
    f = Fields(
        RECBOLE_USER, (RECBOLE_ITEM,),
        RECBOLE_RATING if RECBOLE_RATING in names else None,
        RECBOLE_TIME if RECBOLE_TIME in names else None,
    )

    def col(name: str | None) -> str:
        return f"fs[{names.index(name) + 1}]" if name else "CAST(NULL AS VARCHAR)"

    parsed = f"""
        SELECT line, text,
               CASE WHEN len(fs) <> {len(names)}
                    THEN format('expected {len(names)} tab-separated fields, found {{}}', len(fs)) END AS bad_parse,
               {col(f.user)} AS u_raw, {col(f.items[0])} AS i_raw, {col(f.rating)} AS r_raw, {col(f.timestamp)} AS t_raw
        FROM (SELECT line, text, string_split(rtrim(text, {_EOL}), chr(9)) AS fs FROM {{batch}} WHERE text IS NOT NULL)
    """
    _stream(stage, src, _classify_sql(parsed, f, cfg, int(time.time()), first_data_line=2), skip_header=True)


def read_inter_json(stage: Stage, src: SourceFile, cfg: CategoryConfig) -> None:
    """``{"user": [item, ...]}``: record k (1-based) is source_line k; sub = index in the list."""
    doc = load_json_document(src)
    if not isinstance(doc, dict):
        raise IngestError(f"{src.path}: expected a JSON object {{user: [items]}}, found a {type(doc).__name__}")
    if not doc:
        raise IngestError(f"{src.path}: the JSON object holds no users")
    rows: dict[str, list] = {
        k: [] for k in ("source_line", "sub", "position", "user_id", "item_id", "reason", "detail", "raw_text")
    }

    def add(line, sub, user, item, reason=None, detail=None, raw=None):
        for k, v in zip(rows, (line, sub, len(rows["position"]), user, item, reason, detail, raw)):
            rows[k].append(v)

    for rec, (user, items) in enumerate(doc.items(), start=1):
        raw = json.dumps({user: items}, ensure_ascii=False)[:RAW_TEXT_MAX]
        u = str(user).strip()
        if not u:
            add(rec, 0, None, None, "missing_user", "empty user key", raw)
        elif not isinstance(items, list):
            add(rec, 0, u, None, "unparseable_line", f"expected a list of items, found a {type(items).__name__}", raw)
        elif not items:
            add(rec, 0, u, None, "missing_item", f"user {u} has no items", raw)
        else:
            for sub, it in enumerate(items):
                i = str(it).strip() if isinstance(it, (str, int)) and not isinstance(it, bool) else ""
                if i:
                    add(rec, sub, u, i)
                else:
                    add(rec, sub, u, None, "missing_item", f"item {sub} of user {u} is {json.dumps(it)}", raw)
    stage.insert_rows(rows)


def load_json_document(src: SourceFile) -> object:
    data = b"".join(src.chunks())
    if not data.strip():
        raise IngestError(f"{src.path}: empty file (0 lines)" if not data else f"{src.path}: file has no JSON content")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise IngestError(f"{src.path}: line {line}: bytes that are not valid UTF-8 ({e.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise IngestError(f"{src.path}: line {e.lineno}: not valid JSON ({e.msg})") from None


REVIEW_READERS = {
    "amazon2014": read_json_lines,
    "amazon2018": read_json_lines,
    "amazon2023": read_json_lines,
    "p5_sequences": read_p5_sequences,
    "inter_item_json": read_inter_json,
    "recbole_atomic": read_recbole_inter,
}
