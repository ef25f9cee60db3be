"""Where the project keeps things. Everything written at run time lives under data/."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The shipped category config; SREC_CATEGORIES points elsewhere, SREC_CATEGORIES_EXTRA adds files.
CATEGORIES_FILE = PROJECT_ROOT / "data" / "categories.yaml"
# Where runs write (database, reports, Dagster home); SREC_DATA_DIR moves it, e.g. for benchmarks.
DATA_DIR = Path(os.environ.get("SREC_DATA_DIR", PROJECT_ROOT / "data"))
DEFAULT_DATABASE = DATA_DIR / "srec.duckdb"
REPORTS_DIR = DATA_DIR / "reports"
ARTIFACTS_DIR = DATA_DIR / "artifacts"   # image cache, adapters (git-ignored)
# The real Amazon datasets the tests and benchmarks read (../shared/data beside the checkout, as in CI);
# SREC_SHARED_DATA points elsewhere.
SHARED_DATA_DIR = Path(os.environ.get("SREC_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
