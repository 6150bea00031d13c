"""A Scheduler started on an existing SQLite store carries on where the last one stopped."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec
import pytest

from packsched import GiB, Resources, Scheduler, SchedulerConfig, TaskSpec, TaskState
from packsched.cluster.base import Alloc, StartedCallback
from packsched.errors import StoreError
from packsched.store import AllocRecord, HistoryQuery, SQLiteStore, StoreBatch
from packsched.task import Task, TaskResult
from packsched.testing import ManualAlloc, ManualCluster, error_codes

from .records import make_task, task_id

S = TaskState
FAST = SchedulerConfig(drain_timeout=0.01, keepalive_interval=0.05, min_alloc=Resources())
ONE_TASK = Resources(cpu=1, mem=1 * GiB)


class ReattachableAlloc(ManualAlloc):
    """A ManualAlloc that also takes back the attempts it ran before the restart."""

    async def attach(self, task: Task, started: StartedCallback) -> TaskResult:
        return await self.run(task, started)


class ReattachingCluster(ManualCluster):
    """A ManualCluster whose allocs named in `alive` survive a scheduler restart."""

    def __init__(self, alive: set[str]) -> None:
        super().__init__(Resources(cpu=64, mem=256 * GiB))
        self.alive = alive
        self.reattached: dict[str, ReattachableAlloc] = {}

    async def reattach(
        self, alloc_id: str, resources: Resources, labels: Mapping[str, str]
    ) -> Alloc | None:
        if alloc_id not in self.alive:
            return None
        alloc = ReattachableAlloc(resources, labels)
        alloc.id = alloc_id
        self.reattached[alloc_id] = alloc
        return alloc


def on_alloc(task: Task, alloc_id: str) -> Task:
    """`task` as the store holds it once placed on `alloc_id`."""
    return msgspec.structs.replace(task, alloc_id=alloc_id)


async def leave_behind(path: Path, batch: StoreBatch) -> None:
    """Write what a scheduler killed mid-flight would have left in the store."""
    store = SQLiteStore(path)
    await store.open()
    await store.write(batch)
    await store.close()


def alloc_record(alloc_id: str) -> AllocRecord:
    """A live alloc as the killed scheduler recorded it."""
    return AllocRecord(id=alloc_id, resources=Resources(cpu=4, mem=8 * GiB), created_at=900.0)


async def test_resume_requeues_loses_and_keeps(tmp_path: Path) -> None:
    """Waiting and held tasks come back as they were, placed ones whose alloc is gone are LOST
    (attempt + 1), settled ones keep their results, and keys stay idempotent."""
    path = tmp_path / "store.db"
    done = make_task(5, S.COMPLETE, key="k5", result=TaskResult(exit_code=0, stdout_tail="hi"))
    await leave_behind(
        path,
        StoreBatch(
            tasks=[
                make_task(1, S.WAITING),
                make_task(2, S.HOLD),
                on_alloc(make_task(3, S.STAGING), "gone-1"),
                on_alloc(make_task(4, S.RUNNING), "gone-1"),
                done,
                make_task(6, S.WAITING, key="k6"),
                make_task(7, S.ERROR),
            ],
            allocs=[alloc_record("gone-1")],
        ),
    )
    cluster = ReattachingCluster(alive=set())
    async with Scheduler(cluster, config=FAST, store=SQLiteStore(path)) as sched:
        assert sched.get(task_id(1)).state is S.WAITING
        assert sched.get(task_id(2)).state is S.HOLD
        assert sched.get(task_id(7)).state is S.ERROR
        assert sched.get(task_id(5)) == done
        for n in (3, 4):
            lost = sched.get(task_id(n))
            assert (lost.state, lost.attempt, lost.lost_count) == (S.WAITING, 1, 1)
            [attempt] = await sched.history(HistoryQuery(task_id=task_id(n)))
            assert (attempt.attempt, attempt.state, attempt.alloc_id) == (0, S.LOST, "gone-1")
        again = await sched.submit(
            TaskSpec(command=["x"], key="k5"), TaskSpec(command=["y"], key="k6")
        )
        assert [t.id for t in again] == [task_id(5), task_id(6)]

        # One task at a time: the lost ones first (head of the queue), then in submit order.
        alloc = (await cluster.next_request()).grant(ONE_TASK)
        order = []
        for _ in range(4):
            [running] = await alloc.wait_running(1)
            order.append(running)
            alloc.complete(running)
            await sched.wait(running)
        assert set(order[:2]) == {task_id(3), task_id(4)}
        assert order[2:] == [task_id(1), task_id(6)]
        assert sched.get(task_id(2)).state is S.HOLD

    store = SQLiteStore(path)
    await store.open()
    try:
        assert "gone-1" not in [a.id for a in await store.load_allocs()]
    finally:
        await store.close()


async def test_resume_reattaches_running_tasks(tmp_path: Path) -> None:
    """Tasks on an alloc the cluster can re-attach keep running in the same attempt; tasks on
    an alloc that is gone are LOST."""
    path = tmp_path / "store.db"
    await leave_behind(
        path,
        StoreBatch(
            tasks=[
                on_alloc(make_task(1, S.RUNNING), "alive-1"),
                on_alloc(make_task(2, S.STAGING), "alive-1"),
                on_alloc(make_task(3, S.RUNNING), "gone-2"),
            ],
            allocs=[alloc_record("alive-1"), alloc_record("gone-2")],
        ),
    )
    cluster = ReattachingCluster(alive={"alive-1"})
    async with Scheduler(cluster, config=FAST, store=SQLiteStore(path)) as sched:
        alloc = cluster.reattached["alive-1"]
        assert sorted(await alloc.wait_running(2)) == [task_id(1), task_id(2)]
        alloc.complete(task_id(1))
        alloc.complete(task_id(2), exit_code=3)
        first, second = await sched.wait_many([task_id(1), task_id(2)])
        assert (first.state, first.attempt, first.alloc_id) == (S.COMPLETE, 0, "alive-1")
        assert (second.state, second.attempt) == (S.ERROR, 0)
        assert error_codes(second) == ["exit-status"]
        gone = sched.get(task_id(3))
        assert (gone.state, gone.attempt, gone.lost_count) == (S.WAITING, 1, 1)
        history = await sched.history(HistoryQuery())
        assert {(a.task_id, a.attempt, a.state) for a in history} == {
            (task_id(1), 0, S.COMPLETE),
            (task_id(2), 0, S.ERROR),
            (task_id(3), 0, S.LOST),
        }


async def test_second_scheduler_on_the_same_file_is_refused(tmp_path: Path) -> None:
    """Two schedulers cannot share a store file: the second fails to start, the first goes on."""
    path = tmp_path / "store.db"
    cluster = ManualCluster(Resources(cpu=64, mem=256 * GiB))
    async with Scheduler(cluster, config=FAST, store=SQLiteStore(path)) as first:
        [t] = await first.submit(TaskSpec(command=["x"], resources=ONE_TASK, hold=True))
        with pytest.raises(StoreError, match="locked by process PID"):
            async with Scheduler(cluster, config=FAST, store=SQLiteStore(path)):
                pass  # pragma: no cover - never entered
        assert (await first.release(t.id)).state is S.WAITING
    async with Scheduler(cluster, config=FAST, store=SQLiteStore(path)) as second:
        assert second.get(t.id).state is S.WAITING


async def test_a_scheduler_on_a_foreign_file_fails_to_start(tmp_path: Path) -> None:
    """A scheduler given a file that is not a store stops at start with StoreError; the file
    keeps its bytes."""
    path = tmp_path / "thesis.db"
    path.write_bytes(b"chapter one\n" * 1000)
    cluster = ManualCluster(Resources(cpu=64, mem=256 * GiB))
    with pytest.raises(StoreError, match="not an SQLite database"):
        async with Scheduler(cluster, config=FAST, store=SQLiteStore(path)):
            pass  # pragma: no cover - never entered
    assert path.read_bytes() == b"chapter one\n" * 1000
