"""Helpers shared by the ingest tests."""
from __future__ import annotations

from pathlib import Path

from srec.config import CategoryConfig, FilterSettings


def cfg(name: str, fmt: str, reviews: Path, items: Path | None = None, **filtering) -> CategoryConfig:
    return CategoryConfig(name=name, format=fmt, reviews=Path(reviews), items=Path(items) if items else None,
                          filtering=FilterSettings(**filtering))
