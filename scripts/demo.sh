#!/usr/bin/env bash
# One command from a fresh clone: set up, build the tiny offline models, then materialize the whole
# graph for the bundled `beauty` sample on the persistent Dagster instance, and print where the report is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
srec build-tiny-models
exec srec materialize --category "${1:-beauty}"
