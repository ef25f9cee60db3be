"""Shared fixtures. Tests never touch the network or the project's own data/ outputs."""
from __future__ import annotations

import os

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from srec.paths import PROJECT_ROOT, SHARED_DATA_DIR  # noqa: E402

SAMPLE_DIR = PROJECT_ROOT / "data" / "samples" / "beauty"
BEAUTY_FULL = SHARED_DATA_DIR / "amazon-beauty"


@pytest.fixture
def storage(tmp_path: Path):
    from resources import SrecStorage

    return SrecStorage(
        database=str(tmp_path / "srec.duckdb"),
        reports_dir=str(tmp_path / "reports"),
        temp_directory=str(tmp_path / "duckdb_tmp"),
    )


@pytest.fixture
def con(tmp_path: Path):
    """A fresh DuckDB file per test (modules may define their own ``con``, which wins)."""
    import duckdb

    c = duckdb.connect(str(tmp_path / "t.duckdb"))
    yield c
    c.close()
