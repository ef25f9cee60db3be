"""Jobs per stage group, the retrain schedule and the raw-files sensor (content hash, not modification time)."""
import os
import shutil
from dataclasses import replace
from datetime import datetime, timezone

import dagster as dg
import pytest

from srec.config import CategoryConfig
from srec.raw_files import raw_files_fingerprint
from srec_assets import automation
from srec_assets.definitions import defs
from tests.conftest import SAMPLE_DIR


def test_a_job_per_stage_group_and_the_full_retrain():
    groups = {}
    for spec in defs.resolve_all_asset_specs():
        groups.setdefault(spec.group_name, set()).add(spec.key.path[0])
    for group in automation.STAGE_GROUPS:
        job = defs.resolve_job_def(f"{group}_job")
        assert job.partitions_def is not None
        assert {k.path[0] for k in job.asset_layer.executable_asset_keys} == groups[group]
    everything = set().union(*groups.values())
    assert {k.path[0] for k in defs.resolve_job_def("full_graph").asset_layer.executable_asset_keys} == everything
    retrain = {k.path[0] for k in defs.resolve_job_def("retrain").asset_layer.executable_asset_keys}
    assert {"item_captions", "user_preferences", "lora_adapter", "recommender_scores", "metric_report"} <= retrain
    assert not retrain & (groups["ingest"] | groups["sequences"])


def test_assets_are_in_the_gpu_or_duckdb_pool():
    pools = {n.name: n.definition.pool for n in defs.resolve_job_def("full_graph").graph.node_dict.values()
             if n.name in {"item_captions", "user_preferences", "sft_examples", "lora_adapter", "recommender_scores",
                           "baseline_scores", "raw_reviews", "interactions", "metric_report"}}
    assert {k for k, v in pools.items() if v == "gpu"} == {
        "item_captions", "user_preferences", "sft_examples", "lora_adapter", "recommender_scores", "baseline_scores"}
    assert {k for k, v in pools.items() if v == "duckdb"} == {"raw_reviews", "interactions", "metric_report"}


def test_retrain_schedule_launches_every_category_that_retrains(monkeypatch):
    cats = {"beauty": CategoryConfig(name="beauty", format="p5_sequences", reviews=SAMPLE_DIR / "x", items=None),
            "toys": CategoryConfig(name="toys", format="p5_sequences", reviews=SAMPLE_DIR / "y", items=None),
            "frozen": CategoryConfig(name="frozen", format="p5_sequences", reviews=SAMPLE_DIR / "z", items=None,
                                     retrain=False)}
    monkeypatch.setattr(automation, "CATEGORIES", cats)
    schedule = automation.build_retrain_schedule()
    assert schedule.cron_schedule == "0 3 * * 1" and schedule.job_name == "retrain"
    when = datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc)
    with dg.instance_for_test() as instance:
        requests = list(schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=when)))
    assert sorted(r.partition_key for r in requests) == ["beauty", "toys"]
    assert all(r.tags["srec/trigger"] == "schedule" and when.isoformat() in r.run_key for r in requests)
    monkeypatch.setenv("SREC_RETRAIN_CRON", "30 1 * * *")
    assert automation.build_retrain_schedule().cron_schedule == "30 1 * * *"
    assert defs.resolve_schedule_def("retrain_schedule").job_name == "retrain"


@pytest.fixture
def watched(tmp_path, monkeypatch):
    """The bundled sample's files, copied, as the only category the sensor watches."""
    for f in ("user_sequence.txt.gz", "item_titles.csv.gz"):
        shutil.copy(SAMPLE_DIR / f, tmp_path / f)
    cfg = CategoryConfig(name="beauty", format="p5_sequences", reviews=tmp_path / "user_sequence.txt.gz",
                         items=tmp_path / "item_titles.csv.gz")
    monkeypatch.setattr(automation, "CATEGORIES", {"beauty": cfg})
    return cfg


def _tick(instance, cursor):
    result = automation.raw_files_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))
    return result.run_requests, result.cursor


def test_sensor_launches_on_new_or_changed_content_not_on_touch(watched):
    with dg.instance_for_test() as instance:
        requests, cursor = _tick(instance, None)       # never ingested: new data
        assert [r.partition_key for r in requests] == ["beauty"]
        first_key = requests[0].run_key
        assert requests[0].job_name in (None, "full_graph")
        assert requests[0].tags["srec/raw_files_sha256"] == raw_files_fingerprint(watched)
        assert _tick(instance, cursor)[0] == []        # nothing changed

        stat = os.stat(watched.reviews)                # touched: newer mtime, same bytes
        os.utime(watched.reviews, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))
        assert _tick(instance, cursor)[0] == []

        watched.items.write_bytes(watched.items.read_bytes() + b"\n")   # changed bytes, same size class
        requests, cursor2 = _tick(instance, cursor)
        assert [r.partition_key for r in requests] == ["beauty"] and requests[0].run_key != first_key
        assert _tick(instance, cursor2)[0] == []


def test_sensor_first_tick_trusts_what_ingestion_recorded(watched, storage):
    from srec_assets.assets.ingest import raw_items, raw_reviews

    with dg.instance_for_test() as instance:
        # An ingestion of exactly these files was recorded: a freshly started sensor launches nothing.
        from srec_assets import partitions
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(partitions.CATEGORIES, "beauty", watched)
            assert dg.materialize([raw_reviews, raw_items], partition_key="beauty", instance=instance,
                                  resources={"storage": storage}).success
        assert automation.last_ingested_fingerprint(instance, "beauty") == raw_files_fingerprint(watched)
        assert _tick(instance, None)[0] == []
        moved = replace(watched, reviews=watched.reviews.with_name("missing.gz"))
        with pytest.MonkeyPatch.context() as mp:  # a missing file is reported, not a crash or a run
            mp.setattr(automation, "CATEGORIES", {"beauty": moved})
            assert _tick(instance, None)[0] == []


def test_runs_execute_in_process():
    """One process per run (the gpu pool serializes model steps anyway; no per-step torch import)."""
    for name in ("full_graph", "retrain", "mllm_job"):
        assert defs.resolve_job_def(name).executor_def.name == "in_process"
