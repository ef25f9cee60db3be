"""One DuckDB writer at a time across processes.

DuckDB lets one process open a database file read-write; a second process gets "Could not set lock on
file" at once. Runs that overlap (two categories, a sensor run beside a scheduled one, steps of one run in
separate processes) therefore take this lock (``flock`` on ``<database>.lock``) around every read-write
connection and wait their turn instead of failing. Re-entrant within a process: DuckDB shares one database
instance between a process's connections, so a nested connection needs no second lock.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class DatabaseLockTimeout(TimeoutError):
    """Another process held the database's writer lock for longer than the timeout."""


_held: dict[str, list] = {}          # lock path -> [fd, depth]
_guard = threading.RLock()


@contextmanager
def writer_lock(database: str | Path, timeout_s: float = 6 * 3600, poll_s: float = 0.2,
                on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    path = str(Path(database).with_name(Path(database).name + ".lock"))
    with _guard:
        entry = _held.get(path)
        if entry is not None:
            entry[1] += 1
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            started, told = time.monotonic(), False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - started
                    if waited > timeout_s:
                        os.close(fd)
                        raise DatabaseLockTimeout(
                            f"{database}: another process has held the DuckDB writer lock ({path}) for "
                            f"{waited:.0f}s (timeout {timeout_s:.0f}s)") from None
                    if on_wait and not told:
                        on_wait(f"waiting for the DuckDB writer lock {path} (another run is writing)")
                        told = True
                    time.sleep(poll_s)
            _held[path] = [fd, 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])
