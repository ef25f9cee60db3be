"""Pool slots that hold across processes on the local SQLite Dagster instance.

Dagster keeps a pool's slots as rows and claims one with a select-then-update; on SQLite ``SELECT ... FOR UPDATE``
locks nothing, so two processes that claim at the same instant can both take the last slot:
``bench/dagster_pool_race.py`` saw it in 10 of 40 trials on dagster 1.13.27, and in 0 of 40 with this module
(``tests/test_concurrency.py`` caught it once as two overlapping ``duckdb`` steps). Two steps of one pool
then run together: two models on the GPU, or two table writers queued on the DuckDB writer lock. Dagster
itself supports pools on Postgres storage, where those row locks are real.

``serialize_sqlite_slot_changes`` wraps each of the SQLite storage's slot-changing methods in an exclusive
``flock`` on ``<event log dir>/concurrency_slots.lock`` (``srec.db_lock``'s re-entrant lock: a claim calls the
others). Every process that runs srec's steps imports ``srec_assets.definitions``, which calls it. Other storages
are left as they are.
"""
from __future__ import annotations

import functools
from pathlib import Path

from srec.db_lock import writer_lock

# The SQLite event log storage's public methods that read and then change slot or pending-step rows.
SLOT_METHODS = ("claim_concurrency_slot", "free_concurrency_slots_for_run", "free_concurrency_slot_for_step",
                "assign_pending_steps", "set_concurrency_slots", "initialize_concurrency_limit_to_default",
                "delete_concurrency_limit")
_WRAPPED = "_srec_serialized"


def _serialized(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with writer_lock(Path(self._base_dir) / "concurrency_slots"):
            return method(self, *args, **kwargs)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


def serialize_sqlite_slot_changes() -> None:
    """Idempotent: wraps ``SqliteEventLogStorage``'s slot methods once per process."""
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage  # noqa: PLC0415

    for name in SLOT_METHODS:
        method = getattr(SqliteEventLogStorage, name)
        if not getattr(method, _WRAPPED, False):
            setattr(SqliteEventLogStorage, name, _serialized(method))
