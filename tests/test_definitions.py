"""The code location loads the way a user loads it: Definitions, workspace.yaml, dg."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from srec.paths import PROJECT_ROOT

REQUIRED_ASSETS = {"raw_reviews", "raw_items", "interactions", "eval_candidates", "item_images", "item_captions",
                   "user_preferences", "baseline_scores", "metric_report"}
WARNING_CHECKS = {"caption_hallucination", "adapter_promotion_gate", "report_has_no_summary_row"}  # quality warnings: recorded, never blocking


def test_definitions_have_the_required_assets_partitioned_by_category():
    from srec_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert REQUIRED_ASSETS <= keys
    for key in REQUIRED_ASSETS:
        node = graph.get(dg.AssetKey(key))
        assert node.partitions_def is not None and "beauty" in node.partitions_def.get_partition_keys()
        assert node.code_version, f"{key} has no code_version"


def test_every_table_asset_has_a_blocking_schema_check():
    from srec_assets.definitions import defs

    specs = list(defs.resolve_asset_graph().asset_check_keys)
    names = {(k.asset_key.to_user_string(), k.name) for k in specs}
    for asset in REQUIRED_ASSETS:
        assert (asset, f"{asset}_schema") in names, asset
    graph = defs.resolve_asset_graph()
    for key in specs:
        assert graph.get_check_spec(key).blocking == (key.name not in WARNING_CHECKS), key


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dagster_definitions_validate_with_workspace_yaml(tmp_path):
    bindir = Path(sys.executable).parent
    proc = _run([str(bindir / "dagster"), "definitions", "validate", "-w", "workspace.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dg_check_defs(tmp_path):
    bindir = Path(sys.executable).parent
    proc = _run([str(bindir / "dg"), "check", "defs"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
