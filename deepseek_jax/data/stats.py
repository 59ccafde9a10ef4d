"""Counters for bad and reshaped data, in a form the trainer can log.

Two kinds, because they are known at different times:

* `SourceStats`: filled once, when a source indexes its files (every source validates
  each row up front). Exact, identical on every host, and independent of shuffling,
  sharding and restarts.
* `PipelineStats`: running counts of documents tokenised by this process (truncated,
  dropped). They include elements Grain prefetched but the trainer has not consumed
  yet, and start again from zero when a run resumes; treat them as monitoring, not
  as exact bookkeeping.

`DataStats.as_dict()` flattens both into `{"data/...": int}` for metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Sequence

ON_ERROR = ("skip", "raise")
MAX_EXAMPLES = 10  # problem locations kept per source, enough to find the bad rows
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class SourceStats:
    """What one source found while indexing; `examples` holds "path:line: reason"."""

    name: str
    rows_read: int = 0
    rows_kept: int = 0
    empty_skipped: int = 0
    malformed_skipped: int = 0
    non_utf8_rows: int = 0  # kept, with undecodable bytes replaced by U+FFFD
    examples: list = dataclasses.field(default_factory=list)

    def note(self, where: str, reason: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")


class PipelineStats:
    """Thread-safe counters; Grain runs the tokenising map in a pool of threads."""

    FIELDS = (
        "documents", "tokens", "truncated", "dropped_overlong", "dropped_too_short",
        "dropped_no_loss",
    )

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, field: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[field] += amount

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._counts)


@dataclasses.dataclass
class DataStats:
    """Everything a pipeline can report: its sources' index-time counts and its own."""

    sources: Sequence[SourceStats]
    pipeline: PipelineStats

    def as_dict(self) -> dict:
        fields = ("rows_read", "rows_kept", "empty_skipped", "malformed_skipped", "non_utf8_rows")
        totals = {f"data/{f}": sum(getattr(s, f) for s in self.sources) for f in fields}
        totals.update({f"data/{k}": v for k, v in self.pipeline.snapshot().items()})
        return totals


class ErrorPolicy:
    """Applies `on_error` to a malformed row: raise with its location, or count it."""

    def __init__(self, on_error: str, stats: SourceStats):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.stats = stats

    def malformed(self, where: str, reason: str) -> None:
        if self.on_error == "raise":
            raise ValueError(f"{where}: {reason} (pass on_error='skip' to skip such rows)")
        self.stats.malformed_skipped += 1
        self.stats.note(where, reason)
        if self.stats.malformed_skipped <= MAX_EXAMPLES:
            _log.warning("skipping malformed row %s: %s", where, reason)
