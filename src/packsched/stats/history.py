"""What past attempts of each `kind` say about the next one.

`History` keeps, per kind, lifetime counts and the statistics of the most recent attempts, and
answers in O(1) after the first question: `history(kind)` (count, success rate, p50 / p95 of
memory and duration), `expected_duration(kind)` for packing tasks that declare none, and
`is_new_failure(kind)` to tell a new failure (the kind has completed before) from a chronic one.

It lives in memory and is fed two ways: `record(attempt)` as attempts finish, and
`load_from(source)` at start from anything with the Store's `history(query)` method, so the
durable store backs it without History knowing which store it is.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from typing import Protocol

import msgspec

from ..store.base import HistoryQuery
from ..task import Attempt, TaskState

__all__ = ["History", "HistorySource", "KindHistory", "percentile"]

# The command's own failures. Lost, killed, skipped and unschedulable attempts say nothing
# about whether the command works, so they count toward neither successes nor failures.
_FAILURE_CODES = frozenset({"exit-status", "timeout", "spawn-failed"})


# How many (task, attempt) keys are remembered to count each attempt once; an attempt is
# re-recorded only when its ERROR is later given up or killed, well within this many attempts.
_SEEN_MAX = 100_000


class HistorySource(Protocol):
    """Where past attempts come from at start: the Store protocol's `history` satisfies it."""

    async def history(self, query: HistoryQuery) -> list[Attempt]:
        """Finished attempts matching `query`, oldest first."""
        ...


class KindHistory(msgspec.Struct, frozen=True, kw_only=True):
    """What the history says about one kind.

    Attributes:
        kind: the kind.
        count: finished attempts recorded, of any outcome.
        completed: attempts that completed.
        failed: attempts that failed by the command's own fault (exit status, timeout, spawn).
        success_rate: completed / (completed + failed); None before either happened.
        duration_p50, duration_p95: seconds, over recent completed attempts.
        memory_p50, memory_p95: peak bytes, over recent attempts that ran.
        last_completed_at: when an attempt of this kind last completed (epoch seconds).
    """

    kind: str
    count: int = 0
    completed: int = 0
    failed: int = 0
    success_rate: float | None = None
    duration_p50: float | None = None
    duration_p95: float | None = None
    memory_p50: int | None = None
    memory_p95: int | None = None
    last_completed_at: float | None = None


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank `p`-th percentile (0 < p <= 100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


class _Kind:
    """One kind's lifetime counts and its recent samples."""

    __slots__ = (
        "completed",
        "count",
        "durations",
        "failed",
        "last_completed_at",
        "memories",
        "summary",
    )

    def __init__(self, window: int) -> None:
        self.count = 0
        self.completed = 0
        self.failed = 0
        self.last_completed_at: float | None = None
        self.durations: collections.deque[float] = collections.deque(maxlen=window)
        self.memories: collections.deque[float] = collections.deque(maxlen=window)
        self.summary: KindHistory | None = None  # cached until the next record


class History:
    """Per-kind history of finished attempts, in memory, bounded.

    Args:
        window: how many recent attempts per kind the percentiles are taken over.
        max_kinds: how many kinds are kept; the least recently recorded go first.
    """

    def __init__(self, *, window: int = 200, max_kinds: int = 10_000) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        if max_kinds < 1:
            raise ValueError(f"max_kinds must be >= 1, got {max_kinds!r}")
        self.window = window
        self.max_kinds = max_kinds
        self._kinds: collections.OrderedDict[str, _Kind] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()

    def record(self, attempt: Attempt) -> None:
        """Add one finished attempt (one without a kind is ignored).

        An attempt is counted once, as it first settled: a later record of the same task and
        attempt (an ERROR that is given up as FAILED, or killed) is ignored.
        """
        if attempt.kind is None:
            return
        key = (attempt.task_id, attempt.attempt)
        if key in self._seen:
            return
        self._seen[key] = None
        if len(self._seen) > _SEEN_MAX:
            self._seen.popitem(last=False)
        entry = self._kinds.get(attempt.kind)
        if entry is None:
            entry = self._kinds[attempt.kind] = _Kind(self.window)
            while len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
        else:
            self._kinds.move_to_end(attempt.kind)
        entry.count += 1
        entry.summary = None
        result = attempt.result
        stats = result.output.runtime_statistics if result else None
        if attempt.state is TaskState.COMPLETE:
            entry.completed += 1
            if attempt.finished_at is not None:
                entry.last_completed_at = max(entry.last_completed_at or 0.0, attempt.finished_at)
            if stats is not None:
                entry.durations.append(stats.duration)
        elif (
            result is not None and result.error is not None and result.error.code in _FAILURE_CODES
        ):
            entry.failed += 1
        if stats is not None and stats.memory > 0:
            entry.memories.append(stats.memory)

    def load(self, attempts: Iterable[Attempt]) -> int:
        """Record many attempts, oldest first; return how many."""
        n = 0
        for attempt in attempts:
            self.record(attempt)
            n += 1
        return n

    async def load_from(self, source: HistorySource, *, since: float | None = None) -> int:
        """Load past attempts (finished since `since`, epoch seconds) from a durable source."""
        return self.load(await source.history(HistoryQuery(since=since)))

    def kinds(self) -> list[str]:
        """The kinds known, least recently recorded first."""
        return list(self._kinds)

    def history(self, kind: str) -> KindHistory:
        """What is known of `kind` (all counts zero when nothing is)."""
        entry = self._kinds.get(kind)
        if entry is None:
            return KindHistory(kind=kind)
        if entry.summary is None:
            decided = entry.completed + entry.failed
            p50_mem = percentile(list(entry.memories), 50)
            p95_mem = percentile(list(entry.memories), 95)
            entry.summary = KindHistory(
                kind=kind,
                count=entry.count,
                completed=entry.completed,
                failed=entry.failed,
                success_rate=entry.completed / decided if decided else None,
                duration_p50=percentile(list(entry.durations), 50),
                duration_p95=percentile(list(entry.durations), 95),
                memory_p50=int(p50_mem) if p50_mem is not None else None,
                memory_p95=int(p95_mem) if p95_mem is not None else None,
                last_completed_at=entry.last_completed_at,
            )
        return entry.summary

    def expected_duration(self, kind: str | None) -> float | None:
        """The median duration of recent completed attempts of `kind`, for packing; None if
        there are none."""
        if kind is None:
            return None
        return self.history(kind).duration_p50

    def is_new_failure(self, kind: str | None) -> bool:
        """True when `kind` has completed before, so a failure now is news, not chronic."""
        if kind is None:
            return False
        entry = self._kinds.get(kind)
        return entry is not None and entry.completed > 0

    def describe_failure(self, kind: str | None) -> str | None:
        """A note for a failure's message: new (it used to complete) or chronic; None if unknown.

        Call it before recording the failing attempt, so the counts are those of the past.
        """
        if kind is None or kind not in self._kinds:
            return None
        h = self.history(kind)
        if h.completed:
            return (
                f"new failure: {kind} completed {h.completed} of {h.completed + h.failed} "
                f"times before; look at what changed (input, code, machine)"
            )
        if h.failed:
            return f"chronic failure: {kind} has failed all {h.failed} times it ran and never completed"
        return None
