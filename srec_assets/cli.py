"""`srec` console command: run the graph for categories on the persistent Dagster instance.

    srec materialize --category beauty     # every asset and check, recorded in $DAGSTER_HOME
    srec build-tiny-models                 # the offline tiny LLaVA / Llama / CLIP under data/models/
    srec lineage --category beauty [--version V] [--json]   # what the (current) adapter was trained on
    srec lineage --caption-snapshot S [--category C]        # which adapters used a caption snapshot
    srec lineage --item ITEM --category C [--cache-key K]   # which adapters used an item's caption
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
    lin = sub.add_parser(
        "lineage", help="what a trained adapter was trained on (captions, preference summaries, the runs and "
                        "materializations that produced them), and which adapters used a caption snapshot or item",
        description="Reads the Dagster instance ($DAGSTER_HOME), the adapter manifests and the DuckDB file "
                    "(read-only). Forms: --category C [--version V]; --caption-snapshot S [--category C]; "
                    "--item ITEM --category C [--cache-key K].")
    lin.add_argument("--category", help="category (partition)")
    lin.add_argument("--version", help="adapter version or a unique prefix (default: the current adapter, else latest)")
    lin.add_argument("--caption-snapshot", help="reverse: the adapters trained on this caption snapshot")
    lin.add_argument("--item", help="reverse: the captions this item has had and the adapters trained on them")
    lin.add_argument("--cache-key", help="with --item: only this caption (caption_cache key)")
    lin.add_argument("--json", action="store_true", help="machine-readable output, every caption and summary")
    lin.add_argument("--examples", type=int, default=3, help="captions / summaries shown in the text output")
    lin.add_argument("--database", help="DuckDB file (default: the storage resource's)")
    lin.add_argument("--artifacts", help="artifacts root (default: the adapter IO manager's)")
    args = parser.parse_args(argv)
    if args.command == "materialize":
        return materialize(args.category)
    if args.command == "build-tiny-models":
        return build_tiny(args.category, args.out, args.force)
    if args.command == "lineage":
        return lineage(args, lin)
    return 2


def _open_read_only(database: Path):
    """The DuckDB file, read-only; a clear message (None) when it is missing or a writer holds it."""
    import duckdb

    if not database.is_file():
        print(f"no database at {database}: materialize first (srec materialize --category <name>)", file=sys.stderr)
        return None
    try:
        return duckdb.connect(str(database), read_only=True)
    except duckdb.Error as e:
        if "lock" in str(e).lower():
            print(f"the database {database} is locked by another process (a running materialization?): retry when "
                  f"it has finished.\n  {str(e).splitlines()[0]}", file=sys.stderr)
        else:
            print(f"cannot open {database} read-only: {e}", file=sys.stderr)
        return None


def lineage(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json
    import warnings

    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.PreviewWarning)  # the definitions' partitioned checks
    from srec import lineage as lin
    from srec_assets.definitions import defs
    from srec_assets.partitions import CATEGORIES

    if args.item and not args.category:
        parser.error("--item needs --category")
    if args.cache_key and not args.item:
        parser.error("--cache-key goes with --item")
    if args.version and (args.item or args.caption_snapshot):
        parser.error("--version goes with --category alone")
    if args.item and args.caption_snapshot:
        parser.error("give --item or --caption-snapshot, not both")
    if not (args.category or args.caption_snapshot):
        parser.error("give --category (an adapter's lineage), --caption-snapshot, or --item with --category")
    database = Path(args.database or defs.resources["storage"].database)
    artifacts_root = Path(args.artifacts or defs.resources["adapter_io_manager"].root)
    con = _open_read_only(database)
    if con is None:
        return 1
    try:
        with dg.DagsterInstance.get() as instance:
            if args.item:
                out = lin.adapters_using_item_caption(instance, con, artifacts_root, args.category, args.item,
                                                      args.cache_key, categories=CATEGORIES)
                text = lin.format_item_caption_usage
            elif args.caption_snapshot:
                out = lin.adapters_using_caption_snapshot(instance, con, artifacts_root, args.caption_snapshot,
                                                          args.category, categories=CATEGORIES)
                text = lin.format_caption_snapshot_usage
            else:
                out = lin.adapter_lineage(instance, con, artifacts_root, args.category, args.version,
                                          categories=CATEGORIES)
                text = lambda d: lin.format_adapter_lineage(d, examples=args.examples)  # noqa: E731
    except lin.LineageError as e:
        print(f"srec lineage: {e}", file=sys.stderr)
        return 1
    finally:
        con.close()
    print(json.dumps(out, indent=1, default=str) if args.json else text(out))
    return 0


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
