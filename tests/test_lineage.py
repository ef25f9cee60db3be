"""Lineage of trained adapters (srec.lineage, `srec lineage`): on a real Dagster instance across two retrains
with the captions changed between them, and the clear errors."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest

from srec import lineage as lin
from srec.captions import caption_snapshot, record_caption_snapshot
from srec.db import ensure_tables
from srec.recommender import artifacts
from srec_assets.assets.ingest import raw_items, raw_reviews
from srec_assets.assets.mllm import item_captions, item_images, user_preferences
from srec_assets.assets.recommender import lora_adapter, sft_examples
from srec_assets.assets.sequences import eval_candidates, interactions
from srec_assets.checks import ALL_CHECKS
from srec_assets.cli import main
from tests.test_mllm_assets import scientific_with_images  # noqa: F401 (fixture)

ASSETS = [raw_reviews, raw_items, interactions, eval_candidates, item_images, item_captions, user_preferences,
          sft_examples, lora_adapter]
NAMES = {a.key.path[0] for a in ASSETS}
CHECKS = [c for c in ALL_CHECKS if all(k.asset_key.path[0] in NAMES for k in c.check_keys)]
REC = {"variants": ["lora:fused+recurrent"], "epochs": 1, "batch_size": 8, "patience": 0, "valid_users": 6,
       "history_items": 5}
RUN_CONFIG = {"ops": {"sft_examples": {"config": REC}, "lora_adapter": {"config": REC},
                      "user_preferences": {"config": {"modes": ["recurrent"]}}}}
# The retrain: captions from a shorter description (new cache keys, new prompts) -> new snapshots downstream.
RETRAIN_CONFIG = {"ops": {**RUN_CONFIG["ops"], "item_captions": {"config": {"max_description_chars": 40}}}}


def _data_version(result, node: str) -> str:
    return result.asset_materializations_for_node(node)[0].tags["dagster/data_version"]


def _record(instance, asset: str, run_id: str):
    recs = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset),
                                                                 asset_partitions=["beauty"]), limit=50).records
    (rec,) = [r for r in recs if r.run_id == run_id]
    return rec


def _cli_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["lineage", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_lineage_across_two_retrains_with_changed_captions(scientific_with_images, storage, model_resources,
                                                           capsys, tmp_path):
    resources = {"storage": storage, **model_resources}
    root = storage.artifacts_dir
    paths = ["--database", storage.database, "--artifacts", root]
    with dg.instance_for_test() as instance:
        first = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                               run_config=RUN_CONFIG)
        assert first.success
        v1 = first.output_for_node("lora_adapter").version
        with duckdb.connect(storage.database, read_only=True) as con:
            captions_1 = dict(con.execute("SELECT item_id, caption FROM item_captions").fetchall())
            summaries_1 = {tuple(r[:4]): r[4] for r in con.execute(
                "SELECT user_id, split, mode, target_seq_index, summary FROM user_preferences").fetchall()}

        second = dg.materialize(ASSETS + CHECKS, partition_key="beauty", resources=resources, instance=instance,
                                run_config=RETRAIN_CONFIG,
                                selection=dg.AssetSelection.assets(item_captions, user_preferences, sft_examples,
                                                                   lora_adapter))
        assert second.success
        v2 = second.output_for_node("lora_adapter").version
        snap = {1: _data_version(first, "item_captions"), 2: _data_version(second, "item_captions")}
        pref = {1: _data_version(first, "user_preferences"), 2: _data_version(second, "user_preferences")}
        assert v1 != v2 and snap[1] != snap[2] and pref[1] != pref[2]
        assert second.asset_materializations_for_node("item_captions")[0].metadata["new"].value > 0

        con = duckdb.connect(storage.database, read_only=True)
        t0 = time.perf_counter()
        out = {n: lin.adapter_lineage(instance, con, root, "beauty", v) for n, v in ((1, v1), (2, v2))}
        assert time.perf_counter() - t0 < 30
        for n, result, version in ((1, first, v1), (2, second, v2)):
            d = out[n]
            assert d["notes"] == [] or all("whole-table hash" in x for x in d["notes"]), d["notes"]
            # the adapter, and the lora_adapter materialization Dagster recorded for it
            a = d["adapter"]
            assert a["version"] == version and a["selected_by"] == "version" and a["confirmed"]
            rec = _record(instance, "lora_adapter", result.run_id)
            assert a["materialization"]["run_id"] == result.run_id == a["dagster_run_id"]
            assert a["materialization"]["storage_id"] == rec.storage_id
            assert a["materialization"]["data_version"] == version
            # Dagster's provenance: a one-partition upstream's data version is recorded as its sha256
            assert a["materialization"]["input_data_versions"]["item_captions"] == lin.partition_input_version(snap[n])
            assert a["materialization"]["input_data_versions"]["user_preferences"] == lin.partition_input_version(
                pref[n])
            # its caption snapshot: the captioner and prompt versions, the item_captions materialization
            c = d["captions"]
            assert c["snapshot"] == snap[n] and c["confirmed"] and c["provenance_confirms"]
            assert c["materialization"]["run_id"] == result.run_id
            assert c["materialization"]["storage_id"] == _record(instance, "item_captions", result.run_id).storage_id
            assert c["materialization"]["storage_id"] == a["materialization"]["input_storage_ids"]["item_captions"]
            assert "provenance" in c["found_by"]
            assert c["materialization"]["metadata"]["caption_snapshot"] == snap[n]
            assert {x["model"] for x in c["captioners"]} == {model_resources["captioner"].model}
            assert {x["prompt_version"] for x in c["captioners"]} == {m["prompt_version"] for m in c["models"]}
            assert all(x["prompt_version"].startswith("caption_") for x in c["captioners"])
            assert c["source"] == "caption_snapshots" and c["items"] == len(scientific_with_images)
            assert all(r["generated_by_run"] in (first.run_id, second.run_id) for r in c["captions"] if r["caption"])
            # the same for the preference summaries
            p = d["preferences"]
            assert p["snapshot"] == pref[n] and p["confirmed"] and p["source"] == "preference_snapshots"
            assert p["materialization"]["run_id"] == result.run_id
            assert p["caption_snapshots_read"] == [snap[n]]
            assert {s["mode"] for s in p["summarisers"]} == {"recurrent"}
        # The first snapshot's captions and summaries are still answerable after the retrain, and differ from the
        # second's; the second snapshot's captions were generated by the second run.
        by_item = {n: {r["item_id"]: r for r in out[n]["captions"]["captions"]} for n in (1, 2)}
        assert {i: r["caption"] for i, r in by_item[1].items()} == captions_1
        assert all(r["generated_by_run"] == first.run_id for r in by_item[1].values() if r["status"] == "ok")
        changed = [i for i in sorted(by_item[1]) if by_item[1][i]["cache_key"] != by_item[2][i]["cache_key"]]
        same = [i for i in sorted(by_item[1]) if i not in changed]  # descriptions under 40 characters
        assert len(changed) > len(by_item[1]) // 2
        assert sum(by_item[1][i]["caption"] != by_item[2][i]["caption"] for i in changed) > 0
        assert all(by_item[2][i]["generated_by_run"] == second.run_id for i in changed)
        assert all(by_item[2][i]["generated_by_run"] == first.run_id for i in same)
        assert {(r["user_id"], r["split"], r["mode"], r["target_seq_index"]): r["summary"]
                for r in out[1]["preferences"]["summaries"]} == summaries_1

        # No version: the current (serving) adapter, else the latest.
        current = artifacts.pointer(Path(root) / "lora_adapter", "beauty", "current")
        default = lin.adapter_lineage(instance, con, root, "beauty")
        assert default["adapter"]["version"] == (current["version"] if current else v2)

        # The reverse questions.
        for n, version in ((1, v1), (2, v2)):
            used = lin.adapters_using_caption_snapshot(instance, con, root, snap[n])
            assert [a["version"] for a in used["adapters"]] == [version]
            assert used["adapters"][0]["materializations"][0]["run_id"] == (first, second)[n - 1].run_id
            assert used["recorded"][0]["items"] == len(scientific_with_images)
        item = changed[0]
        usage = lin.adapters_using_item_caption(instance, con, root, "beauty", item)
        assert {c["cache_key"]: sorted({a["version"] for a in c["adapters"]}) for c in usage["captions"]} == {
            by_item[1][item]["cache_key"]: [v1], by_item[2][item]["cache_key"]: [v2]}
        only = lin.adapters_using_item_caption(instance, con, root, "beauty", item, by_item[2][item]["cache_key"])
        assert [c["snapshots"] for c in only["captions"]] == [[snap[2]]]
        if same:  # a caption both snapshots share was used by both adapters
            both = lin.adapters_using_item_caption(instance, con, root, "beauty", same[0])
            assert [sorted(a["version"] for a in c["adapters"]) for c in both["captions"]] == [sorted([v1, v2])]
        con.close()

        # The console command, on this instance (DAGSTER_HOME is the test instance's).
        d = _cli_json(capsys, "--category", "beauty", "--version", v1[:8], *paths)
        assert d["adapter"]["version"] == v1 and d["captions"]["snapshot"] == snap[1]
        assert d["captions"]["materialization"]["run_id"] == first.run_id
        assert d["captions"]["captioners"][0]["prompt_version"].startswith("caption_")
        assert {r["item_id"]: r["caption"] for r in d["captions"]["captions"]} == captions_1
        d = _cli_json(capsys, "--caption-snapshot", snap[2], *paths)
        assert [a["version"] for a in d["adapters"]] == [v2]
        d = _cli_json(capsys, "--item", item, "--category", "beauty", *paths)
        assert len(d["captions"]) == 2
        assert main(["lineage", "--category", "beauty", "--version", v2, *paths]) == 0
        text = capsys.readouterr().out
        assert f"lora_adapter beauty @ {v2}" in text and f"captions: snapshot {snap[2]}" in text
        assert f"in run {second.run_id}" in text and "(confirmed)" in text

        # The installed command in a fresh process, on its defaults: SREC_DATA_DIR (here the test's folder, laid out
        # like data/) and DAGSTER_HOME (the test instance).
        env = {**os.environ, "SREC_DATA_DIR": str(tmp_path), "DAGSTER_HOME": instance.root_directory}
        proc = subprocess.run([sys.executable, "-m", "srec_assets.cli", "lineage", "--category", "beauty", "--json"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        d = json.loads(proc.stdout)
        assert d["dagster_home"] == instance.root_directory
        assert d["adapter"]["version"] == default["adapter"]["version"] and d["adapter"]["confirmed"]
        assert d["captions"]["materialization"]["storage_id"] == default["captions"]["materialization"]["storage_id"]


# --- without training -------------------------------------------------------------------------------

def _fake_adapter(root, category: str, caption_snap: str, created_at: float, run_id: str = "run-x",
                  variants: dict | None = None) -> str:
    staging = root / "lora_adapter" / category / f"_staging-{created_at}"
    (staging / "v").mkdir(parents=True)
    (staging / "v" / "adapter_model.safetensors").write_bytes(str(created_at).encode())
    manifest = {"category": category, "base_model": "m", "base_fingerprint": "f",
                "data": {"caption_snapshot": caption_snap, "preference_snapshot": "p" + caption_snap},
                "captions": [{"model": "cap", "fingerprint": "cf", "prompt_version": "caption_fused/v1+x"}],
                "preferences": [], "settings": {}, "variants": variants or {}, "dagster_run_id": run_id,
                "created_at": created_at}
    staged = artifacts.stage(staging, manifest)
    artifacts.store(staged, root / "lora_adapter", category, run_id)
    return staged.version


@pytest.fixture
def db(tmp_path):
    con = duckdb.connect(str(tmp_path / "l.duckdb"))
    ensure_tables(con)
    yield con
    con.close()


def test_clear_errors(tmp_path, db):
    instance = dg.DagsterInstance.ephemeral()
    with pytest.raises(lin.LineageError, match=r"unknown category 'toys'; declared: beauty"):
        lin.adapter_lineage(instance, db, tmp_path, "toys", categories=["beauty"])
    with pytest.raises(lin.LineageError, match=r"no lora_adapter stored for category 'beauty'.*materialize"):
        lin.adapter_lineage(instance, db, tmp_path, "beauty", categories=["beauty"])
    v = _fake_adapter(tmp_path, "beauty", "s1", 1.7e9)
    with pytest.raises(lin.LineageError, match=rf"version 'nope' is not a stored version.*stored: {v}"):
        lin.adapter_lineage(instance, db, tmp_path, "beauty", "nope")
    with pytest.raises(lin.LineageError, match=r"caption snapshot 'zzz' is unknown"):
        lin.adapters_using_caption_snapshot(instance, db, tmp_path, "zzz")
    with pytest.raises(lin.LineageError, match=r"item 'i1' is in no recorded caption snapshot of 'beauty'"):
        lin.adapters_using_item_caption(instance, db, tmp_path, "beauty", "i1")


def test_an_instance_without_records_gives_notes_not_a_crash(tmp_path, db):
    instance = dg.DagsterInstance.ephemeral()  # e.g. another DAGSTER_HOME
    v1 = _fake_adapter(tmp_path, "beauty", "s1", 1.7e9)
    v2 = _fake_adapter(tmp_path, "beauty", "s2", 1.8e9)
    (tmp_path / "lora_adapter" / "beauty" / "current.json").unlink()
    d = lin.adapter_lineage(instance, db, tmp_path, "beauty")
    assert d["adapter"]["version"] == v2 and d["adapter"]["selected_by"] == "latest"
    assert d["adapter"]["materialization"] is None and not d["adapter"]["confirmed"]
    assert d["captions"]["snapshot"] == "s2" and d["captions"]["captions"] is None
    assert d["captions"]["captioners"][0]["model"] == "cap"
    notes = "\n".join(d["notes"])
    assert "no current pointer" in notes and "has no lora_adapter materialization" in notes
    assert "per-item captions of snapshot s2 are not available" in notes
    assert "lora_adapter beauty @" in lin.format_adapter_lineage(d)
    used = lin.adapters_using_caption_snapshot(instance, db, tmp_path, "s1")
    assert [a["version"] for a in used["adapters"]] == [v1] and used["adapters"][0]["stored"]
    assert lin.adapter_lineage(instance, db, tmp_path, "beauty", v1[:6])["adapter"]["version"] == v1


def test_variant_lines_name_the_run_that_trained_each_adapter(tmp_path, db):
    """A set written by one run may hold adapters an earlier run trained (finished runs are reused)."""
    fit = {"best_valid_auc": 0.6, "base_valid_auc": 0.5, "best_epoch": 1, "epochs_run": 2, "folder": "v"}
    variants = {"lora:a": {**fit, "reused": True, "trained_run_id": "run-old", "trained_at": 1.6e9},
                "lora:b": {**fit, "reused": False, "trained_run_id": "run-x", "trained_at": 1.7e9},
                "lora:c": fit}  # a manifest from before srec recorded the training run
    _fake_adapter(tmp_path, "beauty", "s1", 1.7e9, variants=variants)
    d = lin.adapter_lineage(dg.DagsterInstance.ephemeral(), db, tmp_path, "beauty")
    assert d["adapter"]["variants"]["lora:a"]["trained_run_id"] == "run-old"
    lines = lin.format_adapter_lineage(d).splitlines()
    assert "  written:      2023-11-14T22:13:20+00:00 by run run-x" in lines
    assert ("  variant:      lora:a: valid AUC 0.6000 (base 0.5000), best epoch 1; trained 2020-09-13T12:26:40+00:00 "
            "by run run-old (a finished run this materialization reused)") in lines
    assert ("  variant:      lora:b: valid AUC 0.6000 (base 0.5000), best epoch 1; trained 2023-11-14T22:13:20+00:00 "
            "by run run-x") in lines
    assert "  variant:      lora:c: valid AUC 0.6000 (base 0.5000), best epoch 1" in lines


def test_caption_snapshot_membership_is_append_only(db):
    row = {"category": "c", "status": "ok", "reason": None, "modality": "text", "from_cache": False,
           "item_content_hash": "h", "model": "m", "model_fingerprint": "f", "prompt_version": "p",
           "generation": "{}", "generated_tokens": 3, "clip_score": None, "clip_model": None, "image_synthetic": False}
    first = pd.DataFrame([row | {"item_id": "a", "cache_key": "k1", "caption": "x"},
                          row | {"item_id": "b", "cache_key": "k2", "caption": "y"}])
    db.execute("INSERT INTO item_captions BY NAME SELECT * FROM first")
    s1 = caption_snapshot(db, "c")
    assert record_caption_snapshot(db, "c", run_id="r1") == 2
    assert record_caption_snapshot(db, "c", s1, run_id="r2") == 0  # recorded already: unchanged
    db.execute("UPDATE item_captions SET cache_key = 'k3', caption = 'z' WHERE item_id = 'b'")
    s2 = caption_snapshot(db, "c")
    assert s2 != s1 and record_caption_snapshot(db, "c", s2, run_id="r3") == 2
    rows = db.execute("SELECT snapshot, item_id, cache_key, run_id FROM caption_snapshots ORDER BY 1, 2").fetchall()
    assert sorted(rows) == sorted([(s1, "a", "k1", "r1"), (s1, "b", "k2", "r1"), (s2, "a", "k1", "r3"),
                                   (s2, "b", "k3", "r3")])


def test_cli_says_when_the_database_is_missing_or_locked(tmp_path, capsys):
    missing = tmp_path / "none.duckdb"
    assert main(["lineage", "--category", "beauty", "--database", str(missing), "--artifacts", str(tmp_path)]) == 1
    assert f"no database at {missing}" in capsys.readouterr().err
    locked = tmp_path / "locked.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(60)", str(locked)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert main(["lineage", "--category", "beauty", "--database", str(locked), "--artifacts", str(tmp_path)]) == 1
        assert "is locked by another process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["lineage", "--category", "nowhere", "--database", str(locked), "--artifacts", str(tmp_path)]) == 1
    assert "unknown category 'nowhere'" in capsys.readouterr().err
