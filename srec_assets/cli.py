"""`srec` console command: run the graph for categories on the persistent Dagster instance.

    srec materialize --category beauty     # every asset and check, recorded in $DAGSTER_HOME
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from srec.paths import DATA_DIR

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _prepare_environment() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("DAGSTER_HOME", str(DATA_DIR / "dagster_home"))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)


def materialize(categories: list[str]) -> int:
    import dagster as dg

    from srec_assets.definitions import defs
    from srec_assets.partitions import CATEGORIES

    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        print(f"unknown categories {unknown}; declared: {sorted(CATEGORIES)}", file=sys.stderr)
        return 2
    job = defs.resolve_job_def("full_graph")
    storage = defs.resources["storage"]
    with dg.DagsterInstance.get() as instance:
        for category in categories:
            started = time.monotonic()
            result = job.execute_in_process(partition_key=category, instance=instance, raise_on_error=False)
            elapsed = time.monotonic() - started
            failed_checks = [
                e.event_specific_data.check_name
                for e in result.all_events
                if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION and not e.event_specific_data.passed
            ]
            if not result.success:
                print(f"[{category}] run {result.run_id} FAILED after {elapsed:.0f}s", file=sys.stderr)
                for event in result.all_events:
                    if event.is_step_failure:
                        print(f"  {event.step_key}: {event.step_failure_data.error.message.strip()}", file=sys.stderr)
                if failed_checks:
                    print(f"  failed checks: {failed_checks}", file=sys.stderr)
                return 1
            report = Path(storage.reports_dir) / category / "metric_report.md"
            print(f"[{category}] run {result.run_id} succeeded in {elapsed:.0f}s (DAGSTER_HOME={instance.root_directory})")
            print(f"[{category}] report: {report}")
            print(f"[{category}]         {report.with_suffix('.json')}")
            print(f"[{category}]         {report.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    _prepare_environment()
    parser = argparse.ArgumentParser(prog="srec", description="srec: multimodal-LLM sequential recommendation")
    sub = parser.add_subparsers(dest="command", required=True)
    mat = sub.add_parser("materialize", help="run every asset and check for the given categories")
    mat.add_argument("--category", action="append", required=True, help="category (partition); repeatable")
    args = parser.parse_args(argv)
    if args.command == "materialize":
        return materialize(args.category)
    return 2


if __name__ == "__main__":
    sys.exit(main())
