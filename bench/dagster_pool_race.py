"""Do Dagster's pool slots hold when two processes claim at the same instant on the default SQLite instance?

    .venv/bin/python bench/dagster_pool_race.py --trials 50

Each trial: a fresh Dagster home with the project's ``dagster.yaml`` (every pool limited to 1 slot), its storage
and the ``duckdb`` pool's slot created once by this process (as ``scripts/setup.sh`` initialises a home), then two
processes that meet at a file barrier and call ``claim_concurrency_slot('duckdb', ...)`` together, each for its
own run, the storage call a step makes before it starts. With one slot, exactly one claim may succeed; a trial in
which both succeed is a double claim: two steps of the pool would run at once. Run both ways: Dagster's storage as
it is, and with ``srec_assets.pool_slots`` (what every srec process applies). Results:
bench/results/dagster_pool_race.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from machine_info import machine_info  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

CLAIMER = textwrap.dedent("""
    import pathlib, sys, time
    import dagster as dg
    barrier, me, guarded = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    if guarded:
        from srec_assets.pool_slots import serialize_sqlite_slot_changes
        serialize_sqlite_slot_changes()
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        (barrier / me).touch()
        while len(list(barrier.iterdir())) < 2:
            time.sleep(0.0005)
        status = storage.claim_concurrency_slot("duckdb", "run-" + me, "step")
        print(status.is_claimed, flush=True)
        time.sleep(0.3)  # hold it while the other claims
""")


def trial(yaml: Path, guarded: bool) -> list[bool]:
    import dagster as dg

    home = Path(tempfile.mkdtemp(prefix="srec_pool_race_"))
    try:
        shutil.copy(yaml, home / "dagster.yaml")
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.event_log_storage.initialize_concurrency_limit_to_default("duckdb")
        barrier = home / "barrier"
        barrier.mkdir()
        env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(barrier), str(i), str(int(guarded))],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (_, err) in zip(procs, outs):
            if p.returncode:
                raise RuntimeError(f"claimer failed:\n{err[-2000:]}")
        return [out.strip() == "True" for out, _ in outs]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import dagster as dg

    yaml = ROOT / "data" / "dagster_home" / "dagster.yaml"
    started = time.perf_counter()
    ways = {}
    for name, guarded in (("dagster as is", False), ("srec's serialized slot changes", True)):
        claims = [trial(yaml, guarded) for _ in range(args.trials)]
        both = sum(all(c) for c in claims)
        neither = sum(not any(c) for c in claims)
        ways[name] = {"double_claims": both, "single_claims": args.trials - both - neither, "no_claim": neither}
        print(name, ways[name], flush=True)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/dagster_pool_race.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "dagster": dg.__version__, "trials": args.trials, "ways": ways,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dagster_pool_race.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    (RESULTS / "dagster_pool_race.md").write_text("\n".join([
        "# Dagster pool slots under two simultaneous claims (default SQLite instance, limit 1)",
        "",
        f"{result['date']}; `{result['command']}`; dagster {result['dagster']}; {m['cores']} cores ({m['cpu']}); "
        f"{result['seconds']} s.",
        "",
        f"{args.trials} trials each way. A double claim: both processes got the one slot.",
        "",
        "| way | double claims | exactly one | neither |",
        "|---|---:|---:|---:|",
        *(f"| {w} | **{v['double_claims']}** | {v['single_claims']} | {v['no_claim']} |" for w, v in ways.items()),
        "",
        "A double claim means two steps of one pool start together on the local SQLite instance storage. "
        "`srec_assets/pool_slots.py` (applied by `srec_assets.definitions`) serializes the storage's slot changes "
        "across processes with a file lock.",
        "",
    ]))
    print(f"results: {RESULTS / 'dagster_pool_race.json'}, {RESULTS / 'dagster_pool_race.md'}")


if __name__ == "__main__":
    main()
