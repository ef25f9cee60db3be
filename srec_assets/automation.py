"""Jobs, the retrain schedule and the new-data sensor.

- one asset job per stage group (``ingest_job`` ... ``report_job``), to re-run a stage from the UI;
- ``full_graph``: ingestion and everything downstream for one category (the demo, the sensor);
- ``retrain``: the model stages on the current tables (captions and summaries are cached, so only what
  changed is generated again), the adapter through its promotion gate, baselines and the report;
- ``retrain_schedule``: launches ``retrain`` for every category with ``retrain: true`` (default), weekly by
  default; ``SREC_RETRAIN_CRON`` and ``SREC_RETRAIN_TIMEZONE`` change when;
- ``raw_files_sensor``: launches ``full_graph`` for a category whose raw files' content hash differs from
  the last one it saw (or, the first time, from the one the last ingestion recorded).
"""
import json
import os

import dagster as dg

from srec.raw_files import raw_files_fingerprint
from srec_assets.assets.ingest import raw_reviews
from srec_assets.partitions import CATEGORIES

STAGE_GROUPS = ("ingest", "sequences", "mllm", "recommender", "baselines", "report")
RETRAIN_GROUPS = ("mllm", "recommender", "baselines", "report")
DEFAULT_RETRAIN_CRON = "0 3 * * 1"   # Mondays 03:00

stage_jobs = [
    dg.define_asset_job(name=f"{group}_job", selection=dg.AssetSelection.groups(group),
                        description=f"The {group!r} stage group's assets and checks, one category.")
    for group in STAGE_GROUPS
]

full_graph_job = dg.define_asset_job(
    name="full_graph",
    selection=dg.AssetSelection.all(),
    description=("Ingest -> interactions -> candidates -> images -> captions -> preferences -> SFT examples -> LoRA "
                 "adapter (promotion gate) -> recommender scores; baselines; -> metric report; one category."),
)

retrain_job = dg.define_asset_job(
    name="retrain",
    selection=dg.AssetSelection.groups(*RETRAIN_GROUPS),
    description=("Retrain on the current tables: captions and preference summaries (cached: only new or changed "
                 "items and users are generated), SFT examples, a new LoRA adapter through the promotion gate, "
                 "recommender and baseline scores, the metric report; one category."),
)


def build_retrain_schedule(cron: str | None = None, timezone: str | None = None) -> dg.ScheduleDefinition:
    cron = cron or os.environ.get("SREC_RETRAIN_CRON", DEFAULT_RETRAIN_CRON)
    timezone = timezone or os.environ.get("SREC_RETRAIN_TIMEZONE", "UTC")

    @dg.schedule(name="retrain_schedule", job=retrain_job, cron_schedule=cron, execution_timezone=timezone,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description=f"Retrains every category with retrain: true ({cron}, {timezone}; SREC_RETRAIN_CRON).")
    def retrain_schedule(context: dg.ScheduleEvaluationContext):
        when = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
        chosen = [name for name, cfg in CATEGORIES.items() if cfg.retrain]
        if not chosen:
            return dg.SkipReason("no category has retrain: true")
        return [dg.RunRequest(run_key=f"retrain:{name}:{when}", partition_key=name,
                              tags={"srec/trigger": "schedule", "srec/scheduled_for": when}) for name in chosen]

    return retrain_schedule


def last_ingested_fingerprint(instance: dg.DagsterInstance, category: str) -> str | None:
    """``raw_files_sha256`` of the category's last raw_reviews materialization (None: never ingested)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=raw_reviews.key, asset_partitions=[category]), limit=1, ascending=False
    ).records
    if not records:
        return None
    entry = records[0].asset_materialization.metadata.get("raw_files_sha256")
    return entry.value if entry is not None else None


@dg.sensor(
    name="raw_files_sensor",
    job=full_graph_job,
    minimum_interval_seconds=int(os.environ.get("SREC_SENSOR_INTERVAL_S", "60")),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=("Ingests a category again (and everything downstream) when its reviews or items file's content "
                 "hash changes; touching a file without changing it launches nothing."),
)
def raw_files_sensor(context: dg.SensorEvaluationContext):
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    requests = []
    for name, cfg in CATEGORIES.items():
        try:
            fingerprint = raw_files_fingerprint(cfg)
        except (FileNotFoundError, PermissionError) as e:
            context.log.warning(f"{e}; skipped this tick")
            continue
        previous = seen.get(name) or last_ingested_fingerprint(context.instance, name)
        if fingerprint != previous:
            context.log.info(f"{name}: raw files changed ({previous and previous[:12]} -> {fingerprint[:12]})")
            requests.append(dg.RunRequest(
                run_key=f"raw:{name}:{fingerprint}", partition_key=name,
                tags={"srec/trigger": "raw_files_changed", "srec/raw_files_sha256": fingerprint}))
        seen[name] = fingerprint
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(seen, sort_keys=True))


retrain_schedule = build_retrain_schedule()
JOBS = [full_graph_job, retrain_job, *stage_jobs]
SCHEDULES = [retrain_schedule]
SENSORS = [raw_files_sensor]
