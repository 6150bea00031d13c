"""Scale: one placement pass over 100k waiting tasks and 1k live allocs; RSS per waiting task.

1. `packing.place` with 100k waiting demands (mixed shapes, priorities, some with expected
   durations) and 1k live allocs, each partly used so that a few thousand demands fit: the
   median of several passes, next to the reference design's first-fit pass (bench/baseline.py)
   on the same input, and `packing.plan` for what is left (the other half of every event).
2. RSS per waiting task: a fresh process starts a Scheduler whose cluster never grants an alloc,
   submits n tasks (each with its own command, name and resources, as decoded from a client),
   and reports the growth of its resident set (psutil) divided by n, at 100k and 1M.

Run: `.venv/bin/python bench/scale.py [--quick]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, text_table, write_markdown
from baseline import ReferencePolicy

from packsched import (
    GiB,
    MiB,
    Resources,
    Scheduler,
    SchedulerConfig,
    TaskSpec,
    TaskState,
    packing,
)
from packsched.cluster import SimCluster
from packsched.log import configure_logging
from packsched.resources import AllocShape

__all__ = ["main", "make_demands", "make_rooms", "rss_per_task"]

_SHAPE = Resources(cpu=64, mem=256 * GiB, disk=1024 * GiB)
_DEMAND_MIX = (
    Resources(cpu=1, mem=2 * GiB),
    Resources(cpu=4, mem=2 * GiB),
    Resources(cpu=0.5, mem=12 * GiB),
    Resources(cpu=2, mem=8 * GiB, disk=20 * GiB),
    Resources(cpu=0.25, mem=512 * MiB),
    Resources(cpu=8, mem=32 * GiB, gpu=1),
)


def make_demands(n: int, seed: int = 1) -> list[packing.Demand]:
    """n waiting demands of mixed shapes, three priorities, a third with expected durations."""
    rng = random.Random(seed)
    return [
        packing.Demand(
            id=f"t{i:07d}",
            resources=rng.choice(_DEMAND_MIX),
            priority=rng.choice((0, 0, 0, 1, 2)),
            order=i,
            expected_duration=rng.choice((None, None, rng.uniform(10, 3600))),
        )
        for i in range(n)
    ]


def make_rooms(n: int, seed: int = 2) -> list[packing.Room]:
    """n live 64-cpu allocs, each used between 80 % and 100 % (a busy cluster)."""
    rng = random.Random(seed)
    rooms = []
    for i in range(n):
        used = rng.uniform(0.8, 1.0)
        free = Resources(
            cpu=round(_SHAPE.cpu * (1 - used), 2),
            mem=int(_SHAPE.mem * (1 - used * rng.uniform(0.7, 1.0))),
            disk=_SHAPE.disk // 2,
        )
        rooms.append(
            packing.Room(
                id=f"a{i:05d}",
                capacity=_SHAPE,
                free=free,
                expected_free_at=rng.choice((None, rng.uniform(0, 3600))),
            )
        )
    return rooms


def _median_time(fn: object, repeats: int) -> tuple[float, object]:
    assert callable(fn)
    times, out = [], None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


# -- RSS -------------------------------------------------------------------------------------


def rss_per_task(n: int, batch: int = 100_000) -> dict[str, float]:
    """In this process: RSS growth per waiting task after submitting n to a running Scheduler."""
    configure_logging("error", "console")
    result: dict[str, float] = {}
    proc = psutil.Process()

    async def run() -> None:
        # max_allocs=0: every alloc request waits forever, so every task stays WAITING.
        cluster = SimCluster([AllocShape(resources=_SHAPE)], max_allocs=0)
        async with Scheduler(cluster, config=SchedulerConfig()) as sched:
            gc.collect()
            before = proc.memory_info().rss
            start = time.perf_counter()
            submitted = 0
            while submitted < n:
                k = min(batch, n - submitted)
                specs = [
                    TaskSpec(
                        command=["bin/step", "--sample", f"s{submitted + i}"],
                        name=f"step-{submitted + i}",
                        resources=Resources(cpu=1, mem=2 * GiB),
                    )
                    for i in range(k)
                ]
                await sched.submit(*specs)
                del specs
                submitted += k
            # Let the scheduler see every task in a pass, then settle the heap.
            await anyio.sleep(0.2)
            gc.collect()
            after = proc.memory_info().rss
            waiting = sched.stats(include_tasks=False).tasks_by_state.get(TaskState.WAITING, 0)
            result.update(
                tasks=float(n),
                waiting=float(waiting),
                rss_before_mib=before / MiB,
                rss_after_mib=after / MiB,
                bytes_per_task=(after - before) / n,
                submit_seconds=time.perf_counter() - start,
            )

    anyio.run(run)
    return result


def _rss_in_child(n: int) -> dict[str, float] | str:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(n)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        return f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    out: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# -- the command -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_per_task(args.rss_child)))
        return 0
    configure_logging("error", "console")
    n_demands, n_rooms = (2_000, 50) if args.quick else (100_000, 1_000)
    rss_sizes = [2_000] if args.quick else [100_000, 1_000_000]
    repeats = 2 if args.quick else args.repeats

    demands = make_demands(n_demands)
    rooms = make_rooms(n_rooms)
    reference = ReferencePolicy()
    t_place, placement = _median_time(lambda: packing.place(demands, rooms), repeats)
    t_ref, ref_placement = _median_time(lambda: reference.place(demands, rooms), repeats)
    assert isinstance(placement, packing.Placement)
    assert isinstance(ref_placement, packing.Placement)
    unplaced = placement.unplaced
    shapes = [AllocShape(resources=_SHAPE)]
    t_plan, _ = _median_time(
        lambda: packing.plan(
            unplaced, [], shapes, min_alloc=SchedulerConfig().min_alloc, max_new=5
        ),
        repeats,
    )

    headers = ["measure", "packsched", "baseline", "packsched / baseline", "target", "met"]
    size = f"{n_demands:,} waiting x {n_rooms:,} allocs"
    rows: list[list[object]] = [
        [
            f"place: one pass, {size} (median of {repeats})",
            f"{t_place:.3f} s ({len(placement.assignments):,} placed)",
            f"reference first fit {t_ref:.3f} s ({len(ref_placement.assignments):,} placed)",
            f"{t_place / t_ref:.2f}" if t_ref else "-",
            "<= 1 s",
            "yes" if t_place <= 1.0 else f"no, {t_place:.2f}x",
        ],
        [
            f"plan: the {len(unplaced):,} left over, 5 new allocs (median of {repeats})",
            f"{t_plan:.3f} s",
            "-",
            "-",
            "-",
            "-",
        ],
    ]
    notes: list[str] = []
    for n in rss_sizes:
        got = _rss_in_child(n)
        if isinstance(got, str):
            notes.append(f"RSS at {n:,}: {got}")
            rows.append([f"RSS per waiting task, {n:,} tasks", got, "", "", "", ""])
            continue
        per = got["bytes_per_task"]
        rows.append(
            [
                f"RSS per waiting task, {n:,} tasks (submit took {got['submit_seconds']:.0f} s)",
                f"{per / 1024:.2f} KiB",
                "target 2 KiB",
                f"{per / 2048:.2f}",
                "<= 2 KiB",
                "yes" if per <= 2048 else f"no, {per / 2048:.2f}x",
            ]
        )

    title = "Scale: placement pass and memory per waiting task"
    print(title)
    print(text_table(headers, rows))
    for note in notes:
        print(note)
    if not args.no_write:
        text = (
            "`place` and the reference first-fit pass get the same input: waiting demands of six "
            "mixed shapes (one with a GPU), three priorities, a third with expected durations; "
            "64-cpu allocs each 80-100 % used. RSS: a fresh process, a Scheduler with the memory "
            "store and a SimCluster that never grants an alloc (every task stays WAITING), tasks "
            "submitted in batches of 100k; growth of psutil RSS / tasks."
        )
        write_markdown("scale", title, [("", text), ("Results", markdown_table(headers, rows))])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
