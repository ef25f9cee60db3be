#!/usr/bin/env bash
# One command from a fresh clone: set up, then run the whole test suite (no network, CPU only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
bash "$ROOT/scripts/setup_browser.sh"   # headless Chromium + ChromeDriver for tests/test_ui_browser.py
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest -q --durations=20 "$@"
