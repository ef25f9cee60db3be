#!/usr/bin/env bash
# Create .venv and install srec with the CPU build of PyTorch, every other package at the version in
# constraints.txt (the set CI last passed with). Idempotent: re-runs only reinstall when pyproject.toml
# or constraints.txt changed. Needs the package registry, nothing else.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.srec-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing srec into $ROOT/.venv (first run takes a few minutes)"
  # torch first, pinned to the CPU build: a later range that 2.13.0 satisfies adds nothing.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
# Initialise the persistent Dagster home's storage once, here: two processes that start together on an
# empty home (the webserver and a run, two runs) would each create the SQLite schema and can leave
# it with two alembic heads, after which every process fails to open the instance.
if [ ! -f data/dagster_home/history/runs.db ]; then
  DAGSTER_HOME="$ROOT/data/dagster_home" .venv/bin/python -c \
    "import dagster; dagster.DagsterInstance.get().dispose(); print('setup: initialised data/dagster_home')"
fi
