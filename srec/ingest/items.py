"""Item metadata readers: one per source format, normalising to the raw_items columns.

Metadata files are read line by line in Python (the lines are still streamed in batches, never
loaded whole): each line is one record to parse (JSON, a Python literal, CSV, tab-separated).
A repeated item id is quarantined as 'duplicate'; the first record of an item wins.
"""
from __future__ import annotations

import ast
import csv
import json
from collections.abc import Callable, Iterator

from srec.config import CategoryConfig
from srec.ingest.common import RAW_TEXT_MAX, IngestError
from srec.ingest.reviews import load_json_document, parse_recbole_header
from srec.ingest.source import SourceFile, iter_lines
from srec.ingest.stage import Stage

ITEM_FIELDS = ("item_id", "title", "description", "brand", "categories", "image_url", "image_path")
FLUSH_ROWS = 20_000

CATEGORY_PATH_SEP = " > "   # between the levels of one category path
CATEGORY_LIST_SEP = " | "   # between paths, or between the entries of a plain list


# ----------------------------------------------------------------------------- normalising values

def text(v: object, sep: str = " ") -> str | None:
    """A display string: lists joined with ``sep``, whitespace trimmed, empty -> None."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (list, tuple)):
        parts = [t for t in (text(x) for x in v) if t]
        return sep.join(parts) or None
    if isinstance(v, dict):
        return None
    s = str(v).strip()
    return s or None


def categories(v: object) -> str | None:
    """'A > B > C | D > E' for a list of paths; a plain list (or a comma-separated string) joined ' | '."""
    if v is None:
        return None
    if isinstance(v, str):
        v = [p for p in v.split(",")]
    if not isinstance(v, (list, tuple)):
        return text(v)
    out: list[str] = []
    for entry in v:
        if isinstance(entry, (list, tuple)):
            s = CATEGORY_PATH_SEP.join(p for p in (text(x) for x in entry) if p)
        else:
            s = text(entry) or ""
        if s and s not in out:
            out.append(s)
    return CATEGORY_LIST_SEP.join(out) or None


def first_url(*candidates: object) -> str | None:
    """The first non-empty URL among the candidates (each a string or a list of strings)."""
    for c in candidates:
        if isinstance(c, str) and c.strip():
            return c.strip()
        if isinstance(c, (list, tuple)):
            for x in c:
                if isinstance(x, str) and x.strip():
                    return x.strip()
    return None


def image_2023(images: object) -> str | None:
    """Amazon 2023 ``images``: a list of {hi_res, large, thumb, variant} (or a dict of lists);
    the first image, at the largest size it has."""
    if isinstance(images, dict):  # the Hugging Face column form: {"hi_res": [...], "large": [...], ...}
        n = max((len(x) for x in images.values() if isinstance(x, list)), default=0)
        images = [{k: (x[i] if isinstance(x, list) and i < len(x) else None) for k, x in images.items()} for i in range(n)]
    if not isinstance(images, list):
        return None
    for img in images:
        if isinstance(img, dict):
            url = first_url(img.get("hi_res"), img.get("large"), img.get("thumb"))
            if url:
                return url
        elif isinstance(img, str) and img.strip():
            return img.strip()
    return None


# ----------------------------------------------------------------------------- per-format mappings

def _map_2014(d: dict) -> dict:
    return {
        "item_id": text(d.get("asin")),
        "title": text(d.get("title")),
        "description": text(d.get("description")),
        "brand": text(d.get("brand")),
        "categories": categories(d.get("categories")),
        "image_url": first_url(d.get("imUrl")),
    }


def _map_2018(d: dict) -> dict:
    return {
        "item_id": text(d.get("asin")),
        "title": text(d.get("title")),
        "description": text(d.get("description")),
        "brand": text(d.get("brand")),
        "categories": categories(d.get("category")),
        "image_url": first_url(d.get("imageURLHighRes"), d.get("imageURL")),
    }


def _map_2023(d: dict) -> dict:
    desc = [x for x in (text(d.get("description")), text(d.get("features"))) if x]
    return {
        "item_id": text(d.get("parent_asin")) or text(d.get("asin")),
        "title": text(d.get("title")),
        "description": " ".join(desc) or None,  # description paragraphs, then the feature bullets
        "brand": text(d.get("store")) or text(d.get("brand")),
        "categories": categories(d.get("categories")),
        "image_url": image_2023(d.get("images")),
    }


def _parse_literal(s: str) -> object:
    return ast.literal_eval(s)


def _parse_json(s: str) -> object:
    return json.loads(s)


META_FORMATS: dict[str, tuple[Callable[[dict], dict], tuple[Callable[[str], object], ...], str]] = {
    # format: (mapping, parsers tried in order, item-id field for details)
    "amazon2014": (_map_2014, (_parse_literal, _parse_json), "asin"),   # Python dict literals, not JSON
    "amazon2018": (_map_2018, (_parse_json, _parse_literal), "asin"),
    "amazon2023": (_map_2023, (_parse_json, _parse_literal), "parent_asin"),
}


# ----------------------------------------------------------------------------- the row buffer

class _ItemRows:
    """Collects item rows, quarantines repeated ids, flushes to the stage in chunks."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.rows: dict[str, list] = {k: [] for k in ("source_line", *ITEM_FIELDS, "reason", "detail", "raw_text")}
        self.first_line: dict[str, int] = {}

    def _add(self, line: int, values: dict, reason: str | None, detail: str | None, raw: str | None) -> None:
        r = self.rows
        r["source_line"].append(line)
        for k in ITEM_FIELDS:
            r[k].append(values.get(k))
        r["reason"].append(reason)
        r["detail"].append(detail)
        r["raw_text"].append(raw[:RAW_TEXT_MAX] if raw is not None else None)
        if len(r["source_line"]) >= FLUSH_ROWS:
            self.flush()

    def item(self, line: int, values: dict, raw: str, id_field: str = "item_id") -> None:
        item_id = values.get("item_id")
        if not item_id:
            self._add(line, {}, "missing_item", f"no {id_field} (or an empty one)", raw)
        elif item_id in self.first_line:
            self._add(line, {"item_id": item_id}, "duplicate",
                      f"item {item_id} already read at line {self.first_line[item_id]}", raw)
        else:
            self.first_line[item_id] = line
            self._add(line, values, None, None, None)

    def bad(self, line: int, reason: str, detail: str, raw: str | None) -> None:
        self._add(line, {}, reason, detail, raw)

    def flush(self) -> None:
        if self.rows["source_line"]:
            self.stage.insert_rows(self.rows)
            self.rows = {k: [] for k in self.rows}


