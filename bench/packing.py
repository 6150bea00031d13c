"""How many allocs does the offline packer need, against the lower bound and other packers?

Run alone: `.venv/bin/python bench/packing.py` prints the main table, one row per family
(generated with fixed seeds, and the Alibaba 2018 batch demand that the PyPI package `spar`
ships), then smaller ones (small instances against the exact optimum from OR-Tools CP-SAT, the
price of a shape mix, alloc-hours with expected durations, extra requests after an event, one
`place()` pass at 100k demands), and writes them as markdown to `bench/results/packing.md`
(`--no-write`: print only; `--quick`: small sizes and a 1 s CP-SAT limit, for the smoke test).
With `--instances FILE.json` (`{"capacity": {...}, "demands": [{...}, ...]}`, resources as in
`Resources`) it prints one JSON line with the allocs each packer used instead, CP-SAT's
included (null when it found no packing or is not installed).

A packer is a `Packer`: a name, a reason it is unavailable (None when it is), and a function
from one capacity and a list of demands to the number of allocs used. Packers that need an
optional package (`pip install packsched[bench]`) print "skipped" when it is absent.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from numbers import Real
from pathlib import Path
from typing import cast

import msgspec
from _common import markdown_table, ratio, text_table, timed, write_markdown

from packsched.packing import (
    Bin,
    Demand,
    PendingRequest,
    Plan,
    Room,
    first_fit_decreasing,
    lower_bound,
    pack,
    place,
    plan,
)
from packsched.resources import AllocShape, GiB, Requirements, Resources

REPEATS = 3
# Stop repeating a measurement after this many seconds, to keep the whole run under 90 s.
MAX_SECONDS = 0.6
# CP-SAT's time limit per small instance, and its threads (the machine has two cores).
CPSAT_SECONDS = 10.0
CPSAT_WORKERS = 2
# The model has a boolean per (demand, alloc) pair; past this many, building it alone would take
# minutes and gigabytes, so `--instances` skips CP-SAT on such files.
CPSAT_MAX_PAIRS = 2_000_000


@dataclass(frozen=True)
class Instance:
    """One packing problem: identical allocs of `capacity`, and the demands to put in them."""

    family: str
    capacity: Resources
    demands: list[Demand]


@dataclass(frozen=True)
class Packer:
    """A packer under test: `run(capacity, demands)` returns how many allocs it used."""

    name: str
    run: Callable[[Resources, list[Demand]], int]
    unavailable: Callable[[], str | None] = lambda: None


def _packsched(capacity: Resources, demands: list[Demand]) -> int:
    return len(pack(demands, [AllocShape(resources=capacity)]))


def _ffd(capacity: Resources, demands: list[Demand]) -> int:
    return len(first_fit_decreasing(demands, capacity))


def _missing(module: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{module} is not installed (pip install packsched[bench])"
        return None

    return check


def _ray_nodes(shapes: list[AllocShape], demands: list[Demand]) -> dict[int, int]:
    """Ray's autoscaler packer (`get_nodes_for` with its default utilization scorer): how many
    nodes of each shape it adds for the demands.

    This is the pure function the Ray autoscaler calls to choose nodes for pending demands;
    no Ray cluster is started.
    """
    # Ray is optional (the `bench` extra): without it, mypy must not fail on these imports.
    from ray.autoscaler._private.node_provider_availability_tracker import (  # type: ignore[import-not-found, unused-ignore]
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (  # type: ignore[import-not-found, unused-ignore]
        _default_utilization_scorer,
        get_nodes_for,
    )

    def as_ray(r: Resources) -> dict[str, float]:
        out = {"CPU": r.cpu, "memory": r.mem, "GPU": r.gpu, "disk": r.disk, **r.extra}
        return {k: float(v) for k, v in out.items() if v}

    node_types = {
        str(j): {"resources": as_ray(s.resources), "max_workers": 10**9}
        for j, s in enumerate(shapes)
    }
    summary = NodeAvailabilitySummary(node_availabilities={})
    added, left = get_nodes_for(
        node_types,
        {},
        "head",
        10**9,
        cast(list[dict[str, Real]], [as_ray(d.resources) for d in demands]),
        functools.partial(_default_utilization_scorer, node_availability_summary=summary),
    )
    assert not left, "Ray left demands unpacked"
    return {int(j): n for j, n in added.items()}


def _ray(capacity: Resources, demands: list[Demand]) -> int:
    return sum(_ray_nodes([AllocShape(resources=capacity)], demands).values())


PACKERS: list[Packer] = [
    Packer("packsched", _packsched),
    Packer("ffd", _ffd),
    Packer("ray", _ray, _missing("ray")),
]


# -- the families -------------------------------------------------------------------------------


def _demand(i: int, cpu: float, mem: float, gpu: int = 0) -> Demand:
    return Demand(id=f"d{i:05}", resources=Resources(cpu=round(cpu, 2), mem=int(mem), gpu=gpu))


def uniform(rng: random.Random, n: int = 1000) -> Instance:
    """cpu and mem drawn independently, each up to ~3/8 of an alloc."""
    cap = Resources(cpu=32, mem=128 * GiB)
    ds = [_demand(i, rng.uniform(0.5, 12), rng.uniform(1, 48) * GiB) for i in range(n)]
    return Instance("uniform random", cap, ds)


def anti_correlated(rng: random.Random, n: int = 1000) -> Instance:
    """cpu-heavy tasks have little memory and the other way round: pairs fill an alloc."""
    cap = Resources(cpu=32, mem=128 * GiB)
    ds = []
    for i in range(n):
        u = rng.uniform(0.05, 0.55)
        m = max(0.02, 0.6 - u + rng.uniform(-0.05, 0.05))
        ds.append(_demand(i, u * 32, m * 128 * GiB))
    return Instance("anti-correlated cpu/mem", cap, ds)


def many_small(rng: random.Random, n: int = 5000) -> Instance:
    """Thousands of small tasks into large allocs."""
    cap = Resources(cpu=96, mem=384 * GiB)
    ds = [_demand(i, rng.uniform(0.25, 2), rng.uniform(0.25, 8) * GiB) for i in range(n)]
    return Instance("many small into large", cap, ds)


def mixed_gpu(rng: random.Random, n: int = 1000) -> Instance:
    """A quarter of the tasks need 1-4 GPUs; GPU allocs also carry the cpu-only ones."""
    cap = Resources(cpu=64, mem=512 * GiB, gpu=8)
    ds = []
    for i in range(n):
        if rng.random() < 0.25:
            ds.append(_demand(i, rng.uniform(4, 16), rng.uniform(16, 128) * GiB, rng.randint(1, 4)))
        else:
            ds.append(_demand(i, rng.uniform(1, 16), rng.uniform(2, 64) * GiB))
    return Instance("mixed with GPUs", cap, ds)


def triplets(rng: random.Random, bins: int = 100) -> Instance:
    """Falkenauer-style triplets: three items fill each alloc exactly, so the optimum is n/3."""
    cap = Resources(cpu=1000)
    sizes: list[int] = []
    for _ in range(bins):
        a = rng.randint(380, 490)
        b = rng.randint(250, 1000 - a - 250)
        sizes += [a, b, 1000 - a - b]
    rng.shuffle(sizes)
    ds = [_demand(i, s, 0) for i, s in enumerate(sizes)]
    return Instance("triplets (optimum n/3)", cap, ds)


# The Alibaba 2018 batch sample: an alloc of 4 cores with a machine's memory per core (the
# trace's machines have 96 cores; its memory is a percentage of a machine, taken as 384 GiB).
ALIBABA_MACHINE = Resources(cpu=96, mem=384 * GiB)
ALIBABA_ALLOC = Resources(cpu=4, mem=16 * GiB)


@functools.cache
def _alibaba_tasks() -> tuple[list[tuple[float, int]], list[int], int] | str:
    """spar's sample of Alibaba 2018 batch tasks: each task's (cpu, mem) per instance and its
    instance count, for the tasks whose instances fit ALIBABA_ALLOC; and how many instances
    did not fit. A reason string when spar or its data is absent."""
    try:
        text = files("spar").joinpath("data/samples/sample_tasks.csv").read_text()
    except ModuleNotFoundError:
        return "spar is not installed (pip install packsched[bench])"
    except OSError as exc:
        return f"spar's Alibaba sample is not readable ({exc.__class__.__name__}: {exc})"
    # Columns: arrival, job, task, duration, plan_cpu (hundredths of a core), plan_mem (percent
    # of a machine's memory), instance count.
    shapes: list[tuple[float, int]] = []
    counts: list[int] = []
    dropped = 0
    for line in text.splitlines():
        cols = line.split(",")
        if len(cols) != 7:
            continue
        cpu = float(cols[4]) / 100
        mem = int(float(cols[5]) / 100 * ALIBABA_MACHINE.mem)
        count = int(cols[6])
        if cpu <= 0 or count <= 0:
            continue
        if not Resources(cpu=cpu, mem=mem).fits_in(ALIBABA_ALLOC):
            dropped += count
            continue
        shapes.append((cpu, mem))
        counts.append(count)
    if not shapes:
        return "spar's Alibaba sample holds no task that fits a 4-core alloc"
    return shapes, counts, dropped


def alibaba(rng: random.Random, n: int = 1000) -> Instance | str:
    """n task instances drawn from the Alibaba 2018 batch sample (weighted by each task's
    instance count), into allocs of 4 cores and 16 GiB; a reason string when spar is absent."""
    tasks = _alibaba_tasks()
    if isinstance(tasks, str):
        return tasks
    shapes, counts, _ = tasks
    picked = rng.choices(shapes, weights=counts, k=n)
    ds = [_demand(i, cpu, mem) for i, (cpu, mem) in enumerate(picked)]
    return Instance("alibaba 2018 (4-cpu allocs)", ALIBABA_ALLOC, ds)


@dataclass(frozen=True)
class Family:
    """A generator of instances and its sizes: `size` in the main table, `small` where CP-SAT
    is run (triplets count bins, the others demands)."""

    make: Callable[[random.Random, int], Instance | str]
    name: str
    size: int
    small: int


FAMILIES: list[Family] = [
    Family(uniform, "uniform random", 1000, 120),
    Family(anti_correlated, "anti-correlated cpu/mem", 1000, 60),
    Family(many_small, "many small into large", 5000, 120),
    Family(mixed_gpu, "mixed with GPUs", 1000, 120),
    Family(triplets, "triplets (optimum n/3)", 100, 20),
    Family(alibaba, "alibaba 2018 (4-cpu allocs)", 1000, 120),
]


# -- the exact optimum (CP-SAT) -------------------------------------------------------------------


@dataclass(frozen=True)
class Optimum:
    """What CP-SAT found: its status name, the fewest allocs it packed the demands into (None
    when it found no packing), the lower bound it proved, and its wall time in seconds."""

    status: str
    allocs: int | None
    bound: int
    seconds: float


def _integer_vectors(
    capacity: Resources, demands: list[Demand]
) -> tuple[list[int], list[list[int]]]:
    """Capacity and demands as integer vectors over the dimensions the demands use.

    cpu and extra amounts are counted in millionths (the generated demands have two decimals,
    so this is exact); each dimension is then divided by the gcd of its values, which keeps
    the coefficients small (bytes of memory) without changing what fits.
    """
    names = sorted({k for d in demands for k in d.resources.extra} | set(capacity.extra))

    def vec(r: Resources) -> list[int]:
        return [round(r.cpu * 10**6), r.mem, r.disk, r.gpu] + [
            round(r.extra.get(k, 0.0) * 10**6) for k in names
        ]

    cap = vec(capacity)
    ws = [vec(d.resources) for d in demands]
    used = [k for k in range(len(cap)) if any(w[k] for w in ws)]
    out_cap: list[int] = []
    out_ws: list[list[int]] = [[] for _ in ws]
    for k in used:
        g = math.gcd(cap[k], *(w[k] for w in ws)) or 1
        out_cap.append(cap[k] // g)
        for i, w in enumerate(ws):
            out_ws[i].append(w[k] // g)
    return out_cap, out_ws


def cpsat_optimum(
    capacity: Resources, demands: list[Demand], seconds: float, start: list[Bin]
) -> Optimum:
    """The fewest identical allocs that hold the demands, by OR-Tools CP-SAT within `seconds`.

    Vector bin packing: a boolean y_b per alloc and x_ib per (demand, alloc), every demand in
    exactly one alloc, per dimension Σ_i w_i x_ib <= capacity y_b. At most len(start) allocs
    (the packing `start`, packsched's, is an upper bound and the solver's hint) and at least
    the lower bound. Symmetry is broken the usual way: demands sorted largest first, demand i
    only in allocs 0..i, and allocs used in order (y_b >= y_b+1).
    """
    from ortools.sat.python import cp_model  # type: ignore[import-not-found, unused-ignore]

    bound = lower_bound(demands, capacity)
    if len(start) <= bound:
        # A packing as small as the lower bound is optimal: the model would only confirm it
        # (CP-SAT does, in about 0.1 s at n = 120; building it for thousands of demands is slow).
        return Optimum(status="OPTIMAL (lower bound)", allocs=len(start), bound=bound, seconds=0.0)
    cap, ws = _integer_vectors(capacity, demands)
    # Largest first by the fullest dimension, so the first demands fix the first allocs.
    order = sorted(
        range(len(ws)), key=lambda i: -max(w / c for w, c in zip(ws[i], cap, strict=True))
    )
    rank = {demands[i].id: r for r, i in enumerate(order)}
    ws = [ws[i] for i in order]
    n, most = len(ws), len(start)
    model = cp_model.CpModel()
    y = [model.new_bool_var(f"y{b}") for b in range(most)]
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    for i in range(n):
        for b in range(min(i, most - 1) + 1):
            x[i, b] = model.new_bool_var(f"x{i}_{b}")
        model.add_exactly_one(x[i, b] for b in range(min(i, most - 1) + 1))
    for b in range(most):
        for k, c in enumerate(cap):
            model.add(sum(ws[i][k] * x[i, b] for i in range(b, n) if ws[i][k]) <= c * y[b])
        if b + 1 < most:
            model.add(y[b] >= y[b + 1])
        if b < bound:
            model.add(y[b] == 1)
    model.minimize(sum(y))
    # The hint: packsched's allocs, numbered by their largest demand so that it obeys the
    # symmetry breaking (each alloc's first demand is at a rank >= the alloc's number).
    groups = sorted((sorted(rank[d] for d in b.demand_ids) for b in start), key=lambda g: g[0])
    home = {i: b for b, g in enumerate(groups) for i in g}
    for (i, b), var in x.items():
        model.add_hint(var, home[i] == b)
    for b, var in enumerate(y):
        model.add_hint(var, b < len(groups))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = CPSAT_WORKERS
    began = time.perf_counter()
    status = solver.solve(model)
    took = time.perf_counter() - began
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    return Optimum(
        status=solver.status_name(status),
        allocs=round(solver.objective_value) if found else None,
        bound=max(bound, math.ceil(solver.best_objective_bound - 1e-6)) if found else bound,
        seconds=took,
    )


def within(ours: int, optimum: Optimum, slack: float = 0.05) -> str:
    """Whether `ours` is within `slack` of the optimum: "yes" when proven against CP-SAT's
    lower bound, "no" when proven against its best packing, else "unknown"."""
    if ours <= (1 + slack) * optimum.bound:
        return "yes"
    if optimum.allocs is not None and ours > (1 + slack) * optimum.allocs:
        return "no"
    return "unknown"


# -- shape menus ---------------------------------------------------------------------------------

# An AWS-like menu: general purpose (4 GiB per core) in three sizes, compute optimised (2 GiB
# per core) and memory optimised (8 GiB per core), priced per hour roughly as the clouds do.
MENU = [
    AllocShape(resources=Resources(cpu=4, mem=16 * GiB), price=0.19, name="general-4"),
    AllocShape(resources=Resources(cpu=16, mem=64 * GiB), price=0.77, name="general-16"),
    AllocShape(resources=Resources(cpu=64, mem=256 * GiB), price=3.07, name="general-64"),
    AllocShape(resources=Resources(cpu=32, mem=64 * GiB), price=1.36, name="compute-32"),
    AllocShape(resources=Resources(cpu=32, mem=256 * GiB), price=2.02, name="memory-32"),
]


def menu_instances(rng: random.Random, n: int = 400) -> list[tuple[str, list[Demand]]]:
    """Workloads whose cheapest mix differs: balanced, cpu-heavy, memory-heavy, and mixed."""

    def make(cpu: tuple[float, float], gib_per_cpu: tuple[float, float]) -> list[Demand]:
        out = []
        for i in range(n):
            c = rng.uniform(*cpu)
            out.append(_demand(i, c, c * rng.uniform(*gib_per_cpu) * GiB))
        return out

    mixed = make((0.5, 8), (1, 2))[: n // 2] + make((0.5, 8), (6, 8))[: n - n // 2]
    mixed = [Demand(id=f"d{i:05}", resources=d.resources) for i, d in enumerate(mixed)]
    return [
        ("balanced (4 GiB/cpu)", make((0.5, 12), (3, 4))),
        ("cpu-heavy (1-2 GiB/cpu)", make((0.5, 12), (1, 2))),
        ("memory-heavy (6-8 GiB/cpu)", make((0.5, 12), (6, 8))),
        ("half cpu-, half memory-heavy", mixed),
    ]


def menu_table(seed: int, n: int = 400) -> tuple[list[str], list[list[object]]]:
    """Total price per hour of the allocs each planner asks for, over the same menu."""
    largest = max(MENU, key=lambda s: s.price or 0.0)
    headers = ["workload", "n", "packsched $/h", "mix used", "largest only $/h", "ratio"]
    ray_ok = _missing("ray")() is None
    headers += ["ray $/h", "ratio"]
    rows: list[list[object]] = []
    rng = random.Random(seed)
    for name, demands in menu_instances(rng, n):
        bins = pack(demands, MENU)
        ours = sum(b.shape.price or 0.0 for b in bins)
        mix: dict[str, int] = {}
        for b in bins:
            mix[b.shape.name] = mix.get(b.shape.name, 0) + 1
        single = len(pack(demands, [largest])) * (largest.price or 0.0)
        row: list[object] = [
            name,
            len(demands),
            f"{ours:.2f}",
            " ".join(f"{v}x{k}" for k, v in sorted(mix.items())),
            f"{single:.2f}",
            ratio(single, ours),
        ]
        if ray_ok:
            nodes = _ray_nodes(MENU, demands)
            theirs = sum(MENU[j].price or 0.0 for j, c in nodes.items() for _ in range(c))
            row += [f"{theirs:.2f}", ratio(theirs, ours)]
        else:
            row += ["skipped", "-"]
        rows.append(row)
    print("  menus: done", file=sys.stderr)
    return headers, rows


# -- place() at scale ---------------------------------------------------------------------------


def place_scenario(
    kind: str, rng: random.Random, n: int = 100_000, m: int = 1000
) -> tuple[list[Demand], list[Room]]:
    """n waiting demands over m live allocs of three sizes (one with GPUs).

    `busy`: every alloc has at most ~15% of its cpu free (the steady state: most demands fit
    nowhere); `empty`: every alloc is free (a cold start fills them); `distinct`: busy allocs,
    and every demand has its own resource vector, so nothing can be remembered per kind.
    """
    sizes = [
        Resources(cpu=64, mem=256 * GiB, disk=500 * GiB),
        Resources(cpu=32, mem=128 * GiB, disk=200 * GiB),
        Resources(cpu=16, mem=128 * GiB, disk=100 * GiB, gpu=2),
    ]
    rooms = []
    for i in range(m):
        cap = sizes[i % len(sizes)]
        free = cap
        if kind != "empty":
            free = Resources(
                cpu=round(cap.cpu * rng.uniform(0, 0.15), 1),
                mem=int(cap.mem * rng.uniform(0, 0.2)),
                disk=cap.disk // 2,
            )
        rooms.append(Room(id=f"a{i:04}", capacity=cap, free=free))
    kinds = [
        Resources(cpu=c, mem=int(g * GiB), disk=GiB)
        for c, g in [(1, 2), (2, 8), (4, 4), (0.5, 1), (8, 32), (1, 16)]
    ]
    demands = []
    for i in range(n):
        if kind == "distinct":
            r = Resources(
                cpu=round(rng.uniform(0.1, 8), 2), mem=int(rng.uniform(0.1, 32) * GiB), disk=GiB
            )
        else:
            r = kinds[rng.randrange(len(kinds))]
        demands.append(Demand(id=f"t{i:06}", resources=r, priority=rng.randint(0, 2), order=i))
    return demands, rooms


def place_table(seed: int, n: int = 100_000, m: int = 1000) -> tuple[list[str], list[list[object]]]:
    """Time one place() pass per scenario, with the cluster able to grow and not."""
    headers = ["scenario", "demands", "allocs", "placed", "ms", "placed (no grow)", "ms (no grow)"]
    rows: list[list[object]] = []
    for k, kind in enumerate(["busy", "empty", "distinct"]):
        demands, rooms = place_scenario(kind, random.Random(seed + k), n, m)
        row: list[object] = [kind, len(demands), len(rooms)]
        for can_grow in (True, False):
            p, seconds = timed(
                functools.partial(place, demands, rooms, can_grow=can_grow),
                REPEATS,
                max_seconds=MAX_SECONDS,
            )
            row += [len(p.assignments), f"{seconds * 1000:.0f}"]
        rows.append(row)
        print(f"  place {kind}: done", file=sys.stderr)
    return headers, rows


# -- durations ---------------------------------------------------------------------------------


def duration_table(seed: int, n: int = 600) -> tuple[list[str], list[list[object]]]:
    """Alloc-hours of the bins when every task starts at once and an alloc is given back when
    its last task ends: packsched against the same packer with the durations hidden."""
    cap = Resources(cpu=32, mem=128 * GiB)
    headers = ["durations", "n", "allocs", "alloc-hours", "blind allocs", "blind alloc-hours"]
    headers.append("blind/packsched")
    draws: list[tuple[str, Callable[[random.Random], float]]] = [
        ("60 s, 10 min or 1 h (+-20%)", lambda r: r.choice([60, 600, 3600]) * r.uniform(0.8, 1.2)),
        ("log-normal (median 7 min)", lambda r: r.lognormvariate(6, 1.5)),
    ]
    rows: list[list[object]] = []
    for name, draw in draws:
        rng = random.Random(seed)
        ds = [
            Demand(
                id=f"d{i:04}",
                resources=Resources(
                    cpu=round(rng.uniform(0.5, 12), 1), mem=int(rng.uniform(1, 48) * GiB)
                ),
                expected_duration=draw(rng),
            )
            for i in range(n)
        ]
        blind = [Demand(id=d.id, resources=d.resources) for d in ds]
        lasts = {d.id: d.expected_duration or 0.0 for d in ds}
        out: list[tuple[int, float]] = []
        for demands in (ds, blind):
            bins = pack(demands, [AllocShape(resources=cap)])
            hours = sum(max(lasts[i] for i in b.demand_ids) for b in bins) / 3600
            out.append((len(bins), hours))
        rows.append(
            [
                name,
                n,
                out[0][0],
                f"{out[0][1]:.1f}",
                out[1][0],
                f"{out[1][1]:.1f}",
                ratio(out[1][1], out[0][1]),
            ]
        )
    print("  durations: done", file=sys.stderr)
    return headers, rows


# -- replanning after an event -------------------------------------------------------------------

MIN_ALLOC = Resources(cpu=1, mem=GiB, disk=GiB)


def naive_plan(
    demands: list[Demand], pending: list[PendingRequest], shapes: list[AllocShape], max_new: int
) -> Plan:
    """The reference design's planner, for comparison: pending requests take demands first-fit
    in queue order, and the rest are packed into new requests (with packsched's packer)."""
    room = [p.requirements.full for p in pending]
    rest = []
    for d in sorted(demands, key=lambda d: (d.priority, d.order, d.id)):
        for j, free in enumerate(room):
            if d.resources.fits_in(free):
                room[j] = free - d.resources
                break
        else:
            rest.append(d)
    bins = pack(rest, shapes, max_bins=max_new)
    requests = [Requirements(min=b.used.max(MIN_ALLOC).min(b.shape.resources)) for b in bins]
    return Plan(requests=requests, cancel=[], covered=[])


def replan_table(seed: int, cases: int = 60) -> tuple[list[str], list[list[object]]]:
    """Extra alloc requests after one event, with the requests of the previous plan pending.

    After a demand is placed elsewhere no request is needed; after one new demand arrives, at
    most one is. Every request beyond that asks again for room already asked for.
    """
    planners: list[tuple[str, Callable[..., Plan]]] = [
        ("first-fit pending (reference design)", lambda ds, p, sh, n: naive_plan(ds, p, sh, n)),
        (
            "packsched",
            lambda ds, p, sh, n: plan(ds, p, sh, min_alloc=MIN_ALLOC, max_new=n),
        ),
    ]
    shapes = [AllocShape(resources=Resources(cpu=32, mem=128 * GiB, disk=100 * GiB, gpu=4))]
    headers = ["planner", "events", "extra requests (demand placed)", "extra requests (new demand)"]
    rows: list[list[object]] = []
    for name, planner in [*planners, ("packsched with demand_ids", planners[1][1])]:
        rng = random.Random(seed)
        extra_gone = extra_new = events = 0
        for _ in range(cases):
            n = rng.choice([10, 20, 30])
            ds = [_mixed_demand(rng, i) for i in range(n)]
            first = plan(ds, [], shapes, min_alloc=MIN_ALLOC, max_new=8)
            keep = name.endswith("demand_ids")
            pending = [
                PendingRequest(id=f"p{j}", requirements=r, demand_ids=ids if keep else ())
                for j, (r, ids) in enumerate(
                    zip(first.requests, first.request_demands, strict=True)
                )
            ]
            max_new = 8 - len(pending)
            gone = rng.choice(ds)
            extra_gone += len(
                planner([d for d in ds if d is not gone], pending, shapes, max_new).requests
            )
            more = [*ds, _mixed_demand(rng, n)]
            extra_new += max(0, len(planner(more, pending, shapes, max_new).requests) - 1)
            events += 1
        rows.append([name, events, extra_gone, extra_new])
    print("  replan: done", file=sys.stderr)
    return headers, rows


def _mixed_demand(rng: random.Random, i: int) -> Demand:
    r = Resources(
        cpu=round(rng.uniform(0.5, 12), 1),
        mem=int(rng.uniform(1, 48) * GiB),
        disk=int(rng.uniform(0, 20) * GiB),
        gpu=rng.choice([0, 0, 0, 1]),
    )
    return Demand(id=f"t{i:03}", resources=r, priority=rng.randint(0, 2), order=i)


# -- running ------------------------------------------------------------------------------------


def measure(instance: Instance) -> tuple[int, dict[str, tuple[int, float] | str]]:
    """The lower bound, and for each packer its (allocs, median seconds) or why it was skipped."""
    bound = lower_bound(instance.demands, instance.capacity)
    out: dict[str, tuple[int, float] | str] = {}
    for p in PACKERS:
        reason = p.unavailable()
        if reason is not None:
            out[p.name] = "skipped"
            continue
        out[p.name] = timed(
            functools.partial(p.run, instance.capacity, instance.demands),
            REPEATS,
            max_seconds=MAX_SECONDS,
        )
    return bound, out


def _skipped_row(headers: list[str], name: str, reason: str) -> list[object]:
    """A row for a family that could not be built: its name, the reason, dashes elsewhere."""
    return [name, "-", f"skipped: {reason}", *["-"] * (len(headers) - 3)]


def main_table(seed: int, quick: bool) -> tuple[list[str], list[list[object]]]:
    """One row per family at its full size (its small size with `quick`): allocs and times."""
    headers = ["family", "n", "lower bound"]
    for p in PACKERS:
        headers += [p.name, f"{p.name}/LB"]
    headers += ["packsched/ffd", "packsched/ray"] + [f"{p.name} ms" for p in PACKERS]
    rows: list[list[object]] = []
    for k, family in enumerate(FAMILIES):
        instance = family.make(random.Random(seed + k), family.small if quick else family.size)
        if isinstance(instance, str):
            rows.append(_skipped_row(headers, family.name, instance))
            continue
        bound, results = measure(instance)
        row: list[object] = [instance.family, len(instance.demands), bound]
        times: list[object] = []
        for p in PACKERS:
            r = results[p.name]
            if isinstance(r, str):
                row += [r, "-"]
                times.append("-")
            else:
                row += [r[0], ratio(r[0], bound)]
                times.append(f"{r[1] * 1000:.1f}")
        ours, ffd, ray = results["packsched"], results["ffd"], results["ray"]
        assert not isinstance(ours, str) and not isinstance(ffd, str)
        row.append(ratio(ours[0], ffd[0]))
        row.append("-" if isinstance(ray, str) else ratio(ours[0], ray[0]))
        rows.append(row + times)
        print(f"  {instance.family}: done", file=sys.stderr)
    return headers, rows


# Smaller instances, several seeds each, where CP-SAT usually proves the optimum: (family, size).
SWEEP = [
    ("uniform random", 40),
    ("anti-correlated cpu/mem", 30),
    ("mixed with GPUs", 40),
    ("triplets (optimum n/3)", 8),
    ("alibaba 2018 (4-cpu allocs)", 60),
]


def sweep_table(seed: int, seeds: int, seconds: float) -> tuple[list[str], list[list[object]]]:
    """Per family, `seeds` small instances: how often CP-SAT proves the optimum, and how far
    each packer is from it on those (mean and worst ratio)."""
    headers = ["family", "n", "instances", "proven", "by search", "packsched optimal", "within 5 %"]
    headers += ["packsched/opt mean", "max", "ffd/opt mean", "max", "ray/opt mean", "max"]
    headers += ["cp-sat s (median)"]
    reason = _missing("ortools")()
    by_name = {f.name: f for f in FAMILIES}
    rows: list[list[object]] = []
    for k, (name, size) in enumerate(SWEEP):
        if reason is not None:
            rows.append(_skipped_row(headers, name, reason))
            continue
        ratios: dict[str, list[float]] = {"packsched": [], "ffd": [], "ray": []}
        proven = searched = optimal = close = 0
        times: list[float] = []
        n: object = "-"
        skipped: str | None = None
        for j in range(seeds):
            instance = by_name[name].make(random.Random(seed + 200 + 10 * k + j), size)
            if isinstance(instance, str):
                skipped = instance
                break
            n = len(instance.demands)
            start = pack(instance.demands, [AllocShape(resources=instance.capacity)])
            best = cpsat_optimum(instance.capacity, instance.demands, seconds, start)
            times.append(best.seconds)
            close += within(len(start), best) == "yes"
            if not best.status.startswith("OPTIMAL") or best.allocs is None:
                continue
            proven += 1
            searched += best.status == "OPTIMAL"
            optimal += len(start) == best.allocs
            counts = {"packsched": len(start), "ffd": _ffd(instance.capacity, instance.demands)}
            if _missing("ray")() is None:
                counts["ray"] = _ray(instance.capacity, instance.demands)
            for packer, count in counts.items():
                ratios[packer].append(count / best.allocs)
        if skipped is not None:
            rows.append(_skipped_row(headers, name, skipped))
            continue
        row: list[object] = [name, n, seeds, proven, searched, optimal, close]
        for packer in ("packsched", "ffd", "ray"):
            got = ratios[packer]
            row += [f"{sum(got) / len(got):.3f}", f"{max(got):.3f}"] if got else ["-", "-"]
        rows.append([*row, f"{statistics.median(times):.2f}"])
        print(f"  cp-sat sweep {name}: done", file=sys.stderr)
    return headers, rows


def optimum_table(seed: int, seconds: float) -> tuple[list[str], list[list[object]]]:
    """Small instances of every family: each packer's allocs against CP-SAT's."""
    headers = ["family", "n", "lower bound", "packsched", "ffd", "ray", "cp-sat", "status"]
    headers += ["proven bound", "packsched/cp-sat", "within 5 %", "cp-sat s", "packsched ms"]
    reason = _missing("ortools")()
    rows: list[list[object]] = []
    for k, family in enumerate(FAMILIES):
        # Other seeds than the main table's: these are new instances, not its prefixes.
        instance = family.make(random.Random(seed + 100 + k), family.small)
        if isinstance(instance, str):
            rows.append(_skipped_row(headers, family.name, instance))
            continue
        bound, results = measure(instance)
        counts = [r if isinstance(r, str) else r[0] for r in results.values()]
        ours = results["packsched"]
        assert not isinstance(ours, str)
        row: list[object] = [instance.family, len(instance.demands), bound, *counts]
        if reason is not None:
            row += ["skipped", reason, "-", "-", "-", "-"]
        else:
            start = pack(instance.demands, [AllocShape(resources=instance.capacity)])
            best = cpsat_optimum(instance.capacity, instance.demands, seconds, start)
            row += [
                "-" if best.allocs is None else best.allocs,
                best.status,
                best.bound,
                "-" if best.allocs is None else ratio(ours[0], best.allocs),
                within(ours[0], best),
                f"{best.seconds:.1f}",
            ]
        rows.append([*row, f"{ours[1] * 1000:.1f}"])
        print(f"  cp-sat {instance.family}: done", file=sys.stderr)
    return headers, rows


def report(seed: int, *, quick: bool, write: bool, cpsat_seconds: float) -> None:
    """Measure every family and print the tables; write them to bench/results/packing.md."""
    tables: list[tuple[str, str, tuple[list[str], list[list[object]]]]] = []
    notes = (
        f"Allocs used per packer (identical allocs per family), seed {seed}; times are the "
        f"median of up to {REPEATS} runs (fewer once {MAX_SECONDS} s is spent). Ratios below 1 "
        "in packsched/ffd and packsched/ray mean fewer allocs than first-fit-decreasing and "
        "Ray. `ray` is the Ray autoscaler's `get_nodes_for` with its default utilization "
        "scorer (skipped when Ray is not installed). `alibaba 2018`: task instances drawn "
        "from the batch-task sample in the PyPI package `spar` (weighted by instance count; "
        "`plan_cpu` / 100 cores, `plan_mem` % of a 96-core, 384-GiB machine) into allocs of "
        "4 cores and 16 GiB (a machine's memory per core)"
    )
    tasks = _alibaba_tasks()
    if not isinstance(tasks, str):
        notes += (
            f"; the {tasks[2]} of {tasks[2] + sum(tasks[1])} instances that need more are left out"
        )
    tables.append(("Offline packer: allocs used", notes + ".", main_table(seed, quick)))
    optimum_notes = (
        "Small instances of the same families (other seeds), against the exact optimum: "
        "OR-Tools CP-SAT on the vector bin packing model (an alloc-used boolean per alloc, "
        "an assignment boolean per demand and alloc, capacity per dimension; demands sorted "
        "largest first and demand i only in allocs 0..i, allocs used in order), with the lower "
        "bound as a constraint and packsched's packing as the upper bound and hint, "
        f"a limit of {cpsat_seconds:g} s and {CPSAT_WORKERS} workers per instance. `OPTIMAL`: "
        "CP-SAT proved its count optimal (`OPTIMAL (lower bound)`: packsched reached the lower "
        "bound, so CP-SAT is not run); `FEASIBLE`: the time ran out, and the optimum lies "
        "between `proven bound` and `cp-sat`. `within 5 %`: packsched's allocs are at most 1.05 "
        "x the optimum (`yes`: proven against the bound; `no`: proven against CP-SAT's "
        "packing; `unknown`: neither)."
    )
    tables.append(
        (
            "Small instances: packsched against CP-SAT",
            optimum_notes,
            optimum_table(seed, cpsat_seconds),
        )
    )
    seeds, sweep_seconds = (2, min(cpsat_seconds, 1.0)) if quick else (10, min(cpsat_seconds, 2.0))
    sweep_notes = (
        f"Smaller instances, {seeds} seeds per family, the same CP-SAT model with a limit of "
        f"{sweep_seconds:g} s each. `proven`: instances whose optimum CP-SAT proved (or "
        "packsched's count equals the lower bound); `by search`: of those, the ones CP-SAT "
        "proved by its search (packsched's count above the lower bound); `packsched optimal`: "
        "of the proven, the ones where packsched used the optimum's count; `within 5 %`: instances proven within 1.05 "
        "x the optimum (at these sizes one alloc more is 3-13 %). Ratios are over the proven "
        "instances."
    )
    tables.append(
        (
            "Smaller instances, several seeds: how far from the optimum",
            sweep_notes,
            sweep_table(seed, seeds, sweep_seconds),
        )
    )
    menu_notes = (
        "Total price per hour of the allocs asked for, from a menu of five shapes "
        f"({', '.join(s.name for s in MENU)}). `largest only`: our packer restricted to the "
        "most expensive shape; `ray`: Ray's `get_nodes_for` over the same node types. Ratios "
        "above 1 mean that planner pays more than packsched."
    )
    tables.append(("Shape menus: price", menu_notes, menu_table(seed, 100 if quick else 400)))
    duration_notes = (
        "Uniform random cpu/mem demands with expected durations, all starting at once; an "
        "alloc is paid until its last task ends. `blind`: the same packer with the durations "
        "left out of the demands."
    )
    tables.append(
        (
            "Durations: tasks that end together share an alloc",
            duration_notes,
            duration_table(seed, 150 if quick else 600),
        )
    )
    replan_notes = (
        "Each case: 10-30 mixed demands (cpu, mem, disk, some GPUs; three priorities) get a "
        "plan; its requests become pending; then one event. Counted: requests beyond what "
        "the event needs (none after a demand is placed elsewhere, at most one after a new "
        "demand arrives), i.e. room asked for twice (DESIGN 5, first fault). "
        "`with demand_ids`: the caller passes `Plan.request_demands` back as "
        "`PendingRequest.demand_ids`."
    )
    tables.append(
        (
            "plan(): asking again after an event",
            replan_notes,
            replan_table(seed, 10 if quick else 60),
        )
    )
    place_notes = (
        "One `place()` pass over 100k waiting demands and 1k live allocs (target: under "
        "1000 ms); `no grow` is `can_grow=False`, where demands that fit nowhere hold allocs. "
        "`busy`: allocs mostly full; `empty`: a cold start; `distinct`: busy, and no two "
        "demands alike."
    )
    place = place_table(seed, 5000, 100) if quick else place_table(seed)
    tables.append(("place(): one pass", place_notes, place))
    for k, (_, _, (headers, rows)) in enumerate(tables):
        print(("\n" if k else "") + text_table(headers, rows))
    if write:
        path = write_markdown(
            "packing",
            "Packing",
            [(title, note + "\n\n" + markdown_table(*table)) for title, note, table in tables],
        )
        print(f"\nwritten to {path}")


class _InstanceFile(msgspec.Struct, forbid_unknown_fields=True):
    capacity: Resources
    demands: list[Resources]


def run_file(path: Path, cpsat_seconds: float) -> None:
    """Pack the instance in `path` with every packer and print one JSON line of allocs used.

    `cpsat` is CP-SAT's fewest allocs within `cpsat_seconds` (null when it found no packing or
    ortools is absent), `cpsat_status` whether it proved them optimal (or why it was skipped),
    and `cpsat_bound` the lower bound it proved.
    """
    try:
        data = msgspec.json.decode(path.read_bytes(), type=_InstanceFile)
    except (OSError, msgspec.DecodeError) as e:
        raise SystemExit(f"{path}: {e}") from None
    for i, r in enumerate(data.demands):
        if not r.fits_in(data.capacity):
            too_big = ", ".join(r.exceeding(data.capacity))
            raise SystemExit(f"{path}: $.demands[{i}] does not fit the capacity ({too_big})")
    demands = [Demand(id=f"d{i}", resources=r) for i, r in enumerate(data.demands)]
    out: dict[str, int | str | None] = {"lower_bound": lower_bound(demands, data.capacity)}
    for p in PACKERS:
        out[p.name] = "skipped" if p.unavailable() else p.run(data.capacity, demands)
    reason = _missing("ortools")()
    start = pack(demands, [AllocShape(resources=data.capacity)])
    if reason is None and len(demands) * len(start) > CPSAT_MAX_PAIRS:
        reason = f"{len(demands)} demands x {len(start)} allocs is too large for the model"
    if reason is None:
        best = cpsat_optimum(data.capacity, demands, cpsat_seconds, start)
        out |= {"cpsat": best.allocs, "cpsat_status": best.status, "cpsat_bound": best.bound}
    else:
        out |= {"cpsat": None, "cpsat_status": f"skipped: {reason}", "cpsat_bound": None}
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instances", type=Path, help="a JSON instance file to pack instead")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cpsat-seconds",
        type=float,
        default=None,
        help=f"CP-SAT's time limit per instance (default {CPSAT_SECONDS:g}, 1 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for the smoke test")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")
    args = parser.parse_args(argv)
    seconds = args.cpsat_seconds
    if seconds is None:
        seconds = 1.0 if args.quick else CPSAT_SECONDS
    if seconds <= 0:
        parser.error("--cpsat-seconds: must be positive")
    if args.instances:
        run_file(args.instances, seconds)
    else:
        report(args.seed, quick=args.quick, write=not args.no_write, cpsat_seconds=seconds)


if __name__ == "__main__":
    main()
