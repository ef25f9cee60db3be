"""Where the project keeps things. Everything written at run time lives under data/."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SREC_DATA_DIR", PROJECT_ROOT / "data"))
CATEGORIES_FILE = DATA_DIR / "categories.yaml"
DEFAULT_DATABASE = DATA_DIR / "srec.duckdb"
REPORTS_DIR = DATA_DIR / "reports"
SHARED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
