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


def pytest_sessionstart(session) -> None:
    """The suite cuts its fixtures from the real shared datasets: without them, one clear error, not a mix of
    skips and FileNotFoundErrors deep inside tests."""
    needed = [BEAUTY_FULL / "user_sequence.txt", BEAUTY_FULL / "item_titles.csv",
              SHARED_DATA_DIR / "amazon-scientific" / "Scientific.inter.json"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.exit(f"the tests need the shared Amazon data; missing: {', '.join(missing)}. Put the checkout beside "
                    "shared/ (../shared/data) or set SREC_SHARED_DATA to the data folder.", returncode=4)


@pytest.fixture
def storage(tmp_path: Path):
    from resources import SrecStorage

    return SrecStorage(
        database=str(tmp_path / "srec.duckdb"),
        reports_dir=str(tmp_path / "reports"),
        artifacts_dir=str(tmp_path / "artifacts"),
        temp_directory=str(tmp_path / "duckdb_tmp"),
    )


@pytest.fixture
def con(tmp_path: Path):
    """A fresh DuckDB file per test (modules may define their own ``con``, which wins)."""
    import duckdb

    c = duckdb.connect(str(tmp_path / "t.duckdb"))
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny offline models, built once per test session from the bundled sample's item text."""
    from srec.models.tiny import build_tiny_models, category_texts

    return build_tiny_models(category_texts(["beauty"]), tmp_path_factory.mktemp("models"))


@pytest.fixture
def model_resources(tiny_models, tmp_path) -> dict:
    """Model resources on the tiny models, small generation budgets so tests stay fast."""
    from resources import AdapterIOManager, HallucinationScorer, ModelRunner

    return {
        "recommender": ModelRunner(role="recommender", model=str(tiny_models["captioner"]), max_new_tokens=8,
                                   max_batch_size=32),
        "adapter_io_manager": AdapterIOManager(root=str(tmp_path / "artifacts")),
        "captioner": ModelRunner(role="captioner", model=str(tiny_models["captioner"]), max_new_tokens=8,
                                 max_batch_size=32),
        "summariser": ModelRunner(role="summariser", model=str(tiny_models["summariser"]), max_new_tokens=8,
                                  max_batch_size=64),
        "hallucination_scorer": HallucinationScorer(model=str(tiny_models["clip"])),
    }