def _raw(b: bytes) -> str:
    return b.rstrip(b"\r\n").decode("utf-8", errors="replace")


def _utf8_detail(b: bytes) -> str:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"byte {e.start + 1} of the line (0x{b[e.start]:02x}) is not valid UTF-8"
    return "bytes that are not valid UTF-8"


# ----------------------------------------------------------------------------- readers

def read_meta_lines(stage: Stage, src: SourceFile, cfg: CategoryConfig) -> None:
    mapping, parsers, id_field = META_FORMATS[cfg.format]
    out = _ItemRows(stage)
    for line, t, b in iter_lines(src):
        if t is None:
            out.bad(line, "invalid_utf8", _utf8_detail(b), _raw(b))
            continue
        s = t.strip()
        if not s:
            out.bad(line, "empty_line", "blank line", t.rstrip("\r\n"))
            continue
        rec, errors = None, []
        for parse in parsers:
            try:
                rec = parse(s)
                break
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
                errors.append(f"{'JSON' if parse is _parse_json else 'Python literal'}: {str(e)[:80]}")
        if rec is None and errors:
            out.bad(line, "unparseable_line", "not a record (" + "; ".join(errors) + ")", t.rstrip("\r\n"))
        elif not isinstance(rec, dict):
            out.bad(line, "unparseable_line", f"a {type(rec).__name__}, not a record", t.rstrip("\r\n"))
        else:
            out.item(line, mapping(rec), t.rstrip("\r\n"), id_field)
    out.flush()


_CSV_COLUMNS = {
    "item_id": "item_id", "item": "item_id", "asin": "item_id", "parent_asin": "item_id", "id": "item_id",
    "title": "title", "description": "description", "brand": "brand",
    "categories": "categories", "category": "categories",
    "image_url": "image_url", "imurl": "image_url", "imageurl": "image_url",
    "image_path": "image_path", "img_path": "image_path",
}


