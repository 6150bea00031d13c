"""Throughput: zero-duration tasks from submit to all settled, packsched against Dask and Ray.

The same work everywhere: n tasks that each need one cpu and do nothing, on 8 cpus of
capacity, timed from the first submit to the last result (spec construction included).

- packsched: the in-process Scheduler with a SimCluster (8-cpu allocs, no start-up delay; the
  memory store), on a normal asyncio event loop.
- Dask: `distributed.LocalCluster(n_workers=2, threads_per_worker=4, resources={"cpu": 4})` on
  127.0.0.1, tasks mapped with `resources={"cpu": 1}`.
- Ray: `ray.init(num_cpus=8)`, tasks with `num_cpus=1`, run in a child process inside its own
  network namespace (`unshare -n`, loopback only) so that Ray binds nothing but 127.0.0.1.

Each size runs `--repeat` times (3) on every system and the table shows the median rate.
Each peer is optional (the `bench` extra); a missing one prints "skipped" with the reason.
Run: `.venv/bin/python bench/throughput.py [--quick] [--sizes 1000,10000,100000] [--repeat 3]`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, text_table, write_markdown

from packsched import GiB, Resources, Scheduler, SchedulerConfig, TaskSpec
from packsched.cluster import SimCluster
from packsched.log import configure_logging
from packsched.resources import AllocShape

__all__ = ["main", "run_dask", "run_packsched", "run_ray"]

CPUS = 8


def run_packsched(n: int, *, elastic: bool = False, budget: float = 120.0) -> tuple[int, float]:
    """Tasks settled and seconds taken for n zero-duration tasks through the Scheduler.

    With `elastic=False` the SimCluster holds one 8-cpu alloc (the peers' capacity); with
    `elastic=True` it grants 8-cpu allocs on demand (no start-up delay), as a cloud would.
    A run that has not settled everything within `budget` seconds stops there.
    """
    result: list[tuple[int, float]] = []

    async def run() -> None:
        cluster = SimCluster(
            [AllocShape(resources=Resources(cpu=CPUS, mem=32 * GiB, disk=100 * GiB))],
            max_allocs=None if elastic else 1,
        )
        async with Scheduler(cluster, config=SchedulerConfig()) as sched:
            start = time.perf_counter()
            specs = [
                TaskSpec(command=["true"], resources=Resources(cpu=1, mem=1 * GiB))
                for _ in range(n)
            ]
            tasks = await sched.submit(*specs)
            done = await sched.wait_many([t.id for t in tasks], timeout=budget)
            result.append((len(done), time.perf_counter() - start))

    anyio.run(run)
    return result[0]


def _noop(_: int) -> None:
    return None


def run_dask(sizes: Sequence[int], repeat: int = 1) -> dict[int, float] | str:
    """Median seconds for each size on a Dask LocalCluster with worker resources (`repeat`
    runs each, on one cluster), or why it was skipped."""
    try:
        # Imported by name so that the module type-checks with or without the bench extra.
        distributed: Any = importlib.import_module("distributed")
    except ImportError as exc:
        return f"skipped: distributed is not installed ({exc})"
    out: dict[int, float] = {}
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=CPUS // 2,
            resources={"cpu": CPUS // 2},
            host="127.0.0.1",
            dashboard_address=None,
            processes=True,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.submit(_noop, -1, pure=False).result()  # warm the workers up
        for n in sizes:
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                futures = client.map(_noop, range(n), resources={"cpu": 1}, pure=False)
                distributed.wait(futures)
                times.append(time.perf_counter() - start)
                del futures
            out[n] = statistics.median(times)
    return out


def _ray_child(sizes: Sequence[int], repeat: int) -> None:
    """Inside the network namespace: time each size on Ray `repeat` times and print
    {n: median seconds} as JSON."""
    ray: Any = importlib.import_module("ray")
    ray.init(
        num_cpus=CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )

    noop = ray.remote(num_cpus=1)(_noop)
    ray.get(noop.remote(-1))  # warm a worker up
    out: dict[int, float] = {}
    for n in sizes:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            ray.get([noop.remote(i) for i in range(n)])
            times.append(time.perf_counter() - start)
        out[n] = statistics.median(times)
    ray.shutdown()
    print(json.dumps(out))


def run_ray(sizes: Sequence[int], repeat: int = 1) -> dict[int, float] | str:
    """Median seconds for each size on Ray in a loopback-only network namespace (`repeat`
    runs each), or why it was skipped."""
    try:
        importlib.import_module("ray")
    except ImportError as exc:
        return f"skipped: ray is not installed ({exc})"
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return "skipped: needs `unshare` and `ip` to keep Ray on loopback (DESIGN §10)"
    probe = subprocess.run(
        [unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"skipped: cannot make a network namespace ({probe.stderr.strip()})"
    script = (
        f"{ip} link set lo up && exec {sys.executable} {Path(__file__).resolve()} "
        f"--ray-child {','.join(map(str, sizes))} --repeat {repeat}"
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [unshare, "-n", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=1800
    )
    if proc.returncode != 0:
        tail = "; ".join(proc.stderr.strip().splitlines()[-3:])
        return f"skipped: Ray failed (exit {proc.returncode}): {tail}"
    last = proc.stdout.strip().splitlines()[-1]
    return {int(k): float(v) for k, v in json.loads(last).items()}


def _rate(n: int, seconds: float | None) -> str:
    return f"{n / seconds:,.0f}" if seconds else "-"


def _cell(n: int, settled: int, seconds: float) -> str:
    """Tasks per second, and how far a run got when it ran out of time."""
    rate = f"{settled / seconds:,.0f}" if seconds else "-"
    return rate if settled == n else f"{rate} ({settled:,} of {n:,} in {seconds:.0f}s)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--sizes", help="comma-separated task counts")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds a packsched run may take at most"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per size and system; the median is shown"
    )
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")
    parser.add_argument("--ray-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat: must be at least 1")
    if args.ray_child:
        _ray_child([int(x) for x in args.ray_child.split(",")], args.repeat)
        return 0
    configure_logging("error", "console")
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    else:
        sizes = [200] if args.quick else [1_000, 10_000, 100_000]

    def median_run(n: int, elastic: bool) -> tuple[int, float]:
        """The run with the median rate (the lower middle one for an even count)."""
        runs = [run_packsched(n, elastic=elastic, budget=args.budget) for _ in range(args.repeat)]
        runs.sort(key=lambda r: r[0] / r[1])
        return runs[(len(runs) - 1) // 2]

    fixed = {n: median_run(n, False) for n in sizes}
    elastic = {n: median_run(n, True) for n in sizes}
    dask = "skipped: --no-dask" if args.no_dask else run_dask(sizes, args.repeat)
    ray = "skipped: --no-ray" if args.no_ray else run_ray(sizes, args.repeat)

    headers = [
        "tasks",
        "packsched, 8 cpus",
        "packsched, elastic",
        "Dask, 8 cpus",
        "Ray, 8 cpus",
        "packsched / Dask",
        "packsched / Ray",
    ]
    rows: list[list[object]] = []
    for n in sizes:
        ours = fixed[n][0] / fixed[n][1]
        d = dask.get(n) if isinstance(dask, dict) else None
        r = ray.get(n) if isinstance(ray, dict) else None
        rows.append(
            [
                n,
                _cell(n, *fixed[n]),
                _cell(n, *elastic[n]),
                _rate(n, d) if isinstance(dask, dict) else "skipped",
                _rate(n, r) if isinstance(ray, dict) else "skipped",
                f"{ours / (n / d):.2f}" if d else "-",
                f"{ours / (n / r):.2f}" if r else "-",
            ]
        )
    notes = [s for s in (dask, ray) if isinstance(s, str)]
    title = "Throughput: zero-duration tasks, submit to settled"
    print(title)
    print(text_table(headers, rows))
    for note in notes:
        print(note)
    if not args.no_write:
        text = (
            f"Each task needs 1 cpu and does nothing; {CPUS} cpus of capacity everywhere; timed "
            "from the first submit to the last result, spec construction included; rates in "
            f"tasks/s, the median of {args.repeat} runs per size and system. packsched: "
            "in-process Scheduler + SimCluster (memory store, default "
            "SchedulerConfig) holding one 8-cpu alloc (`8 cpus`, the peers' capacity) or granting "
            "8-cpu allocs on demand (`elastic`); a run still going after the budget "
            f"({args.budget:g}s) is stopped and its rate is what settled by then. Dask: LocalCluster(n_workers=2, "
            f"threads_per_worker={CPUS // 2}, resources={{'cpu': {CPUS // 2}}}) on 127.0.0.1. "
            f"Ray: ray.init(num_cpus={CPUS}) inside `unshare -n` (loopback only). Ratios are "
            "packsched's 8-cpu rate over the peer's."
        )
        sections = [("", text), ("Results", markdown_table(headers, rows))]
        if notes:
            sections.append(("Skipped", "\n".join(f"- {n}" for n in notes)))
        write_markdown("throughput", title, sections)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
