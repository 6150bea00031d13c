"""Store benchmark: what durability costs, through the scheduler and at the store itself.

1. Tasks/s through a `Scheduler` with SimCluster (zero-duration tasks, 10,000 by default)
   with `MemoryStore` and with `SQLiteStore` at each durability, in the same run, interleaved,
   median of the rounds. Target: SQLite (normal) >= 50 % of memory.
2. The size of the SQLite file per 10,000 settled tasks (with their attempt history), and how
   long reopening it and loading every task takes (what a restart pays).
3. Raw `write()` throughput: the batches a scheduler would write for each task's life
   (WAITING, STAGING, RUNNING, COMPLETE plus its attempt), without the scheduler.

Run alone: `.venv/bin/python bench/store.py [--tasks N] [--repeats R]` prints the tables and
writes them as markdown to `bench/results/store.md`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import msgspec
import structlog
from _common import machine, markdown_table, text_table, write_markdown

from packsched import GiB, Resources, Scheduler, SchedulerConfig, TaskSpec
from packsched.cluster import SimCluster
from packsched.store import MemoryStore, SQLiteStore, Store, StoreBatch
from packsched.store.sqlite import Durability
from packsched.task import Attempt, Task, TaskResult, TaskState

S = TaskState
CHUNK = 1000  # specs per submit call
DURABILITIES: tuple[Durability, ...] = ("normal", "full", "off")

StoreFactory = Callable[[Path], Store]


def _memory(_: Path) -> Store:
    return MemoryStore()


def _sqlite(durability: Durability) -> StoreFactory:
    return lambda workdir: SQLiteStore(workdir / "store.db", durability=durability)


KINDS: dict[str, StoreFactory] = {
    "memory": _memory,
    **{f"sqlite ({d})": _sqlite(d) for d in DURABILITIES},
}


def _spec(i: int) -> TaskSpec:
    return TaskSpec(
        command=["true", str(i)],
        resources=Resources(cpu=1, mem=1 * GiB),
        name=f"kind-{i % 10}",
        run="bench",
        labels={"i": str(i)},
    )


async def through_scheduler(store: Store, tasks: int) -> float:
    """Seconds from the first submit until every task has settled."""
    config = SchedulerConfig(min_alloc=Resources())
    async with Scheduler(SimCluster(), config=config, store=store) as sched:
        start = time.perf_counter()
        ids: list[str] = []
        for first in range(0, tasks, CHUNK):
            submitted = await sched.submit(*(_spec(i) for i in range(first, first + CHUNK)))
            ids += [t.id for t in submitted]
        done = await sched.wait_many(ids)
        elapsed = time.perf_counter() - start
        assert len(done) == tasks and all(t.state is S.COMPLETE for t in done)
    return elapsed


async def reopen(path: Path) -> float:
    """Milliseconds to open the store again and load its tasks and allocs (a restart)."""
    start = time.perf_counter()
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.load_tasks()
        await store.load_allocs()
        return (time.perf_counter() - start) * 1000
    finally:
        await store.close()


def _lifecycle(tasks: int, batch: int) -> list[StoreBatch]:
    """The batches a scheduler writes for `tasks` tasks, `batch` tasks per step and state."""
    now = 1_700_000_000.0
    batches: list[StoreBatch] = []
    for first in range(0, tasks, batch):
        group = [
            Task(
                id=f"{i:016x}",
                spec=_spec(i),
                state=S.WAITING,
                submitted_at=now,
                state_changed_at=now,
                seq=i + 1,
            )
            for i in range(first, min(tasks, first + batch))
        ]
        batches.append(StoreBatch(tasks=group))
        staging = [_replace(t, state=S.STAGING, alloc_id="sim-1") for t in group]
        batches.append(StoreBatch(tasks=staging))
        running = [_replace(t, state=S.RUNNING, started_at=now + 1) for t in staging]
        batches.append(StoreBatch(tasks=running))
        result = TaskResult(exit_code=0)
        complete = [
            _replace(t, state=S.COMPLETE, finished_at=now + 2, result=result) for t in running
        ]
        attempts = [
            Attempt(
                task_id=t.id,
                attempt=0,
                state=S.COMPLETE,
                kind=t.spec.kind,
                run=t.spec.run,
                alloc_id="sim-1",
                submitted_at=now,
                started_at=now + 1,
                finished_at=now + 2,
                result=result,
            )
            for t in complete
        ]
        batches.append(StoreBatch(tasks=complete, attempts=attempts))
    return batches


def _replace(task: Task, **changes: object) -> Task:
    return msgspec.structs.replace(task, **changes)


async def raw_writes(store: Store, batches: Sequence[StoreBatch]) -> float:
    """Seconds to write every batch, one `write` after another (as the committer does)."""
    await store.open()
    try:
        start = time.perf_counter()
        for batch in batches:
            await store.write(batch)
        return time.perf_counter() - start
    finally:
        await store.close()


async def main(tasks: int, repeats: int, batch: int) -> None:
    print(f"machine: {machine()}; {tasks} tasks, median of {repeats}", file=sys.stderr)
    sched_times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    raw_times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    sizes: list[int] = []
    reopens: list[float] = []
    batches = _lifecycle(tasks, batch)
    for round_ in range(repeats):
        for kind, factory in KINDS.items():  # interleaved, so drift hits every kind alike
            with tempfile.TemporaryDirectory() as tmp:
                workdir = Path(tmp)
                sched_times[kind].append(await through_scheduler(factory(workdir), tasks))
                if kind == "sqlite (normal)":
                    sizes.append((workdir / "store.db").stat().st_size)
                    reopens.append(await reopen(workdir / "store.db"))
            with tempfile.TemporaryDirectory() as tmp:
                raw_times[kind].append(await raw_writes(factory(Path(tmp)), batches))
        print(f"  round {round_ + 1} of {repeats}: done", file=sys.stderr)

    def rate(times: list[float]) -> float:
        return tasks / statistics.median(times)

    def versus_memory(times: dict[str, list[float]], kind: str) -> str:
        # The median of each round's own ratio: a round's kinds ran back to back, so load
        # from elsewhere on the machine cancels out better than in a ratio of medians.
        pairs = zip(times["memory"], times[kind], strict=True)
        return f"{statistics.median(memory / other for memory, other in pairs):.3f}"

    headers = ["store", "scheduler tasks/s", "vs memory", "raw store tasks/s", "raw vs memory"]
    rows: list[list[object]] = [
        [
            kind,
            f"{rate(sched_times[kind]):.0f}",
            versus_memory(sched_times, kind),
            f"{rate(raw_times[kind]):.0f}",
            versus_memory(raw_times, kind),
        ]
        for kind in KINDS
    ]
    size = statistics.median(sizes)
    size_headers = ["SQLite file (durability normal), settled tasks with history", "value"]
    size_rows: list[list[object]] = [
        [f"bytes for this run's {tasks} tasks (median)", f"{size:.0f}"],
        ["bytes per 10,000 settled tasks", f"{size * 10_000 / tasks:.0f}"],
        ["bytes per task", f"{size / tasks:.0f}"],
        [f"ms to reopen and load all {tasks} (a restart)", f"{statistics.median(reopens):.0f}"],
    ]
    print(text_table(headers, rows))
    print()
    print(text_table(size_headers, size_rows))
    notes = (
        f"{tasks} zero-duration SimCluster tasks through a Scheduler, submitted {CHUNK} per "
        f"call, timed from the first submit until all settled; raw: the same tasks' four "
        f"state snapshots and one attempt written straight to the store, {batch} tasks per "
        f"write. Rates are tasks/s from the median of {repeats} interleaved rounds; 'vs memory' "
        "is the median of each round's ratio. Target: "
        "SQLite (normal) at least 0.5 of memory through the scheduler."
    )
    path = write_markdown(
        "store",
        "Store throughput and size",
        [
            ("", notes),
            ("Throughput", markdown_table(headers, rows)),
            ("File size", markdown_table(size_headers, size_rows)),
        ],
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100, help="tasks per raw write")
    args = parser.parse_args()
    # The scheduler's info lines (allocs started, ...) would drown the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    anyio.run(main, args.tasks, args.repeats, args.batch)