def read_csv_items(stage: Stage, src: SourceFile, cfg: CategoryConfig) -> None:
    """``item_id,title`` CSV (quoted fields may hold commas and newlines); a header row is optional."""
    out = _ItemRows(stage)
    consumed: list[tuple[int, bytes]] = []

    def lines() -> Iterator[str]:
        for line, _, b in iter_lines(src):
            consumed.append((line, b))
            yield b.decode("utf-8", errors="surrogateescape")

    reader = csv.reader(lines())
    columns: list[str] | None = None
    first = True
    while True:
        consumed.clear()
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if consumed:
                raw = b"".join(b for _, b in consumed)
                out.bad(consumed[0][0], "unparseable_line", f"not a CSV record ({e})", _raw(raw))
            continue
        start = consumed[0][0] if consumed else reader.line_num
        raw_bytes = b"".join(b for _, b in consumed)
        if first:
            first = False
            keys = [_CSV_COLUMNS.get(c.strip().lower()) for c in rec]
            if "item_id" in keys:  # a header row
                columns = keys
                continue
            columns = ["item_id", "title"]
        try:
            for f in rec:
                f.encode("utf-8")
        except UnicodeEncodeError:
            out.bad(start, "invalid_utf8", _utf8_detail(raw_bytes), _raw(raw_bytes))
            continue
        if not rec or not any(f.strip() for f in rec):
            out.bad(start, "empty_line", "blank line", _raw(raw_bytes))
            continue
        if len(rec) > len(columns):
            out.bad(start, "unparseable_line", f"expected {len(columns)} CSV fields, found {len(rec)}", _raw(raw_bytes))
            continue
        values = {k: text(v) for k, v in zip(columns, rec) if k}
        if "categories" in values:
            values["categories"] = categories(values["categories"])
        out.item(start, values, _raw(raw_bytes))
    out.flush()


_RECBOLE_ITEM_COLUMNS = {
    "item_id": "item_id", "title": "title", "description": "description", "desc": "description",
    "brand": "brand", "categories": "categories", "category": "categories",
    "image_url": "image_url", "img_url": "image_url", "imUrl": "image_url",
    "image_path": "image_path", "img_path": "image_path",
}


def _recbole_categories(v: str | None) -> str | None:
    """RecBole token_seq categories: "'A', 'B & C'" (a list literal) or space-separated tokens."""
    if not v:
        return None
    if "'" in v or '"' in v:
        try:
            parsed = ast.literal_eval("[" + v + "]")
            if all(isinstance(x, str) for x in parsed):
                return categories(parsed)
        except (ValueError, SyntaxError):
            pass
    return text(v)


def read_recbole_items(stage: Stage, src: SourceFile, cfg: CategoryConfig) -> None:
    out = _ItemRows(stage)
    names: list[str] | None = None
    for line, t, b in iter_lines(src):
        if names is None:
            if t is None:
                raise IngestError(f"{src.path}: line 1 (the header) is not valid UTF-8")
            names = parse_recbole_header(src, t)
            if "item_id" not in names:
                raise IngestError(f"{src.path}: the RecBole header has no item_id field (fields: {', '.join(names)})")
            continue
        if t is None:
            out.bad(line, "invalid_utf8", _utf8_detail(b), _raw(b))
            continue
        s = t.rstrip("\r\n")
        if not s.strip():
            out.bad(line, "empty_line", "blank line", s)
            continue
        fs = s.split("\t")
        if len(fs) != len(names):
            out.bad(line, "unparseable_line", f"expected {len(names)} tab-separated fields, found {len(fs)}", s)
            continue
        values: dict = {}
        for name, v in zip(names, fs):
            key = _RECBOLE_ITEM_COLUMNS.get(name)
            if key and key not in values:
                values[key] = _recbole_categories(v) if key == "categories" else text(v)
        out.item(line, values, s)
    out.flush()


def read_item_json(stage: Stage, src: SourceFile, cfg: CategoryConfig) -> None:
    """``{"item": {title, description, brand, categories}}``; record k (1-based) is source_line k."""
    doc = load_json_document(src)
    if not isinstance(doc, dict):
        raise IngestError(f"{src.path}: expected a JSON object {{item: {{...}}}}, found a {type(doc).__name__}")
    if not doc:
        raise IngestError(f"{src.path}: the JSON object holds no items")
    out = _ItemRows(stage)
    for rec, (item, meta) in enumerate(doc.items(), start=1):
        raw = json.dumps({item: meta}, ensure_ascii=False)[:RAW_TEXT_MAX]
        if not isinstance(meta, dict):
            out.bad(rec, "unparseable_line", f"expected an object of item fields, found a {type(meta).__name__}", raw)
            continue
        out.item(rec, {
            "item_id": text(item),
            "title": text(meta.get("title")),
            "description": text(meta.get("description")),
            "brand": text(meta.get("brand")),
            "categories": categories(meta.get("categories")),
            "image_url": first_url(meta.get("image_url"), meta.get("imUrl")),
            "image_path": text(meta.get("image_path")),
        }, raw)
    out.flush()


ITEM_READERS = {
    "amazon2014": read_meta_lines,
    "amazon2018": read_meta_lines,
    "amazon2023": read_meta_lines,
    "p5_sequences": read_csv_items,
    "inter_item_json": read_item_json,
    "recbole_atomic": read_recbole_items,
}
