"""Online cost: replay a trace through the real Scheduler and SimCluster, in virtual time.

Each trace is replayed twice in the same run, once with packsched's packing policy and once
with the reference design's (`bench/baseline.py`), on the same simulated cluster: a menu of
proportionally priced alloc shapes, a start-up delay for every alloc, idle allocs freed after a
while. The event loop's clock is virtual (`VirtualTimeLoop`), so hours of trace replay in seconds.

What is measured, per run: the alloc-resource-seconds the cluster billed (cpu-seconds and
memory-seconds, from grant to free), against the lower bound Σ task duration x resources;
efficiency = the lower bound / billed in the dominant dimension; allocs started; and the queue
wait of each task (submit to start) at p50 / p95.

Traces: synthetic (Poisson arrivals, lognormal durations, mixed cpu / memory shapes); the
Alibaba 2018 batch sample that the PyPI package `spar` ships (arrivals and durations as they
are, instances sampled down, cpu and memory scaled to a 96-core / 384-GiB machine); or any
`--trace FILE.csv` with columns `arrival,duration,cpu,mem` (seconds, seconds, cores, bytes or
"4GiB"). Run: `.venv/bin/python bench/trace.py [--quick] [--trace FILE.csv]`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import random
import selectors
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, markdown_table, ratio, text_table, write_markdown
from baseline import ReferencePolicy

from packsched import GiB, Resources, Scheduler, SchedulerConfig, TaskSpec, packing
from packsched.clock import Clock
from packsched.cluster import SimCluster
from packsched.log import configure_logging
from packsched.resources import AllocShape, parse_bytes
from packsched.scheduler import PackingPolicy

__all__ = ["TraceTask", "load_csv", "main", "replay", "synthetic"]


@dataclass(frozen=True, slots=True)
class TraceTask:
    """One task of a trace: when it arrives, how long it runs, what it needs."""

    arrival: float
    duration: float
    cpu: float
    mem: int


@dataclass(frozen=True, slots=True)
class Setup:
    """The simulated cluster and the scheduler settings both policies run with."""

    shapes: tuple[AllocShape, ...]
    startup_delay: float
    idle: float
    max_pending_allocs: int

    def describe(self) -> str:
        menu = ", ".join(s.resources.describe() for s in self.shapes)
        return (
            f"shapes [{menu}] priced by size; alloc start-up {self.startup_delay:g}s; idle allocs "
            f"freed after {self.idle:g}s; max_pending_allocs={self.max_pending_allocs}"
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one replay cost and how long its tasks waited."""

    tasks: int
    allocs: int
    cpu_seconds: float
    mem_seconds: float  # GiB-seconds
    lb_cpu_seconds: float
    lb_mem_seconds: float
    wait_p50: float
    wait_p95: float
    makespan: float
    wall: float

    @property
    def efficiency(self) -> float:
        """Lower bound / billed in the dominant dimension (1.0 is perfect packing, no idling)."""
        shares = [
            lb / got
            for lb, got in (
                (self.lb_cpu_seconds, self.cpu_seconds),
                (self.lb_mem_seconds, self.mem_seconds),
            )
            if got > 0
        ]
        return max(shares, default=0.0)

    def as_json(self) -> dict[str, float | int]:
        return {
            "tasks": self.tasks,
            "allocs_started": self.allocs,
            "alloc_cpu_seconds": round(self.cpu_seconds, 1),
            "alloc_mem_gib_seconds": round(self.mem_seconds, 1),
            "lower_bound_cpu_seconds": round(self.lb_cpu_seconds, 1),
            "lower_bound_mem_gib_seconds": round(self.lb_mem_seconds, 1),
            "efficiency": round(self.efficiency, 4),
            "queue_wait_p50": round(self.wait_p50, 2),
            "queue_wait_p95": round(self.wait_p95, 2),
            "makespan": round(self.makespan, 1),
            "wall_seconds": round(self.wall, 2),
        }


