"""What the benchmarks that measure each way in its own process share: the alternating child runs and the
results files."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def alternating_runs(script: str, ways: Sequence[str], repeats: int, args: Sequence[str],
                     describe: Callable[[dict], str]) -> dict[str, list[dict]]:
    """Each way's figures from ``repeats`` child processes (``script --child WAY *args``, its last stdout line a
    JSON object), the ways' order reversed every other repeat so that neither always runs first; each run's
    ``describe(figures)`` is printed as it ends."""
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for r in range(repeats):
        for w in (ways if r % 2 == 0 else ways[::-1]):
            out = subprocess.run([sys.executable, script, "--child", w, *args], check=True, capture_output=True,
                                 text=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            runs[w].append(figures)
            print(f"  {w} run {r + 1}: {describe(figures)}", flush=True)
    return runs


def write_results(stem: str, result: dict, md: str) -> None:
    """``results/<stem>.json`` and ``.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)
    print(f"wrote {RESULTS / stem}.json and .md", flush=True)
