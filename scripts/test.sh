#!/usr/bin/env bash
# One command from a fresh clone: set up, then run the whole test suite (no network, CPU only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
