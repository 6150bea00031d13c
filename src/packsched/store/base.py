"""The Store protocol: the durable log of tasks, attempts and allocs.

The store is the authority. The scheduler hands it one batch per step, and nothing in a batch
is visible (to `wait`, `get`, the API) before `write` has returned.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import msgspec

from ..resources import Resources
from ..task import Attempt, Task, TaskState

__all__ = ["AllocRecord", "HistoryQuery", "Store", "StoreBatch"]


class AllocRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the store keeps of an alloc: enough to re-attach it after a restart."""

    id: str
    resources: Resources
    labels: dict[str, str] = {}
    created_at: float = 0.0
    freed_at: float | None = None
    dead: bool = False


class StoreBatch(msgspec.Struct, kw_only=True):
    """One scheduler step's changes: the latest snapshot of every changed task, the attempts
    that ended, and the allocs that were created or changed."""

    tasks: list[Task] = []
    attempts: list[Attempt] = []
    allocs: list[AllocRecord] = []

    def __bool__(self) -> bool:
        return bool(self.tasks or self.attempts or self.allocs)


class HistoryQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A filter over attempts; every field that is set must match."""

    task_id: str | None = None
    kind: str | None = None
    run: str | None = None
    state: TaskState | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None


class Store(abc.ABC):
    """A durable log of tasks, attempts and allocs."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Open (creating or migrating if needed). Raise `StoreError` if it cannot be used."""

    @abc.abstractmethod
    async def load_tasks(self) -> list[Task]:
        """Every task not pruned, in submission order (`seq`)."""

    @abc.abstractmethod
    async def load_allocs(self) -> list[AllocRecord]:
        """Every alloc not yet freed."""

    @abc.abstractmethod
    async def write(self, batch: StoreBatch) -> None:
        """Record a batch durably (as the store's durability setting defines) and atomically."""

    @abc.abstractmethod
    async def history(self, query: HistoryQuery) -> list[Attempt]:
        """Finished attempts matching `query`, oldest first.

        The time range is on when each attempt ended (`since <= ended < until`); with `limit`
        these are the latest `limit` matches (still oldest first), which is what per-kind
        statistics want.
        """

    @abc.abstractmethod
    async def error_tasks_older_than(self, before: float) -> list[str]:
        """Ids of the tasks in ERROR whose state changed before `before`, oldest first.

        The scheduler ages these out to FAILED (an ERROR left alone too long is given up on).
        """

    @abc.abstractmethod
    async def prune(self, settled_before: float) -> int:
        """Delete settled tasks (and their attempts) that settled before this time; return how many."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and close."""

    def describe(self) -> str:
        """A short description for logs, e.g. the file path."""
        return type(self).__name__

    def state_counts_hint(self) -> Sequence[tuple[TaskState, int]] | None:
        """Optional: counts by state, for stats without a scan. None when unknown."""
        return None