# -- traces --------------------------------------------------------------------------------


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the row and column."""


def _number(row: dict[str, str], column: str, where: str, *, positive: bool) -> float:
    try:
        value = float(row[column])
    except (TypeError, ValueError):
        raise TraceError(f"{where}.{column}): {row[column]!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise TraceError(f"{where}.{column}): {value!r} must be finite and {bound}")
    return value


def load_csv(path: Path) -> list[TraceTask]:
    """Read `arrival,duration,cpu,mem` rows (a header line is required)."""
    out: list[TraceTask] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"arrival", "duration", "cpu", "mem"} - set(reader.fieldnames or [])
        if missing:
            raise TraceError(
                f"{path}: the header must name arrival,duration,cpu,mem; missing {sorted(missing)}"
            )
        for n, row in enumerate(reader):
            where = f"{path}: row {n + 2} ($[{n}]"

            try:
                mem = parse_bytes(row["mem"], field="mem")
            except ValueError as exc:
                raise TraceError(f"{where}.mem): {exc}") from None
            out.append(
                TraceTask(
                    arrival=_number(row, "arrival", where, positive=False),
                    duration=_number(row, "duration", where, positive=True),
                    cpu=_number(row, "cpu", where, positive=False),
                    mem=int(mem),
                )
            )
    if not out:
        raise TraceError(f"{path}: no rows")
    out.sort(key=lambda t: t.arrival)
    return out


# Task shapes of the synthetic trace: (weight, cores, memory). Mixed on purpose: cpu-heavy and
# memory-heavy tasks pack well together only if the packer looks at both dimensions.
_MIX = (
    (0.35, 1.0, 2 * GiB),
    (0.20, 4.0, 2 * GiB),
    (0.20, 0.5, 12 * GiB),
    (0.15, 2.0, 8 * GiB),
    (0.10, 0.25, 512 * 2**20),
)


def synthetic(
    n: int, *, seed: int = 1, rate: float = 1.0, median: float = 300.0
) -> list[TraceTask]:
    """Poisson arrivals (`rate` per second), lognormal durations (sigma 1), the `_MIX` shapes."""
    rng = random.Random(seed)
    weights = [w for w, _, _ in _MIX]
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        _, cpu, mem = rng.choices(_MIX, weights)[0]
        duration = max(1.0, rng.lognormvariate(math.log(median), 1.0))
        out.append(TraceTask(arrival=round(t, 3), duration=round(duration, 1), cpu=cpu, mem=mem))
    return out


def alibaba(target: int, *, seed: int = 1) -> list[TraceTask] | str:
    """The Alibaba 2018 batch sample shipped in `spar`, sampled to about `target` instances.

    The sample holds about 3.06 M instances over one hour; each is kept with probability
    target / total (seeded), with its task's arrival, duration, cpu and memory. `plan_cpu` is
    in hundredths of a core; `plan_mem` is a percentage of a machine, taken here as 384 GiB.
    Returns a reason string when the package or its data is absent.
    """
    try:
        from importlib.resources import files

        data = files("spar").joinpath("data/samples/sample_tasks.csv")
        text = data.read_text()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as exc:
        return f"skipped: spar's Alibaba sample not available ({exc.__class__.__name__}: {exc})"
    rows = [line.split(",") for line in text.splitlines() if line]
    total = sum(int(r[6]) for r in rows)
    p = min(1.0, target / total)
    rng = random.Random(seed)
    out = []
    for r in rows:
        arrival, duration, cpu, mem, count = (
            float(r[0]),
            float(r[3]),
            float(r[4]),
            float(r[5]),
            int(r[6]),
        )
        # binomial(count, p) without numpy: exact for small counts, normal approximation above.
        if count <= 64:
            kept = sum(rng.random() < p for _ in range(count))
        else:
            mean = count * p
            kept = max(0, round(rng.gauss(mean, math.sqrt(mean * (1 - p)))))
        task = TraceTask(
            arrival=arrival,
            duration=max(1.0, duration),
            cpu=cpu / 100,
            mem=int(mem / 100 * 384 * GiB),
        )
        out.extend([task] * kept)
    out.sort(key=lambda t: t.arrival)
    return out


# -- the replay ----------------------------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, instead of sleeping until the next timer, moves its loop's clock to it."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        scheduled: list[asyncio.TimerHandle] = getattr(self._loop, "_scheduled", [])
        if timeout is not None and scheduled:
            # asyncio has already dropped cancelled timers from the head of the heap, so the
            # head is the next thing that will happen: jump exactly there (no rounding, so a
            # deadline a hair away can never leave the loop spinning).
            self._loop.now = max(self._loop.now, scheduled[0].when())
            return ready
        # Nothing scheduled: only I/O or another thread can wake the loop, so really wait.
        return super().select(timeout)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock jumps to the next timer whenever it would sleep.

    Everything in packsched reads time from the loop (`Clock`), so hours of a trace replay as
    fast as the scheduler can process its events. Work in threads does not advance the clock;
    the replay uses the memory store and simulated allocs, so none runs in threads.
    """

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def replay(trace: Sequence[TraceTask], policy: PackingPolicy | None, setup: Setup) -> Outcome:
    """Run the whole trace through a fresh Scheduler and SimCluster; return the bill."""
    result: list[Outcome] = []

    async def run() -> None:
        clock = Clock()
        cluster = SimCluster(list(setup.shapes), startup_delay=setup.startup_delay, clock=clock)
        config = SchedulerConfig(
            max_alloc_idle_time=setup.idle,
            max_pending_allocs=setup.max_pending_allocs,
        )
        wall = time.perf_counter()
        ids: list[str] = []
        async with Scheduler(cluster, config=config, clock=clock, policy=policy) as sched:
            start = clock.monotonic()
            i = 0
            while i < len(trace):
                j = i
                while j < len(trace) and trace[j].arrival == trace[i].arrival:
                    j += 1
                await clock.sleep_until(start + trace[i].arrival)
                specs = [
                    TaskSpec(
                        command=["true"],
                        resources=Resources(cpu=t.cpu, mem=t.mem),
                        expected_duration=t.duration,
                    )
                    for t in trace[i:j]
                ]
                ids.extend(t.id for t in await sched.submit(*specs))
                i = j
            done = await sched.wait_many(ids)
            makespan = clock.monotonic() - start
            # Let every idle alloc (and every request still in flight) reach its idle timeout,
            # so that the bill includes the tail a user would pay for.
            while cluster.live() or sched.stats(include_tasks=False).pending_alloc_requests:
                await clock.sleep(setup.idle + setup.startup_delay + 1)
            usage = cluster.usage()
        waits = [t.started_at - t.submitted_at for t in done if t.started_at is not None]
        result.append(
            Outcome(
                tasks=len(done),
                allocs=usage.allocs_started,
                cpu_seconds=usage.cpu_seconds,
                mem_seconds=usage.mem_byte_seconds / GiB,
                lb_cpu_seconds=sum(t.duration * t.cpu for t in trace),
                lb_mem_seconds=sum(t.duration * t.mem for t in trace) / GiB,
                wait_p50=statistics.median(waits) if waits else 0.0,
                wait_p95=_pct(waits, 0.95),
                makespan=makespan,
                wall=time.perf_counter() - wall,
            )
        )

    anyio.run(run, backend="asyncio", backend_options={"loop_factory": VirtualTimeLoop})
    return result[0]


