"""How many allocs does the offline packer need, against the lower bound and other packers?

Run alone: `.venv/bin/python bench/packing.py` prints one table, one row per generated family
(fixed seeds), and writes it as markdown to `bench/results/packing.md`. With
`--instances FILE.json` (`{"capacity": {...}, "demands": [{...}, ...]}`, resources as in
`Resources`) it prints one JSON line with the allocs each packer used instead.

A packer is a `Packer`: a name, a reason it is unavailable (None when it is), and a function
from one capacity and a list of demands to the number of allocs used. Packers that need an
optional package (`pip install packsched[bench]`) print "skipped" when it is absent.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from _common import markdown_table, ratio, text_table, timed, write_markdown

from packsched.packing import Demand, first_fit_decreasing, lower_bound, pack
from packsched.resources import AllocShape, GiB, Resources

REPEATS = 3


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


PACKERS: list[Packer] = [
    Packer("packsched", _packsched),
    Packer("ffd", _ffd),
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


FAMILIES: list[Callable[[random.Random], Instance]] = [
    uniform,
    anti_correlated,
    many_small,
    mixed_gpu,
    triplets,
]


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
        out[p.name] = timed(lambda p=p: p.run(instance.capacity, instance.demands), REPEATS)  # type: ignore[misc]
    return bound, out


def report(seed: int) -> None:
    """Measure every family and print the table; write it to bench/results/packing.md."""
    headers = ["family", "n", "lower bound"]
    for p in PACKERS:
        headers += [p.name, f"{p.name}/LB"]
    headers += ["packsched/ffd"] + [f"{p.name} ms" for p in PACKERS]
    rows: list[list[object]] = []
    for k, family in enumerate(FAMILIES):
        instance = family(random.Random(seed + k))
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
        ours, ffd = results["packsched"], results["ffd"]
        assert not isinstance(ours, str) and not isinstance(ffd, str)
        row.append(ratio(ours[0], ffd[0]))
        rows.append(row + times)
        print(f"  {instance.family}: done", file=sys.stderr)
    print(text_table(headers, rows))
    notes = (
        f"Allocs used per packer (identical allocs per family), seed {seed}; times are the "
        f"median of {REPEATS} runs. Ratios below 1 in packsched/ffd mean fewer allocs than "
        "first-fit-decreasing."
    )
    path = write_markdown(
        "packing", "Offline packing", [("", notes), ("", markdown_table(headers, rows))]
    )
    print(f"\nwritten to {path}")


class _InstanceFile(msgspec.Struct, forbid_unknown_fields=True):
    capacity: Resources
    demands: list[Resources]


def run_file(path: Path) -> None:
    """Pack the instance in `path` with every packer and print one JSON line of allocs used."""
    try:
        data = msgspec.json.decode(path.read_bytes(), type=_InstanceFile)
    except msgspec.ValidationError as e:
        raise SystemExit(f"{path}: {e}") from None
    demands = [Demand(id=f"d{i}", resources=r) for i, r in enumerate(data.demands)]
    out: dict[str, int | str] = {"lower_bound": lower_bound(demands, data.capacity)}
    for p in PACKERS:
        out[p.name] = "skipped" if p.unavailable() else p.run(data.capacity, demands)
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instances", type=Path, help="a JSON instance file to pack instead")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.instances:
        run_file(args.instances)
    else:
        report(args.seed)


if __name__ == "__main__":
    main()
