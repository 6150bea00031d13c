"""Store benchmark: what durability costs, through the scheduler and at the store itself.

1. Tasks/s through a `Scheduler` with SimCluster (zero-duration tasks, 10,000 by default)
   with `MemoryStore` and with `SQLiteStore` at each durability, in the same run, interleaved,
   median of the repeats. Target: SQLite (normal) >= 50 % of memory.
2. The size of the SQLite file per 10,000 settled tasks (with their attempt history).
3. Raw `write()` throughput: the batches a scheduler would write for each task's life
   (WAITING, STAGING, RUNNING, COMPLETE plus its attempt), without the scheduler.

Run: `.venv/bin/python bench/store.py [--tasks N] [--repeats R]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

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
    import msgspec

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


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned plain-text table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[k]) for r in cells)) for k, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            "  ".join(
                c.ljust(w) if k == 0 else c.rjust(w)
                for k, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


async def main(tasks: int, repeats: int, batch: int) -> None:
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, Python "
        f"{platform.python_version()}; {tasks} tasks, median of {repeats}"
    )
    sched_times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    raw_times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    sizes: list[int] = []
    batches = _lifecycle(tasks, batch)
    for _ in range(repeats):
        for kind, factory in KINDS.items():  # interleaved, so drift hits every kind alike
            with tempfile.TemporaryDirectory() as tmp:
                workdir = Path(tmp)
                sched_times[kind].append(await through_scheduler(factory(workdir), tasks))
                if kind == "sqlite (normal)":
                    sizes.append((workdir / "store.db").stat().st_size)
            with tempfile.TemporaryDirectory() as tmp:
                raw_times[kind].append(await raw_writes(factory(Path(tmp)), batches))

    memory_rate = tasks / statistics.median(sched_times["memory"])
    raw_memory_rate = tasks / statistics.median(raw_times["memory"])
    rows = []
    for kind in KINDS:
        rate = tasks / statistics.median(sched_times[kind])
        raw_rate = tasks / statistics.median(raw_times[kind])
        rows.append(
            [
                kind,
                f"{rate:,.0f}",
                f"{rate / memory_rate:.2f}",
                f"{raw_rate:,.0f}",
                f"{raw_rate / raw_memory_rate:.2f}",
            ]
        )
    print()
    print(f"Tasks/s ({tasks} zero-duration SimCluster tasks; raw: {batch} tasks per write)")
    print(
        table(
            ["store", "scheduler tasks/s", "vs memory", "raw store tasks/s", "raw vs memory"],
            rows,
        )
    )
    size = statistics.median(sizes)
    print()
    print(
        table(
            ["SQLite file (normal), settled tasks with history", "bytes"],
            [
                [f"per {tasks:,} tasks (this run)", f"{size:,.0f}"],
                ["per 10,000 tasks", f"{size * 10_000 / tasks:,.0f}"],
                ["per task", f"{size / tasks:,.0f}"],
            ],
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100, help="tasks per raw write")
    args = parser.parse_args()
    anyio.run(main, args.tasks, args.repeats, args.batch)
