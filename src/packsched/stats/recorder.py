"""The scheduler's running totals: event counters and the queue-wait and run-time histograms.

The scheduler calls one method per event; `counters()` returns an immutable `Counters` for the
snapshot. Everything here is plain arithmetic on the event loop's thread, so no locking.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from .snapshot import Counters, Histogram

__all__ = ["SECONDS_BUCKETS", "HistogramRecorder", "StatsRecorder"]

# Bounds in seconds from 5 ms to an hour: a queue wait or a run of a pipeline step can be either
# a blink (a drain cycle, `echo`) or an hour-long job, so the bounds grow roughly x2.5 per step
# to keep the series count small (18 buckets + Inf) across six orders of magnitude.
SECONDS_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)


class HistogramRecorder:
    """A cumulative histogram being filled; `snapshot()` returns an immutable `Histogram`."""

    def __init__(self, bounds: Sequence[float] = SECONDS_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self._bounds = [float(b) for b in bounds if not math.isinf(b)]
        # Per-bucket (not yet cumulative) counts; the last slot is +Inf.
        self._counts = [0] * (len(self._bounds) + 1)
        self._count = 0
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation. NaN is ignored; negatives (clock skew) count as 0."""
        if math.isnan(value):
            return
        value = max(0.0, value)
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._count += 1
        self._sum += value

    def snapshot(self) -> Histogram:
        """The histogram so far, cumulative as Prometheus expects, with +Inf last."""
        cumulative: list[int] = []
        running = 0
        for n in self._counts:
            running += n
            cumulative.append(running)
        return Histogram(
            bounds=[*self._bounds, math.inf],
            buckets=cumulative,
            count=self._count,
            sum=self._sum,
        )


class StatsRecorder:
    """Owns the totals of `Counters`; the scheduler reports each event as it happens."""

    def __init__(self, bounds: Sequence[float] = SECONDS_BUCKETS) -> None:
        self._submitted = 0
        self._finished: dict[str, int] = {}
        self._lost = 0
        self._retried = 0
        self._allocs_started = 0
        self._allocs_freed = 0
        self._allocs_dead = 0
        self._alloc_requests = 0
        self._alloc_requests_failed = 0
        self._queue_wait = HistogramRecorder(bounds)
        self._run = HistogramRecorder(bounds)

    def task_submitted(self, n: int = 1) -> None:
        """`n` new tasks were accepted (not a resubmit of an existing key)."""
        self._submitted += n

    def task_finished(self, outcome: str, queue_wait: float | None, run_time: float | None) -> None:
        """A task settled with `outcome` (a settled state's value: complete, error, ...).

        Args:
            outcome: the settled state, used as the `outcome` label.
            queue_wait: seconds from (re)queueing to start, if it started.
            run_time: seconds it ran, if it started.
        """
        self._finished[outcome] = self._finished.get(outcome, 0) + 1
        if queue_wait is not None:
            self._queue_wait.observe(queue_wait)
        if run_time is not None:
            self._run.observe(run_time)

    def task_lost(self) -> None:
        """A running task was lost with its alloc."""
        self._lost += 1

    def task_retried(self) -> None:
        """A task in ERROR went back to WAITING for another attempt."""
        self._retried += 1

    def alloc_started(self) -> None:
        """A cluster granted an alloc."""
        self._allocs_started += 1

    def alloc_freed(self, dead: bool) -> None:
        """An alloc was freed; `dead` when it was freed because its keepalive failed."""
        self._allocs_freed += 1
        if dead:
            self._allocs_dead += 1

    def alloc_requested(self) -> None:
        """The scheduler asked the cluster for an alloc."""
        self._alloc_requests += 1

    def alloc_request_failed(self) -> None:
        """An alloc request was refused or failed (not counting cancelled ones)."""
        self._alloc_requests_failed += 1

    def counters(self) -> Counters:
        """An immutable copy of every total and both histograms."""
        return Counters(
            submitted=self._submitted,
            finished=dict(self._finished),
            lost=self._lost,
            retried=self._retried,
            allocs_started=self._allocs_started,
            allocs_freed=self._allocs_freed,
            allocs_dead=self._allocs_dead,
            alloc_requests=self._alloc_requests,
            alloc_requests_failed=self._alloc_requests_failed,
            queue_wait_seconds=self._queue_wait.snapshot(),
            run_seconds=self._run.snapshot(),
        )
