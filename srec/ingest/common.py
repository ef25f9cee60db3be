"""What every ingest reader shares: the quarantine vocabulary, the file-level error, the stats."""
from __future__ import annotations

from dataclasses import dataclass, field

# Why a source row was not kept. Row-level problems never fail an ingest: the row goes to
# ``ingest_quarantine`` with one of these reasons, its file, line, a detail and its raw text.
QUARANTINE_REASONS: tuple[str, ...] = (
    "unparseable_line",     # not JSON / not a Python literal / wrong number of fields / not an object
    "invalid_utf8",         # the line's bytes are not UTF-8
    "empty_line",           # a blank (or whitespace-only) line
    "missing_user",         # no user id, or an empty one
    "missing_item",         # no item id, or an empty one (p5: a user with no items)
    "rating_not_a_number",  # a rating is there but is not a number ("five")
    "rating_out_of_range",  # outside [filtering.rating_min, filtering.rating_max]
    "missing_rating",       # no rating in a format that has ratings
    "unusable_timestamp",   # missing / not a number / before 1990 / more than a day ahead, in a timed format
    "duplicate",            # same user, item, rating and timestamp as an earlier kept row; items: a repeated item id
)

RAW_TEXT_MAX = 500  # characters of the offending line kept in ingest_quarantine.raw_text


class IngestError(Exception):
    """A file-level failure: missing or unreadable file, truncated or corrupt gzip, unknown format,
    an empty file or one with no usable row. The message names the file (and the line where one applies)."""


class ReconciliationError(IngestError):
    """Rows read != rows kept + rows quarantined, or the tables disagree with the counts: a bug, never data."""


@dataclass
class IngestStats:
    table: str                     # 'raw_reviews' or 'raw_items'
    files: list[str]               # the source files read, as configured
    rows_read: int
    rows_kept: int
    quarantined: dict[str, int]    # reason -> count (only reasons that occurred)
    sha256: dict[str, str] = field(default_factory=dict)  # source file -> sha256 of its bytes as stored

    def reconciles(self) -> bool:
        return self.rows_read == self.rows_kept + sum(self.quarantined.values())

    @property
    def rows_quarantined(self) -> int:
        return sum(self.quarantined.values())