# -- the command ---------------------------------------------------------------------------


class _Hybrid:
    """One policy's `place` with another's `plan`: tells which half a cost difference comes from."""

    def __init__(self, placer: PackingPolicy, planner: PackingPolicy) -> None:
        self.place = placer.place
        self.plan = planner.plan


class _Unaware:
    """packsched's policy with `place` not told the shapes on offer nor the alloc overhead
    (as before the Scheduler passed them): what a long task's own alloc would cost is then the
    smallest live alloc that holds it, for its duration alone."""

    plan = staticmethod(packing.plan)

    def place(
        self,
        demands: Sequence[packing.Demand],
        rooms: Sequence[packing.Room],
        *,
        can_grow: bool = True,
        **ignored: object,  # the shapes on offer and the alloc overhead
    ) -> packing.Placement:
        return packing.place(demands, rooms, can_grow=can_grow)


_SHAPES = tuple(
    AllocShape(resources=Resources(cpu=c, mem=4 * c * GiB, disk=100 * GiB), name=f"{c}cpu")
    for c in (4, 8, 16)
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small traces (smoke test)")
    parser.add_argument("--trace", type=Path, help="replay this CSV (arrival,duration,cpu,mem)")
    parser.add_argument("--tasks", type=int, help="tasks per built-in trace")
    parser.add_argument("--startup-delay", type=float, default=30.0)
    parser.add_argument("--idle", type=float, default=60.0, help="max_alloc_idle_time")
    parser.add_argument("--max-pending", type=int, default=5, help="max_pending_allocs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also run each policy's place() with the other's plan(), and packsched with "
        "place() not told the shapes on offer and the alloc overhead",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")
    args = parser.parse_args(argv)
    configure_logging("error", "console")

    setup = Setup(
        shapes=_SHAPES,
        startup_delay=args.startup_delay,
        idle=args.idle,
        max_pending_allocs=args.max_pending,
    )
    traces: list[tuple[str, Callable[[], list[TraceTask] | str]]] = []
    if args.trace is not None:
        path: Path = args.trace
        traces.append((path.name, lambda: load_csv(path)))
    else:
        n = args.tasks or (150 if args.quick else 6000)
        traces.append(
            (f"synthetic ({n} tasks)", lambda: synthetic(n, seed=args.seed, rate=n / 7200))
        )
        m = args.tasks or (150 if args.quick else 20000)
        traces.append((f"alibaba-2018 (~{m} instances)", lambda: alibaba(m, seed=args.seed)))

    headers = [
        "trace",
        "policy",
        "tasks",
        "allocs",
        "alloc cpu-h",
        "lower bound cpu-h",
        "efficiency",
        "cost vs baseline",
        "wait p50 s",
        "wait p95 s",
        "wall s",
    ]
    rows: list[list[object]] = []
    report: dict[str, object] = {"machine": machine(), "setup": setup.describe(), "traces": {}}
    skipped: list[str] = []
    for name, build in traces:
        try:
            trace = build()
        except TraceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(trace, str):
            skipped.append(f"{name}: {trace}")
            rows.append([name, trace, "", "", "", "", "", "", "", "", ""])
            continue
        ours = replay(trace, None, setup)
        base = replay(trace, ReferencePolicy(), setup)
        runs = [("packsched", ours), ("reference design", base)]
        if args.ablation:
            ref = ReferencePolicy()
            runs.append(
                ("packsched place + reference plan", replay(trace, _Hybrid(packing, ref), setup))
            )
            runs.append(
                ("reference place + packsched plan", replay(trace, _Hybrid(ref, packing), setup))
            )
            runs.append(("packsched, place not told the shapes", replay(trace, _Unaware(), setup)))
        for label, o in runs:
            rows.append(
                [
                    name,
                    label,
                    o.tasks,
                    o.allocs,
                    f"{o.cpu_seconds / 3600:.1f}",
                    f"{o.lb_cpu_seconds / 3600:.1f}",
                    f"{o.efficiency:.3f}",
                    ratio(o.cpu_seconds, base.cpu_seconds),
                    f"{o.wait_p50:.1f}",
                    f"{o.wait_p95:.1f}",
                    f"{o.wall:.1f}",
                ]
            )
        saving = 1 - ours.cpu_seconds / base.cpu_seconds if base.cpu_seconds else 0.0
        traces_report = report["traces"]
        assert isinstance(traces_report, dict)
        traces_report[name] = {
            "packsched": ours.as_json(),
            "reference": base.as_json(),
            "saving_vs_reference": round(saving, 4),
        }

    title = "Online cost: trace replay in virtual time"
    print(title)
    print(f"Setup: {setup.describe()}.")
    print(text_table(headers, rows))
    print(json.dumps(report))
    if not args.no_write:
        notes = (
            f"Setup: {setup.describe()}. Both policies run in the same real Scheduler and "
            "SimCluster; only the packing policy differs. `alloc cpu-h` is what the cluster "
            "billed from grant to free (memory-hours are proportional: every shape has 4 GiB "
            "per core); `efficiency` is the lower bound (Σ task duration x resources) over the "
            "billed amount in the dominant dimension; `cost vs baseline` is billed / the "
            "reference design's billed; waits are submit to start."
        )
        write_markdown(
            "trace",
            title,
            [("", notes), ("Results", markdown_table(headers, rows))]
            + ([("Skipped", "\n".join(f"- {s}" for s in skipped))] if skipped else []),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
