"""`MemoryStore`: the store for tests and embedding, kept in dicts and lost with the process.

It keeps the scheduler's own snapshots: they are frozen structs, so sharing them is safe, and
a waiting task costs no second, encoded copy (the store contract tests prove on SQLite that
every record survives encoding).
"""

from __future__ import annotations

import msgspec

from ..errors import StoreError
from ..task import Attempt, Task, TaskState
from .base import AllocRecord, HistoryQuery, Store, StoreBatch
from .codec import (
    attempt_ended_at,
    check_query,
    matches,
    task_settled_at,
)

__all__ = ["MemoryStore"]


class _TaskRow(msgspec.Struct, frozen=True):
    seq: int
    settled_at: float | None
    task: Task


class _AttemptRow(msgspec.Struct, frozen=True):
    ended_at: float
    order: int  # insertion order breaks ties between attempts that ended at the same time
    attempt: Attempt


class MemoryStore(Store):
    """A store held in this process's memory.

    Closing it keeps its contents, so one instance can stand in for a file across a
    scheduler's restart in a test.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, _TaskRow] = {}
        # ERROR task id -> when it entered ERROR, so aging out scans only these.
        self._errors: dict[str, float] = {}
        self._attempts: dict[tuple[str, int], _AttemptRow] = {}
        self._allocs: dict[str, tuple[float | None, AllocRecord]] = {}
        self._order = 0
        self._open = False

    async def open(self) -> None:
        """Start accepting calls (there is nothing to load)."""
        self._open = True

    async def close(self) -> None:
        """Stop accepting calls; the contents stay for the next `open`."""
        self._open = False

    def describe(self) -> str:
        """`memory` and how many tasks it holds."""
        return f"memory ({len(self._tasks)} tasks)"

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("the memory store is not open: call open() first")

    async def load_tasks(self) -> list[Task]:
        """Every task, in submission order."""
        self._check_open()
        rows = sorted(self._tasks.values(), key=lambda row: row.seq)
        return [row.task for row in rows]

    async def load_allocs(self) -> list[AllocRecord]:
        """Every alloc not yet freed."""
        self._check_open()
        return [alloc for freed, alloc in self._allocs.values() if freed is None]

    async def write(self, batch: StoreBatch) -> None:
        """Record a batch: upsert tasks and allocs, add attempts (replacing a repeat)."""
        self._check_open()
        for task in batch.tasks:
            self._tasks[task.id] = _TaskRow(task.seq, task_settled_at(task), task)
            if task.state is TaskState.ERROR:
                self._errors[task.id] = task.state_changed_at
            else:
                self._errors.pop(task.id, None)
        for attempt in batch.attempts:
            self._order += 1
            row = _AttemptRow(attempt_ended_at(attempt), self._order, attempt)
            self._attempts[(attempt.task_id, attempt.attempt)] = row
        for alloc in batch.allocs:
            self._allocs[alloc.id] = (alloc.freed_at, alloc)

    async def history(self, query: HistoryQuery) -> list[Attempt]:
        """Finished attempts matching `query`, oldest first (the latest `limit` of them)."""
        self._check_open()
        check_query(query)
        rows = [row for row in self._attempts.values() if matches(query, row.attempt, row.ended_at)]
        rows.sort(key=lambda row: (row.ended_at, row.order))
        if query.limit is not None:
            rows = rows[len(rows) - query.limit :] if query.limit else []
        return [row.attempt for row in rows]

    async def error_tasks_older_than(self, before: float) -> list[str]:
        """Ids of ERROR tasks whose state changed before `before`, oldest first."""
        self._check_open()
        old = [(at, task_id) for task_id, at in self._errors.items() if at < before]
        return [task_id for _, task_id in sorted(old)]

    async def prune(self, settled_before: float) -> int:
        """Delete tasks settled before `settled_before`, their attempts and old freed allocs."""
        self._check_open()
        doomed = {
            task_id
            for task_id, row in self._tasks.items()
            if row.settled_at is not None and row.settled_at < settled_before
        }
        for task_id in doomed:
            del self._tasks[task_id]
            self._errors.pop(task_id, None)
        for key in [key for key in self._attempts if key[0] in doomed]:
            del self._attempts[key]
        for alloc_id in [
            alloc_id
            for alloc_id, (freed, _) in self._allocs.items()
            if freed is not None and freed < settled_before
        ]:
            del self._allocs[alloc_id]
        return len(doomed)
