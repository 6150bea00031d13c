"""Tests of the per-kind history of finished attempts."""

from __future__ import annotations

import msgspec
import pytest

from packsched.resources import MiB
from packsched.stats.history import History, percentile
from packsched.store.base import HistoryQuery, StoreBatch
from packsched.store.memory import MemoryStore
from packsched.task import (
    Attempt,
    ErrorCode,
    RuntimeStatistics,
    TaskError,
    TaskOutput,
    TaskResult,
    TaskState,
    new_task_id,
)


def attempt(
    kind: str | None,
    state: TaskState = TaskState.COMPLETE,
    *,
    duration: float = 1.0,
    memory: int = 100 * MiB,
    code: ErrorCode | None = None,
    finished_at: float = 1000.0,
) -> Attempt:
    """A finished attempt with statistics (and an error when `code` is given)."""
    errors = [TaskError(code=code, message="x")] if code else []
    stats = RuntimeStatistics(duration=duration, memory=memory)
    return Attempt(
        task_id=new_task_id(),
        attempt=0,
        state=state,
        kind=kind,
        finished_at=finished_at,
        result=TaskResult(
            exit_code=0 if code is None else 1,
            output=TaskOutput(runtime_statistics=stats, errors=errors),
        ),
    )


def test_percentile_is_nearest_rank() -> None:
    """p50 and p95 by nearest rank; empty gives None."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile([3.0], 95) == 3
    assert percentile([], 50) is None


def test_summary_counts_rates_and_percentiles() -> None:
    """Counts, success rate and p50/p95 of duration (completed) and memory (all that ran)."""
    h = History()
    for i in range(1, 21):
        h.record(attempt("align", duration=float(i), memory=i * MiB, finished_at=100.0 + i))
    h.record(
        attempt("align", TaskState.ERROR, duration=999.0, memory=500 * MiB, code="exit-status")
    )
    h.record(attempt("align", TaskState.KILLED, code="killed"))
    s = h.history("align")
    assert (s.count, s.completed, s.failed) == (22, 20, 1)
    assert s.success_rate == pytest.approx(20 / 21)
    assert (s.duration_p50, s.duration_p95) == (10.0, 19.0)
    assert s.memory_p95 == 100 * MiB
    assert s.last_completed_at == 120.0


def test_unknown_kind_is_empty() -> None:
    """A kind never seen has zero counts and no predictions."""
    h = History()
    s = h.history("nope")
    assert s.count == 0 and s.success_rate is None and s.duration_p50 is None
    assert h.expected_duration("nope") is None
    assert h.expected_duration(None) is None
    assert not h.is_new_failure("nope")
    assert h.describe_failure("nope") is None


def test_expected_duration_is_the_p50_of_completed_runs() -> None:
    """Packing uses the median of completed durations; failures do not skew it."""
    h = History()
    for d in (10.0, 20.0, 30.0):
        h.record(attempt("sort", duration=d))
    h.record(attempt("sort", TaskState.ERROR, duration=0.01, code="timeout"))
    assert h.expected_duration("sort") == 20.0


def test_new_failure_versus_chronic() -> None:
    """A kind that completed before fails anew; one that never completed fails chronically."""
    h = History()
    h.record(attempt("good"))
    h.record(attempt("bad", TaskState.ERROR, code="exit-status"))
    assert h.is_new_failure("good")
    assert not h.is_new_failure("bad")
    note = h.describe_failure("good")
    assert note is not None and note.startswith("new failure: good completed 1 of 1")
    chronic = h.describe_failure("bad")
    assert chronic is not None and chronic.startswith("chronic failure")


def test_lost_and_killed_do_not_count_as_failures() -> None:
    """Lost, killed and unschedulable attempts are neither successes nor failures."""
    h = History()
    h.record(attempt("k", TaskState.LOST, code="lost"))
    h.record(attempt("k", TaskState.KILLED, code="killed"))
    h.record(attempt("k", TaskState.ERROR, code="unschedulable"))
    s = h.history("k")
    assert s.count == 3 and s.failed == 0 and s.success_rate is None
    assert h.describe_failure("k") is None


def test_an_attempt_counts_once() -> None:
    """An ERROR later given up as FAILED (same task and attempt) is not a second failure."""
    h = History()
    first = attempt("k", TaskState.ERROR, code="exit-status")
    h.record(first)
    h.record(msgspec.structs.replace(first, state=TaskState.FAILED))
    h.record(msgspec.structs.replace(first, attempt=1))
    s = h.history("k")
    assert (s.count, s.failed) == (2, 2)


def test_window_and_kind_bounds() -> None:
    """Percentiles cover the last `window` attempts; the oldest kinds are dropped past max_kinds."""
    h = History(window=3, max_kinds=2)
    for d in (100.0, 100.0, 1.0, 2.0, 3.0):
        h.record(attempt("a", duration=d))
    assert h.history("a").duration_p95 == 3.0
    assert h.history("a").count == 5
    h.record(attempt("b"))
    h.record(attempt("c"))
    assert h.kinds() == ["b", "c"]
    h.record(attempt(None))
    assert h.kinds() == ["b", "c"]


def test_bad_bounds_are_refused() -> None:
    """Window and max_kinds must be positive."""
    with pytest.raises(ValueError, match="window"):
        History(window=0)
    with pytest.raises(ValueError, match="max_kinds"):
        History(max_kinds=0)


class FakeStore:
    """A HistorySource holding attempts in a list."""

    def __init__(self, attempts: list[Attempt]) -> None:
        self.attempts = attempts
        self.queries: list[HistoryQuery] = []

    async def history(self, query: HistoryQuery) -> list[Attempt]:
        self.queries.append(query)
        return [
            a for a in self.attempts if query.since is None or (a.finished_at or 0) >= query.since
        ]


async def test_load_from_a_durable_source() -> None:
    """History is fed from anything with the Store's history(query) method."""
    store = FakeStore([attempt("x", finished_at=10.0), attempt("x", finished_at=20.0)])
    h = History()
    assert await h.load_from(store, since=15.0) == 1
    assert store.queries == [HistoryQuery(since=15.0)]
    assert h.history("x").count == 1


async def test_load_from_memory_store() -> None:
    """The project's MemoryStore satisfies the HistorySource protocol."""
    store = MemoryStore()
    await store.open()
    await store.write(
        StoreBatch(attempts=[attempt("y"), attempt("y", TaskState.ERROR, code="exit-status")])
    )
    h = History()
    assert await h.load_from(store) == 2
    assert h.history("y").success_rate == 0.5
    await store.close()
