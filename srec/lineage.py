"""Lineage of the trained adapters: which captions and preference summaries an adapter was trained on.

Three sources, cross-checked:

* the adapter's ``manifest.json`` (``<artifacts>/lora_adapter/<category>/<version>/``): its caption and
  preference snapshot ids, the captioner / summariser models and prompt versions, the Dagster run id;
* the Dagster instance's event log: the ``lora_adapter`` materialization whose metadata ``version`` is the
  adapter's, its data provenance (the data version and storage id of the ``item_captions`` and
  ``user_preferences`` materializations it read), and those materializations themselves (run, time, metadata);
* the DuckDB tables: ``caption_snapshots`` / ``preference_snapshots`` (append-only: which caption / summary,
  by cache key, every item / user had in every snapshot ever materialized) joined with ``caption_cache`` /
  ``preference_cache`` (the texts, and the run that generated each), so the captions of an old snapshot stay
  listable after ``item_captions`` is re-materialized.

Nothing here writes: the DuckDB connection may be read-only, and an instance without matching records (another
``DAGSTER_HOME``) gives a note, not an error. The functions return plain dicts (JSON-serialisable);
``format_*`` render them for a terminal. Used by ``srec lineage``.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import duckdb
from dagster._core.definitions.data_version import DataProvenance  # noqa: PLC2701 (public class, private module)

from srec.captions import caption_snapshot
from srec.db import partition_content_hash, table_exists
from srec.preferences import preference_snapshot
from srec.recommender import artifacts

ADAPTER_ASSET = "lora_adapter"
CAPTIONS_ASSET = "item_captions"
PREFERENCES_ASSET = "user_preferences"
DATA_VERSION_TAG = "dagster/data_version"
PAGE = 100                       # records per event-log query
MAX_ALSO = 20                    # other materializations listed per snapshot


class LineageError(Exception):
    """A lineage question that has no answer: unknown category, no adapter, unknown version or snapshot."""


# --- small helpers --------------------------------------------------------------------------------

def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat(timespec="seconds")


def _plain(value: object) -> object:
    """A Dagster metadata value as plain JSON data."""
    v = getattr(value, "value", value)
    try:
        json.dumps(v)
    except TypeError:
        return str(v)
    return v




def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> list[dict]:
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def adapters_root(artifacts_root: str | Path) -> Path:
    """Where AdapterIOManager stores ``lora_adapter`` (``<artifacts>/lora_adapter``)."""
    return Path(artifacts_root) / ADAPTER_ASSET


# --- adapters on disk -----------------------------------------------------------------------------

def stored_adapters(artifacts_root: str | Path, category: str) -> list[artifacts.AdapterSet]:
    """Every stored adapter version of ``category``, oldest first."""
    base = adapters_root(artifacts_root) / category
    found = []
    if base.is_dir():
        for folder in base.iterdir():
            if folder.is_dir() and not folder.name.startswith("_") and (folder / artifacts.MANIFEST).is_file():
                found.append(artifacts.load(adapters_root(artifacts_root), category, folder.name))
    return sorted(found, key=lambda a: (a.manifest.get("created_at") or 0, a.version))


def adapter_categories(artifacts_root: str | Path) -> list[str]:
    base = adapters_root(artifacts_root)
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def resolve_adapter(artifacts_root: str | Path, category: str, version: str | None = None,
                    categories: Iterable[str] | None = None) -> tuple[artifacts.AdapterSet, str, list[str]]:
    """The adapter to inspect: ``version`` (or a unique prefix of one), else the ``current`` (serving) one,
    else the ``latest`` with a note. Returns (adapter, how it was selected, notes)."""
    if categories is not None and category not in set(categories):
        raise LineageError(f"unknown category {category!r}; declared: {', '.join(sorted(categories)) or '(none)'}")
    root = adapters_root(artifacts_root)
    stored = stored_adapters(artifacts_root, category)
    if not stored:
        raise LineageError(f"no lora_adapter stored for category {category!r} under {root / category}: "
                           f"materialize lora_adapter first (srec materialize --category {category})")
    notes: list[str] = []
    if version is not None:
        matches = [a for a in stored if a.version == version] or [a for a in stored if a.version.startswith(version)]
        if len(matches) != 1:
            listing = ", ".join(f"{a.version} ({_iso(a.manifest.get('created_at'))})" for a in stored)
            what = "matches several" if matches else "is not"
            raise LineageError(f"lora_adapter version {version!r} {what} a stored version of {category!r} "
                               f"under {root / category}; stored: {listing}")
        return matches[0], "version", notes
    for which in ("current", "latest"):
        p = artifacts.pointer(root, category, which)
        if p is None:
            notes.append(f"no {which} pointer ({which}.json) for {category!r}")
            continue
        try:
            return artifacts.load(root, category, p["version"]), which, notes
        except FileNotFoundError as e:
            notes.append(f"the {which} pointer names {p['version']}, which is not stored: {e}")
    notes.append("using the most recently created stored version")
    return stored[-1], "newest stored", notes


# --- the Dagster event log ------------------------------------------------------------------------

def _materializations(instance: dg.DagsterInstance, asset: str, category: str | None = None,
                      storage_ids: list[int] | None = None) -> Iterator:
    """Materialization records of ``asset`` (one partition, or all), newest first."""
    cursor = None
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[category] if category else None,
                                  storage_ids=storage_ids),
            limit=PAGE, cursor=cursor)
        yield from result.records
        if not result.has_more:
            return
        cursor = result.cursor


def _data_version(record) -> str | None:
    return (record.asset_materialization.tags or {}).get(DATA_VERSION_TAG)


def _meta(record, key: str) -> object:
    value = record.asset_materialization.metadata.get(key)
    return None if value is None else _plain(value)


def record_summary(instance: dg.DagsterInstance, record, keys: Iterable[str] = ()) -> dict:
    """A materialization record as plain data: run, storage id, time, data version, provenance, metadata."""
    mat = record.asset_materialization
    prov = DataProvenance.from_tags(mat.tags or {})
    run = instance.get_run_by_id(record.run_id)
    return {
        "asset": mat.asset_key.to_user_string(),
        "partition": record.partition_key,
        "run_id": record.run_id,
        "storage_id": record.storage_id,
        "timestamp": record.timestamp,
        "time": _iso(record.timestamp),
        "data_version": _data_version(record),
        "code_version": prov.code_version if prov else None,
        "input_data_versions": {k.to_user_string(): v.value for k, v in prov.input_data_versions.items()}
        if prov else {},
        "input_storage_ids": {k.to_user_string(): v for k, v in prov.input_storage_ids.items()} if prov else {},
        "run": None if run is None else {"job_name": run.job_name, "status": run.status.value},
        "metadata": {k: _meta(record, k) for k in keys if k in mat.metadata},
    }


def find_adapter_record(instance: dg.DagsterInstance, category: str, version: str):
    """The newest ``lora_adapter`` materialization of ``category`` whose metadata ``version`` (or data version) is
    ``version``; None when the instance has none. (Searched through the asset index: with the default SQLite
    storage, records fetched per run carry the run shard's ids, not the storage ids provenance refers to.)"""
    return next((r for r in _materializations(instance, ADAPTER_ASSET, category)
                 if _meta(r, "version") == version or _data_version(r) == version), None)


def partition_input_version(version: str) -> str:
    """How Dagster writes a partitioned upstream's data version into a downstream materialization's provenance
    (``dagster/input_data_version/<asset>``) when one upstream partition feeds it: the sha256 of that
    partition's data version (the sorted partitions' versions, concatenated)."""
    return hashlib.sha256(version.encode("utf8")).hexdigest()


def _is_version(recorded: str | None, version: str | None) -> bool:
    return recorded is not None and version is not None and recorded in (version, partition_input_version(version))


def _provenance(record, asset: str) -> tuple[str | None, int | None]:
    """(input data version, input storage id) of ``asset`` in ``record``'s data provenance."""
    if record is None:
        return None, None
    prov = DataProvenance.from_tags(record.asset_materialization.tags or {})
    key = dg.AssetKey(asset)
    if prov is None or not prov.has_input_asset(key):
        return None, None
    return prov.input_data_versions[key].value, prov.input_storage_ids[key]


def _snapshot_records(instance: dg.DagsterInstance, asset: str, category: str | None, snapshot: str,
                      meta_key: str) -> list:
    return [r for r in _materializations(instance, asset, category)
            if _data_version(r) == snapshot or _meta(r, meta_key) == snapshot]


def _upstream(instance: dg.DagsterInstance, adapter_record, asset: str, category: str, snapshot: str | None,
              meta_key: str, keys: tuple[str, ...], created_at: float | None, notes: list[str]) -> dict:
    """The materialization of ``asset`` that produced ``snapshot``, and whether the adapter's Dagster provenance
    agrees. Dagster's input pointer (storage id) is the upstream's latest event of *any* partition when the adapter
    ran, so it is used only when it is this partition's event with this snapshot; otherwise the newest
    materialization of the partition with the snapshot that precedes the adapter."""
    out: dict = {"materialization": None, "found_by": None, "provenance_confirms": None, "confirmed": False,
                 "also_materialized_by": []}
    if snapshot is None:
        return out
    prov_version, prov_id = _provenance(adapter_record, asset)
    if prov_version is not None:
        out["provenance_confirms"] = _is_version(prov_version, snapshot)
        if not out["provenance_confirms"]:
            notes.append(f"Dagster's provenance of the lora_adapter materialization records {asset} input data "
                         f"version {prov_version}, which is not snapshot {snapshot} (nor its partition hash)")
    chosen, found_by = None, None
    if prov_id is not None:
        hit = next(iter(_materializations(instance, asset, category, storage_ids=[prov_id])), None)
        if hit is not None and (_data_version(hit) == snapshot or _meta(hit, meta_key) == snapshot):
            chosen, found_by = hit, "the input event pointer in the lora_adapter materialization's provenance"
    matching = _snapshot_records(instance, asset, category, snapshot, meta_key)
    if chosen is None and matching:
        before = [r for r in matching if created_at is None or r.timestamp <= created_at + 1]
        chosen = (before or matching)[0]
        found_by = f"the newest {asset} materialization of the partition with this snapshot" + (
            "" if before else " (recorded after the adapter)")
    if chosen is None:
        notes.append(f"the Dagster instance has no {asset} materialization of {category!r} with snapshot {snapshot}")
        return out
    out.update(materialization=record_summary(instance, chosen, keys), found_by=found_by,
               confirmed=out["provenance_confirms"] is not False)
    out["also_materialized_by"] = [{"run_id": r.run_id, "storage_id": r.storage_id, "time": _iso(r.timestamp)}
                                   for r in matching if r.storage_id != chosen.storage_id][:MAX_ALSO]
    return out


# --- snapshot membership in DuckDB ----------------------------------------------------------------

def snapshot_captions(con: duckdb.DuckDBPyConnection, category: str, snapshot: str) -> tuple[list[dict] | None, str]:
    """Per item of caption ``snapshot``: its caption and what produced it. (rows, source); rows None when the
    snapshot was never recorded and item_captions no longer holds it."""
    if table_exists(con, "caption_snapshots") and table_exists(con, "caption_cache"):
        rows = _rows(con, """
            SELECT s.item_id, s.status, s.modality, c.caption, s.model, s.model_fingerprint, s.prompt_version,
                   s.cache_key, c.run_id AS generated_by_run, c.created_at AS generated_at,
                   s.run_id AS recorded_by_run
            FROM caption_snapshots s LEFT JOIN caption_cache c USING (cache_key)
            WHERE s.category = ? AND s.snapshot = ? ORDER BY s.item_id""", [category, snapshot])
        if rows:
            return rows, "caption_snapshots"
    if table_exists(con, "item_captions") and caption_snapshot(con, category) == snapshot:
        cache = "caption_cache" if table_exists(con, "caption_cache") else None
        rows = _rows(con, f"""
            SELECT i.item_id, i.status, i.modality, i.caption, i.model, i.model_fingerprint, i.prompt_version,
                   i.cache_key, {"c.run_id" if cache else "NULL"} AS generated_by_run,
                   {"c.created_at" if cache else "NULL"} AS generated_at, NULL AS recorded_by_run
            FROM item_captions i {"LEFT JOIN caption_cache c USING (cache_key)" if cache else ""}
            WHERE i.category = ? ORDER BY i.item_id""", [category])
        return rows, "item_captions (the current partition; the snapshot is not in caption_snapshots)"
    return None, "unavailable"


def snapshot_preferences(con: duckdb.DuckDBPyConnection, category: str,
                         snapshot: str) -> tuple[list[dict] | None, str]:
    """Per (user, split, mode, target) of preference ``snapshot``: its summary and what produced it."""
    if table_exists(con, "preference_snapshots") and table_exists(con, "preference_cache"):
        rows = _rows(con, """
            SELECT s.user_id, s.split, s.mode, s.target_seq_index, s.status, c.summary, s.model,
                   s.model_fingerprint, s.prompt_version, s.caption_snapshot, s.cache_key,
                   c.run_id AS generated_by_run, c.created_at AS generated_at, s.run_id AS recorded_by_run
            FROM preference_snapshots s LEFT JOIN preference_cache c USING (cache_key)
            WHERE s.category = ? AND s.snapshot = ? ORDER BY s.user_id, s.split, s.mode, s.target_seq_index""",
                     [category, snapshot])
        if rows:
            return rows, "preference_snapshots"
    if table_exists(con, "user_preferences") and preference_snapshot(con, category) == snapshot:
        cache = "preference_cache" if table_exists(con, "preference_cache") else None
        rows = _rows(con, f"""
            SELECT p.user_id, p.split, p.mode, p.target_seq_index, p.status, p.summary, p.model,
                   p.model_fingerprint, p.prompt_version, p.caption_snapshot, p.cache_key,
                   {"c.run_id" if cache else "NULL"} AS generated_by_run,
                   {"c.created_at" if cache else "NULL"} AS generated_at, NULL AS recorded_by_run
            FROM user_preferences p {"LEFT JOIN preference_cache c USING (cache_key)" if cache else ""}
            WHERE p.category = ? ORDER BY p.user_id, p.split, p.mode, p.target_seq_index""", [category])
        return rows, "user_preferences (the current partition; the snapshot is not in preference_snapshots)"
    return None, "unavailable"


def _recorded(con: duckdb.DuckDBPyConnection, table: str, category: str, snapshot: str) -> bool:
    return table_exists(con, table) and con.execute(
        f"SELECT count(*) FROM {table} WHERE category = ? AND snapshot = ?", [category, snapshot]).fetchall()[0][0] > 0


def _resolve_preference_snapshot(instance: dg.DagsterInstance, con: duckdb.DuckDBPyConnection, category: str,
                                 manifest_id: str | None, adapter_record, notes: list[str]) -> str | None:
    """The preference snapshot id (user_preferences DataVersion) the adapter was trained on. A manifest that
    recorded a whole-table hash instead is resolved through Dagster's provenance (the user_preferences
    materialization whose data version it hashes), or else through the current table."""
    if manifest_id is None:
        return None
    if _recorded(con, "preference_snapshots", category, manifest_id) or (
            table_exists(con, "user_preferences") and preference_snapshot(con, category) == manifest_id):
        return manifest_id
    prov_version, _ = _provenance(adapter_record, PREFERENCES_ASSET)
    if prov_version is not None:
        for r in _materializations(instance, PREFERENCES_ASSET, category):
            if _is_version(prov_version, _data_version(r)):
                notes.append(f"the manifest's preference_snapshot {manifest_id} is not a user_preferences "
                             f"DataVersion (a whole-table hash); Dagster's provenance of the lora_adapter "
                             f"materialization resolves it to {_data_version(r)}")
                return _data_version(r)
    if table_exists(con, "user_preferences") and partition_content_hash(con, "user_preferences",
                                                                         category) == manifest_id:
        resolved = preference_snapshot(con, category)
        notes.append(f"the manifest's preference_snapshot {manifest_id} is a whole-table hash of the current "
                     f"user_preferences partition, whose snapshot id is {resolved}")
        return resolved
    notes.append(f"the manifest's preference_snapshot {manifest_id} matches no recorded preference snapshot "
                 f"and the Dagster instance has no provenance for it")
    return manifest_id


# --- the questions --------------------------------------------------------------------------------

def _models(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    counts = Counter(tuple(r[k] for k in keys) for r in rows)
    return [dict(zip(keys, k)) | {"rows": n} for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def adapter_lineage(instance: dg.DagsterInstance, con: duckdb.DuckDBPyConnection, artifacts_root: str | Path,
                    category: str, version: str | None = None, *, categories: Iterable[str] | None = None) -> dict:
    """Everything behind one adapter of ``category`` (``version``, else the current one, else the latest): the
    adapter and its Dagster materialization, the caption snapshot it was trained on (captioner models and
    prompt versions, the item_captions materialization, every item's caption), and the same for the
    preference summaries. See the module docstring for the sources."""
    adapter, selected_by, notes = resolve_adapter(artifacts_root, category, version, categories)
    m = adapter.manifest
    data = m.get("data") or {}
    record = find_adapter_record(instance, category, adapter.version)
    if record is None:
        notes.append(f"the Dagster instance at {instance.root_directory} has no lora_adapter materialization of "
                     f"{category!r} with version {adapter.version} (another DAGSTER_HOME?)")
    root = adapters_root(artifacts_root)
    pointers = {w: (artifacts.pointer(root, category, w) or {}).get("version") for w in ("current", "latest")}
    adapter_out = {
        "version": adapter.version,
        "folder": str(adapter.folder),
        "selected_by": selected_by,
        "is_current": pointers["current"] == adapter.version,
        "is_latest": pointers["latest"] == adapter.version,
        "promotion": m.get("promotion"),
        "base_model": m.get("base_model"),
        "base_fingerprint": m.get("base_fingerprint"),
        "tiny_random_weights": m.get("tiny_random_weights"),
        "created_at": m.get("created_at"),
        "created": _iso(m.get("created_at")),
        "dagster_run_id": m.get("dagster_run_id"),
        "data": data,
        "variants": {k: {**{f: v.get(f) for f in ("best_valid_auc", "base_valid_auc", "best_epoch", "epochs_run",
                                                  "prompt_version", "reused", "trained_run_id") if f in v},
                         **({"trained": _iso(v["trained_at"])} if v.get("trained_at") else {})}
                     for k, v in (m.get("variants") or {}).items()},
        "settings": m.get("settings"),
        "materialization": None if record is None else record_summary(
            instance, record, ("version", "caption_snapshot", "preference_snapshot", "base_model", "path")),
        "confirmed": record is not None and record.run_id == m.get("dagster_run_id", record.run_id),
    }
    if record is not None and m.get("dagster_run_id") and record.run_id != m["dagster_run_id"]:
        notes.append(f"the manifest names run {m['dagster_run_id']}, the Dagster record of this version is from "
                     f"run {record.run_id}")

    # captions
    cap_id = data.get("caption_snapshot")
    cap_notes: list[str] = []
    cap = _upstream(instance, record, CAPTIONS_ASSET, category, cap_id, "caption_snapshot",
                    ("caption_snapshot", "captioner", "prompt_versions", "items", "new", "cached", "failed"),
                    m.get("created_at"), cap_notes)
    items, source = snapshot_captions(con, category, cap_id) if cap_id else (None, "unavailable")
    if items is None and cap_id:
        cap_notes.append(f"per-item captions of snapshot {cap_id} are not available: it is not in "
                         f"caption_snapshots (materialized before the table existed?) and item_captions now holds "
                         f"another snapshot")
    captions_out = {
        "snapshot": cap_id,
        "captioners": m.get("captions") or [],
        "models": _models(items, ("model", "model_fingerprint", "prompt_version", "modality")) if items else [],
        **cap,
        "source": source,
        "items": len(items) if items is not None else None,
        "ok": sum(r["status"] == "ok" for r in items) if items is not None else None,
        "failed": sum(r["status"] != "ok" for r in items) if items is not None else None,
        "generated_by_runs": dict(Counter(r["generated_by_run"] for r in items if r["status"] == "ok"))
        if items else {},
        "captions": items,
    }

    # preferences
    pref_notes: list[str] = []
    pref_id = _resolve_preference_snapshot(instance, con, category, data.get("preference_snapshot"), record, pref_notes)
    pref = _upstream(instance, record, PREFERENCES_ASSET, category, pref_id, "preference_snapshot",
                     ("preference_snapshot", "caption_snapshot", "summariser", "prompt_versions", "generated",
                      "cached", "failed"), m.get("created_at"), pref_notes)
    rows, psource = snapshot_preferences(con, category, pref_id) if pref_id else (None, "unavailable")
    if rows is None and pref_id:
        pref_notes.append(f"per-user summaries of preference snapshot {pref_id} are not available: not in "
                          f"preference_snapshots and user_preferences now holds another snapshot")
    used_caps = sorted({r["caption_snapshot"] for r in rows}) if rows else []
    if used_caps and used_caps != [cap_id]:
        pref_notes.append(f"the preference summaries read caption snapshot(s) {used_caps}, the adapter's caption "
                          f"snapshot is {cap_id}")
    preferences_out = {
        "snapshot": pref_id,
        "manifest_snapshot": data.get("preference_snapshot"),
        "summarisers": m.get("preferences") or [],
        "models": _models(rows, ("mode", "model", "model_fingerprint", "prompt_version")) if rows else [],
        "caption_snapshots_read": used_caps,
        **pref,
        "source": psource,
        "rows": len(rows) if rows is not None else None,
        "ok": sum(r["status"] == "ok" for r in rows) if rows is not None else None,
        "failed": sum(r["status"] != "ok" for r in rows) if rows is not None else None,
        "generated_by_runs": dict(Counter(r["generated_by_run"] for r in rows if r["status"] == "ok"))
        if rows else {},
        "summaries": rows,
    }
    return {
        "category": category,
        "dagster_home": instance.root_directory,
        "adapter": adapter_out,
        "captions": captions_out,
        "preferences": preferences_out,
        "notes": notes + cap_notes + pref_notes,
    }


def _adapters_by_caption_snapshot(instance: dg.DagsterInstance, artifacts_root: str | Path,
                                  categories: list[str]) -> dict[str, list[dict]]:
    """caption snapshot -> the adapters trained on it, from the manifests and from the lora_adapter
    materializations the Dagster instance recorded (metadata, or the provenance's item_captions version)."""
    found: dict[tuple[str, str], dict] = {}
    root = adapters_root(artifacts_root)
    for cat in categories:
        pointers = {w: (artifacts.pointer(root, cat, w) or {}).get("version") for w in ("current", "latest")}
        for a in stored_adapters(artifacts_root, cat):
            found[(cat, a.version)] = {
                "category": cat, "version": a.version,
                "caption_snapshot": (a.manifest.get("data") or {}).get("caption_snapshot"),
                "created": _iso(a.manifest.get("created_at")), "dagster_run_id": a.manifest.get("dagster_run_id"),
                "stored": True, "is_current": pointers["current"] == a.version,
                "is_latest": pointers["latest"] == a.version, "materializations": [],
            }
    for r in _materializations(instance, ADAPTER_ASSET, categories[0] if len(categories) == 1 else None):
        version = _meta(r, "version") or _data_version(r)
        snap = _meta(r, "caption_snapshot")
        entry = found.setdefault((r.partition_key, version), {
            "category": r.partition_key, "version": version, "caption_snapshot": snap, "created": None,
            "dagster_run_id": r.run_id, "stored": False, "is_current": False, "is_latest": False,
            "materializations": []})
        entry["materializations"].append({"run_id": r.run_id, "storage_id": r.storage_id, "time": _iso(r.timestamp)})
    by_snapshot: dict[str, list[dict]] = {}
    for entry in found.values():
        if entry["caption_snapshot"]:
            by_snapshot.setdefault(entry["caption_snapshot"], []).append(entry)
    for entries in by_snapshot.values():
        entries.sort(key=lambda e: (e["category"], e["created"] or "", e["version"]))
    return by_snapshot


def adapters_using_caption_snapshot(instance: dg.DagsterInstance, con: duckdb.DuckDBPyConnection,
                                    artifacts_root: str | Path, snapshot: str, category: str | None = None, *,
                                    categories: Iterable[str] | None = None) -> dict:
    """Which adapters were trained on caption ``snapshot`` (in ``category``, or in any), with the item_captions
    materializations that produced it and how many items it holds."""
    if category is not None and categories is not None and category not in set(categories):
        raise LineageError(f"unknown category {category!r}; declared: {', '.join(sorted(categories))}")
    cats = [category] if category else sorted(set(adapter_categories(artifacts_root)) | set(categories or []))
    adapters = _adapters_by_caption_snapshot(instance, artifacts_root, cats).get(snapshot, []) if cats else []
    members = []
    if table_exists(con, "caption_snapshots"):
        sql = ("SELECT category, count(*) AS items, count(*) FILTER (status = 'ok') AS ok, min(run_id) AS run_id "
               "FROM caption_snapshots WHERE snapshot = ?" + (" AND category = ?" if category else "") +
               " GROUP BY category ORDER BY category")
        members = _rows(con, sql, [snapshot] + ([category] if category else []))
    records = [record_summary(instance, r, ("caption_snapshot", "prompt_versions"))
               for r in _snapshot_records(instance, CAPTIONS_ASSET, category, snapshot, "caption_snapshot")][:MAX_ALSO]
    if not adapters and not members and not records:
        raise LineageError(f"caption snapshot {snapshot!r} is unknown: no adapter manifest or lora_adapter "
                           f"materialization names it, it is not in caption_snapshots, and the Dagster instance at "
                           f"{instance.root_directory} has no item_captions materialization with it")
    return {"caption_snapshot": snapshot, "category": category, "dagster_home": instance.root_directory,
            "adapters": adapters, "recorded": members, "item_captions_materializations": records}


def adapters_using_item_caption(instance: dg.DagsterInstance, con: duckdb.DuckDBPyConnection,
                                artifacts_root: str | Path, category: str, item_id: str,
                                cache_key: str | None = None, *, categories: Iterable[str] | None = None) -> dict:
    """Every caption ``item_id`` has had in ``category`` (or only ``cache_key``): its text, model, prompt
    version and generating run, the caption snapshots it was part of, and the adapters trained on those."""
    if categories is not None and category not in set(categories):
        raise LineageError(f"unknown category {category!r}; declared: {', '.join(sorted(categories))}")
    if not table_exists(con, "caption_snapshots"):
        raise LineageError("the database has no caption_snapshots table: materialize item_captions with this "
                           "version of srec first")
    sql = """
        SELECT s.cache_key, s.snapshot, s.status, s.modality, s.model, s.model_fingerprint, s.prompt_version,
               c.caption, c.run_id AS generated_by_run, c.created_at AS generated_at
        FROM caption_snapshots s LEFT JOIN caption_cache c USING (cache_key)
        WHERE s.category = ? AND s.item_id = ?""" + (" AND s.cache_key = ?" if cache_key else "") + \
        " ORDER BY s.recorded_at, s.snapshot"
    rows = _rows(con, sql, [category, item_id] + ([cache_key] if cache_key else []))
    if not rows:
        what = f"item {item_id!r}" + (f" with cache key {cache_key!r}" if cache_key else "")
        raise LineageError(f"{what} is in no recorded caption snapshot of {category!r}")
    by_snapshot = _adapters_by_caption_snapshot(instance, artifacts_root, [category])
    recorded = {r[0] for r in con.execute("SELECT DISTINCT snapshot FROM caption_snapshots WHERE category = ?",
                                          [category]).fetchall()}
    captions: dict[str, dict] = {}
    for r in rows:
        entry = captions.setdefault(r["cache_key"], {
            k: r[k] for k in ("cache_key", "status", "modality", "caption", "model", "model_fingerprint",
                              "prompt_version", "generated_by_run")} | {"generated": _iso(r["generated_at"]),
                                                                        "snapshots": [], "adapters": []})
        entry["snapshots"].append(r["snapshot"])
        entry["adapters"] += [{k: a[k] for k in ("version", "caption_snapshot", "created", "dagster_run_id",
                                                  "is_current", "is_latest", "stored")}
                              for a in by_snapshot.get(r["snapshot"], [])]
    unresolved = sorted({a["version"] for snap, ads in by_snapshot.items() if snap not in recorded for a in ads})
    return {"category": category, "item_id": item_id, "cache_key": cache_key,
            "dagster_home": instance.root_directory, "captions": list(captions.values()),
            "adapters_with_unrecorded_snapshots": unresolved}


# --- text rendering -------------------------------------------------------------------------------

def _short(text: object, n: int = 90) -> str:
    s = " ".join(str(text).split()) if text is not None else "(none)"
    s = "".join(ch if ch.isprintable() else "?" for ch in s)
    return s if len(s) <= n else s[:n - 3] + "..."


def _num(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _record_line(rec: dict | None, found_by: str | None = None) -> str:
    if rec is None:
        return "no Dagster record"
    run = rec.get("run") or {}
    return (f"{rec['asset']} materialization (storage id {rec['storage_id']}) in run {rec['run_id']} "
            f"[{run.get('job_name', '?')}, {run.get('status', 'run not in instance')}] at {rec['time']}, "
            f"data version {rec['data_version']}" + (f"; found by {found_by}" if found_by else ""))


def format_adapter_lineage(d: dict, examples: int = 3) -> str:
    a, c, p = d["adapter"], d["captions"], d["preferences"]
    out = [f"lora_adapter {d['category']} @ {a['version']} ({a['selected_by']}"
           + ("; current" if a["is_current"] and a["selected_by"] != "current" else "")
           + ("; latest" if a["is_latest"] and a["selected_by"] != "latest" else "") + ")",
           f"  folder:       {a['folder']}",
           f"  base model:   {a['base_model']} (fingerprint {a['base_fingerprint']})"
           + (", tiny random weights" if a["tiny_random_weights"] else ""),
           f"  written:      {a['created']} by run {a['dagster_run_id']}"]
    if a.get("promotion"):
        pr = a["promotion"]
        out.append(f"  promotion:    {'promoted' if pr.get('promoted') else 'not promoted'}"
                   + (f" ({pr.get('reason')})" if pr.get("reason") else ""))
    for name, v in a["variants"].items():
        trained = (f"; trained {v['trained']} by run {v['trained_run_id'] or '(outside Dagster)'}"
                   if v.get("trained") else "")  # manifests from before srec recorded it have no such fields
        out.append(f"  variant:      {name}: valid AUC {_num(v.get('best_valid_auc'))} "
                   f"(base {_num(v.get('base_valid_auc'))}), best epoch {v.get('best_epoch')}{trained}"
                   + (" (a finished run this materialization reused)" if v.get("reused") else ""))
    out.append(f"  Dagster:      {_record_line(a['materialization'])}"
               + (" (confirmed)" if a["confirmed"] else ""))
    out += ["", f"captions: snapshot {c['snapshot']}"]
    for cap in c["captioners"]:
        out.append(f"  captioner:    {cap.get('model')} (fingerprint {cap.get('fingerprint')}), "
                   f"prompt {cap.get('prompt_version')}")
    out.append(f"  produced by:  {_record_line(c['materialization'], c['found_by'])}")
    if c["also_materialized_by"]:
        out.append(f"                (also materialized with the same content by {len(c['also_materialized_by'])} "
                   f"other run(s))")
    if c["captions"] is not None:
        runs = ", ".join(f"{n} in run {r}" for r, n in c["generated_by_runs"].items())
        out.append(f"  items:        {c['items']} ({c['ok']} ok, {c['failed']} failed), from {c['source']}; "
                   f"generated: {runs or 'none'}")
        for r in [r for r in c["captions"] if r["status"] == "ok"][:examples]:
            out.append(f"    {r['item_id']} [{r['modality']}, {r['prompt_version']}]: {_short(r['caption'])}")
        if c["items"] > examples:
            out.append("    ... (--json lists every item)")
    out += ["", f"preferences: snapshot {p['snapshot']}"
            + (f" (manifest: {p['manifest_snapshot']})" if p["manifest_snapshot"] != p["snapshot"] else "")]
    for s in p["summarisers"]:
        out.append(f"  summariser:   {s.get('mode')}: {s.get('model')} (fingerprint {s.get('fingerprint')}), "
                   f"prompt {s.get('prompt_version')}")
    out.append(f"  produced by:  {_record_line(p['materialization'], p['found_by'])}")
    if p["summaries"] is not None:
        runs = ", ".join(f"{n} in run {r}" for r, n in p["generated_by_runs"].items())
        out.append(f"  rows:         {p['rows']} ({p['ok']} ok, {p['failed']} failed), from {p['source']}; "
                   f"read caption snapshot {', '.join(p['caption_snapshots_read'])}; generated: {runs or 'none'}")
        for r in [r for r in p["summaries"] if r["status"] == "ok"][:examples]:
            out.append(f"    {r['user_id']} {r['split']} {r['mode']}: {_short(r['summary'])}")
    if d["notes"]:
        out += ["", "notes:"] + [f"  - {n}" for n in d["notes"]]
    return "\n".join(out)


def format_caption_snapshot_usage(d: dict) -> str:
    out = [f"caption snapshot {d['caption_snapshot']}"]
    for m in d["recorded"]:
        out.append(f"  {m['category']}: {m['items']} items ({m['ok']} ok), first recorded by run {m['run_id']}")
    for r in d["item_captions_materializations"]:
        out.append(f"  produced by: {_record_line(r)}")
    if not d["adapters"]:
        out.append("  no adapter was trained on it")
    for a in d["adapters"]:
        flags = ", ".join(f for f, on in (("current", a["is_current"]), ("latest", a["is_latest"]),
                                          ("not stored", not a["stored"])) if on)
        out.append(f"  adapter {a['category']} @ {a['version']} (created {a['created']}, run {a['dagster_run_id']}"
                   + (f"; {flags}" if flags else "") + ")")
    return "\n".join(out)


def format_item_caption_usage(d: dict) -> str:
    out = [f"item {d['item_id']} in {d['category']}: {len(d['captions'])} caption(s)"]
    for c in d["captions"]:
        out.append(f"  {c['cache_key']} [{c['status']}, {c['modality']}] {c['model']}, prompt {c['prompt_version']},"
                   f" generated {c['generated']} by run {c['generated_by_run']}")
        out.append(f"    {_short(c['caption'], 110)}")
        out.append(f"    in caption snapshot(s): {', '.join(c['snapshots'])}")
        versions = sorted({a["version"] for a in c["adapters"]})
        out.append(f"    adapters trained on it: {', '.join(versions) if versions else 'none'}")
    if d["adapters_with_unrecorded_snapshots"]:
        out.append(f"  unknown for adapters whose caption snapshot was never recorded: "
                   f"{', '.join(d['adapters_with_unrecorded_snapshots'])}")
    return "\n".join(out)
