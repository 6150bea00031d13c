"""The immutable statistics snapshot a Scheduler returns from `stats()` (DESIGN §7).

The snapshot is everything the Prometheus collector, the HTTP API and the CLI show; they build
their views from it and keep no state of their own.
"""

from __future__ import annotations

import msgspec

from ..resources import Resources
from ..task import RuntimeStatistics, TaskError, TaskState

__all__ = [
    "AllocStats",
    "Counters",
    "Histogram",
    "StatsSnapshot",
    "TaskStats",
]


class Histogram(msgspec.Struct, frozen=True, kw_only=True):
    """A cumulative histogram: `buckets[i]` observations were <= `bounds[i]` (+Inf last)."""

    bounds: list[float]
    buckets: list[int]
    count: int = 0
    sum: float = 0.0


class Counters(msgspec.Struct, frozen=True, kw_only=True):
    """Totals since the scheduler started (they never go down)."""

    submitted: int = 0
    finished: dict[str, int] = {}  # by outcome: complete, error, failed, killed, skipped
    lost: int = 0
    retried: int = 0
    allocs_started: int = 0
    allocs_freed: int = 0
    allocs_dead: int = 0
    alloc_requests: int = 0
    alloc_requests_failed: int = 0
    queue_wait_seconds: Histogram | None = None
    run_seconds: Histogram | None = None


class AllocStats(msgspec.Struct, frozen=True, kw_only=True):
    """One alloc: what it holds, what is free, what runs on it."""

    id: str
    resources: Resources
    available: Resources
    dead: bool
    task_ids: list[str]
    labels: dict[str, str]
    created_at: float
    idle_since: float | None
    freed_at: float | None = None


class TaskStats(msgspec.Struct, frozen=True, kw_only=True):
    """One task as the statistics show it."""

    id: str
    name: str
    kind: str | None
    state: TaskState
    attempt: int
    alloc_id: str | None
    priority: int
    error: TaskError | None = None
    runtime_statistics: RuntimeStatistics | None = None


class StatsSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The whole scheduler at one instant.

    `allocs` holds the live allocs and the most recently dead ones (marked `dead`); only live
    ones are exported as Prometheus series.
    """

    taken_at: float
    total_allocs: int
    total_tasks: int
    tasks_by_state: dict[TaskState, int]
    allocs: list[AllocStats]
    tasks: list[TaskStats]
    pending_alloc_requests: int = 0
    pending_alloc_resources: Resources = Resources()
    counters: Counters = Counters()

    def live_allocs(self) -> list[AllocStats]:
        """The allocs that are not dead."""
        return [a for a in self.allocs if not a.dead]
