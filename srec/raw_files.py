"""Content fingerprints of a category's raw files: what the new-data sensor compares, and what ingestion
records, so "new or changed" means different bytes, never a newer modification time."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from srec.config import CategoryConfig

_CHUNK = 1 << 20
# path -> (size, mtime_ns, sha256): a file whose stat is unchanged is not read again on the next sensor tick.
# The decision is still made on the content hash (a touched but unchanged file hashes the same).
_STAT_CACHE: dict[str, tuple[int, int, str]] = {}


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes as stored (compressed files are not decompressed)."""
    key = str(Path(path).resolve())
    st = os.stat(key)
    cached = _STAT_CACHE.get(key)
    if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
        return cached[2]
    h = hashlib.sha256()
    with open(key, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    _STAT_CACHE[key] = (st.st_size, st.st_mtime_ns, h.hexdigest())
    return h.hexdigest()


def raw_files(cfg: CategoryConfig) -> list[Path]:
    return [p for p in (cfg.reviews, cfg.items) if p is not None]


def raw_files_fingerprint(cfg: CategoryConfig) -> str:
    """One hash over the category's reviews and items files (role and content of each).

    Raises FileNotFoundError naming the category and the file when one is missing."""
    h = hashlib.sha256()
    for role, path in (("reviews", cfg.reviews), ("items", cfg.items)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"category {cfg.name!r}: {role} file {path} does not exist")
        h.update(f"{role}\x00{file_sha256(path)}\x00".encode())
    return h.hexdigest()
