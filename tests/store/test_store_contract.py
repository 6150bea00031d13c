"""The Store contract, checked against both MemoryStore and SQLiteStore."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from packsched.errors import InvalidSpecError
from packsched.store import HistoryQuery, MemoryStore, Store, StoreBatch
from packsched.task import TaskState

from .records import make_alloc, make_attempt, make_task, task_id

S = TaskState


async def test_tasks_round_trip_in_submission_order(store: Store) -> None:
    """Tasks come back equal to what was written, ordered by seq, not by write order."""
    tasks = [make_task(n) for n in (3, 1, 2)]
    await store.write(StoreBatch(tasks=tasks))
    assert await store.load_tasks() == sorted(tasks, key=lambda t: t.seq)


async def test_later_snapshot_replaces_earlier(store: Store) -> None:
    """A task is upserted: the latest snapshot wins, within a batch and across batches."""
    await store.write(StoreBatch(tasks=[make_task(1), make_task(1, S.STAGING)]))
    assert [t.state for t in await store.load_tasks()] == [S.STAGING]
    await store.write(StoreBatch(tasks=[make_task(1, S.RUNNING)]))
    assert [t.state for t in await store.load_tasks()] == [S.RUNNING]


async def test_empty_batch_is_a_no_op(store: Store) -> None:
    """An empty batch writes nothing and does not fail."""
    await store.write(StoreBatch())
    assert await store.load_tasks() == []


async def test_contents_survive_reopen(store_factory: Callable[[], Store]) -> None:
    """What was written before close is loaded by the next open of the same store."""
    first = store_factory()
    await first.open()
    await first.write(
        StoreBatch(
            tasks=[make_task(1, S.COMPLETE), make_task(2, S.RUNNING)],
            attempts=[make_attempt(1)],
            allocs=[make_alloc("a1")],
        )
    )
    await first.close()
    second = store_factory()
    await second.open()
    try:
        assert [t.id for t in await second.load_tasks()] == [task_id(1), task_id(2)]
        assert [a.id for a in await second.load_allocs()] == ["a1"]
        assert await second.history(HistoryQuery()) == [make_attempt(1)]
    finally:
        await second.close()


async def test_callers_cannot_mutate_the_store(store: Store) -> None:
    """Mutating a written or a loaded record leaves the stored one unchanged (a durable store
    keeps copies; MemoryStore shares the scheduler's frozen snapshots, to cost no second copy
    per task, so this holds for it only as far as frozen structs go)."""
    if isinstance(store, MemoryStore):
        pytest.skip("MemoryStore shares the frozen snapshots it is given, by design")
    task = make_task(1)
    await store.write(StoreBatch(tasks=[task]))
    task.spec.labels["n"] = "changed after write"
    [loaded] = await store.load_tasks()
    assert loaded.spec.labels == {"n": "1"}
    loaded.spec.command.append("changed after load")
    [again] = await store.load_tasks()
    assert again.spec.command == ["echo", "1"]


async def test_only_live_allocs_are_loaded(store: Store) -> None:
    """load_allocs returns the allocs not freed; freeing is an upsert of the record."""
    await store.write(StoreBatch(allocs=[make_alloc("a1"), make_alloc("a2")]))
    await store.write(StoreBatch(allocs=[make_alloc("a1", freed_at=1500.0)]))
    assert await store.load_allocs() == [make_alloc("a2")]


async def test_history_keeps_every_attempt_with_its_result(store: Store) -> None:
    """Each ended attempt is kept with its times, alloc, errors and statistics."""
    lost = make_attempt(1, 0, S.LOST, finished_at=1500.0)
    done = make_attempt(1, 1, S.COMPLETE, finished_at=1600.0)
    await store.write(StoreBatch(attempts=[lost]))
    await store.write(StoreBatch(attempts=[done]))
    assert await store.history(HistoryQuery(task_id=task_id(1))) == [lost, done]
    [got] = await store.history(HistoryQuery(state=S.COMPLETE))
    assert got.result is not None and got.result.output.runtime_statistics is not None
    assert got.result.output.runtime_statistics.memory == 2000
    assert got.alloc_id == "alloc-1"


async def test_history_filters(store: Store) -> None:
    """Every filter of HistoryQuery narrows the result; they combine with AND."""
    attempts = [
        make_attempt(1, kind="align", run="r1", finished_at=100.0),
        make_attempt(2, kind="align", run="r2", finished_at=200.0, state=S.ERROR),
        make_attempt(3, kind="sort", run="r1", finished_at=300.0),
        make_attempt(4, kind=None, run=None, finished_at=400.0, state=S.ERROR),
    ]
    await store.write(StoreBatch(attempts=attempts))

    async def ids(**fields: object) -> list[str]:
        query = HistoryQuery(**fields)  # type: ignore[arg-type]
        return [a.task_id for a in await store.history(query)]

    assert await ids() == [task_id(n) for n in (1, 2, 3, 4)]
    assert await ids(kind="align") == [task_id(1), task_id(2)]
    assert await ids(run="r1") == [task_id(1), task_id(3)]
    assert await ids(state=S.ERROR) == [task_id(2), task_id(4)]
    assert await ids(task_id=task_id(3)) == [task_id(3)]
    assert await ids(since=200.0, until=400.0) == [task_id(2), task_id(3)]
    assert await ids(kind="align", state=S.ERROR) == [task_id(2)]
    assert await ids(kind="nothing") == []


async def test_history_limit_returns_the_latest_oldest_first(store: Store) -> None:
    """With a limit, history gives the most recent matches, still in time order."""
    await store.write(
        StoreBatch(attempts=[make_attempt(n, finished_at=100.0 * (10 - n)) for n in range(10)])
    )
    got = await store.history(HistoryQuery(kind="align", limit=3))
    assert [a.finished_at for a in got] == [800.0, 900.0, 1000.0]
    assert await store.history(HistoryQuery(limit=0)) == []


async def test_history_rejects_a_negative_limit(store: Store) -> None:
    """A negative limit is refused, naming the field."""
    with pytest.raises(InvalidSpecError) as info:
        await store.history(HistoryQuery(limit=-1))
    assert info.value.path == "$.limit"


async def test_a_repeated_attempt_replaces_the_first(store: Store) -> None:
    """Writing the same (task, attempt) twice keeps one record, the latest."""
    await store.write(StoreBatch(attempts=[make_attempt(1, 0, S.ERROR)]))
    await store.write(StoreBatch(attempts=[make_attempt(1, 0, S.COMPLETE)]))
    assert [a.state for a in await store.history(HistoryQuery())] == [S.COMPLETE]


async def test_error_tasks_older_than(store: Store) -> None:
    """Only tasks now in ERROR and changed before the cutoff are listed, oldest first."""
    await store.write(
        StoreBatch(
            tasks=[
                make_task(1, S.ERROR, at=300.0),
                make_task(2, S.ERROR, at=100.0),
                make_task(3, S.ERROR, at=900.0),
                make_task(4, S.FAILED, at=50.0),
                make_task(5, S.ERROR, at=200.0),
            ]
        )
    )
    await store.write(StoreBatch(tasks=[make_task(5, S.WAITING, at=250.0, attempt=1)]))
    assert await store.error_tasks_older_than(500.0) == [task_id(2), task_id(1)]
    assert await store.error_tasks_older_than(50.0) == []


async def test_prune_deletes_old_settled_tasks_and_their_attempts(store: Store) -> None:
    """prune removes tasks settled before the cutoff with their history, and nothing else."""
    await store.write(
        StoreBatch(
            tasks=[
                make_task(1, S.COMPLETE, at=100.0),
                make_task(2, S.ERROR, at=150.0),
                make_task(3, S.COMPLETE, at=900.0),
                make_task(4, S.WAITING, at=50.0),
                make_task(5, S.RUNNING, at=50.0),
            ],
            attempts=[
                make_attempt(1, finished_at=100.0),
                make_attempt(2, finished_at=150.0, state=S.ERROR),
                make_attempt(3, finished_at=900.0),
                make_attempt(4, 0, S.LOST, finished_at=40.0),
            ],
            allocs=[make_alloc("old", freed_at=100.0), make_alloc("live")],
        )
    )
    assert await store.prune(500.0) == 2
    assert [t.id for t in await store.load_tasks()] == [task_id(n) for n in (3, 4, 5)]
    assert [a.task_id for a in await store.history(HistoryQuery())] == [task_id(4), task_id(3)]
    assert await store.error_tasks_older_than(1e9) == []
    assert [a.id for a in await store.load_allocs()] == ["live"]
    assert await store.prune(500.0) == 0


async def test_large_odd_sized_batches_round_trip(store: Store) -> None:
    """Batches of any size (here 777 and then 300 of them again) are stored whole."""
    await store.write(
        StoreBatch(
            tasks=[make_task(n) for n in range(777)],
            attempts=[make_attempt(n, finished_at=float(n)) for n in range(777)],
        )
    )
    await store.write(StoreBatch(tasks=[make_task(n, S.COMPLETE) for n in range(300)]))
    tasks = await store.load_tasks()
    assert [t.seq for t in tasks] == list(range(777))
    assert [t.state for t in tasks] == [S.COMPLETE] * 300 + [S.WAITING] * 477
    history = await store.history(HistoryQuery())
    assert [a.task_id for a in history] == [task_id(n) for n in range(777)]
