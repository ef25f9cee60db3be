"""`srec` console command: run the graph for categories on the persistent Dagster instance.

    srec materialize --category beauty     # every asset and check, recorded in $DAGSTER_HOME
    srec build-tiny-models                 # the offline tiny LLaVA / Llama / CLIP under data/models/
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
            for check in failed_checks:  # a successful run's failed checks are warnings (non-blocking)
                print(f"[{category}] warning: check {check} did not pass (see its metadata in the UI)")
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
    tiny = sub.add_parser("build-tiny-models",
                          help="build the tiny random-weight offline models (LLaVA, Llama, CLIP) under data/models/")
    tiny.add_argument("--category", action="append",
                      help="fit the tokenizer on these categories' item text (default: the shipped categories)")
    tiny.add_argument("--out", type=Path, default=None, help="output folder (default: data/models)")
    tiny.add_argument("--force", action="store_true", help="rebuild even if the folder's manifest matches")
    args = parser.parse_args(argv)
    if args.command == "materialize":
        return materialize(args.category)
    if args.command == "build-tiny-models":
        return build_tiny(args.category, args.out, args.force)
    return 2


def build_tiny(categories: list[str] | None, out: Path | None, force: bool) -> int:
    from srec.models.runner import model_fingerprint
    from srec.models.tiny import TINY_MODELS_DIR, build_tiny_models, category_texts

    started = time.monotonic()
    folders = build_tiny_models(category_texts(categories), out or TINY_MODELS_DIR, force=force)
    for role, folder in folders.items():
        print(f"{role:>10}: {folder} (fingerprint {model_fingerprint(folder)})")
    print(f"tiny models ready in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
