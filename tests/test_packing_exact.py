"""Tests of the bin completion repack that follows the offline packer's greedy packing."""

from __future__ import annotations

import random

import pytest

from packsched import packing
from packsched.packing import Bin, Demand, pack
from packsched.resources import AllocShape, GiB, Resources

EPS = 1e-6


def greedy(demands: list[Demand], shape: AllocShape) -> list[Bin]:
    """`pack` without the repack (no instance is small enough for it): the greedy alone."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(packing, "_REPACK_MAX_ITEMS", 0)
        return pack(demands, [shape])


def triplets(rng: random.Random, bins: int) -> list[Demand]:
    """Falkenauer-style triplets: three items fill each bin of 1000 cpu exactly."""
    sizes: list[int] = []
    for _ in range(bins):
        a = rng.randint(380, 490)
        b = rng.randint(250, 1000 - a - 250)
        sizes += [a, b, 1000 - a - b]
    rng.shuffle(sizes)
    return [Demand(id=f"t{i:02}", resources=Resources(cpu=s)) for i, s in enumerate(sizes)]


def anti_correlated(rng: random.Random, n: int) -> list[Demand]:
    """cpu-heavy demands have little memory and the other way round (bench/packing.py)."""
    out = []
    for i in range(n):
        u = rng.uniform(0.05, 0.55)
        m = max(0.02, 0.6 - u + rng.uniform(-0.05, 0.05))
        out.append(
            Demand(id=f"d{i:02}", resources=Resources(cpu=round(u * 32, 2), mem=int(m * 128 * GiB)))
        )
    return out


def check(demands: list[Demand], bins: list[Bin], capacity: Resources) -> None:
    """Every demand is in exactly one bin and no bin holds more than the capacity."""
    ids = sorted(i for b in bins for i in b.demand_ids)
    assert ids == sorted(d.id for d in demands)
    by_id = {d.id: d.resources for d in demands}
    for b in bins:
        used = Resources()
        for i in b.demand_ids:
            used = used + by_id[i]
        assert used == b.used
        assert used.fits_in(capacity + Resources(cpu=EPS))


def test_triplets_fill_every_bin() -> None:
    """24 items that pack exactly three per bin take 8 bins."""
    ds = triplets(random.Random(213), 8)
    shape = AllocShape(resources=Resources(cpu=1000))
    assert len(greedy(ds, shape)) == 9
    bins = pack(ds, [shape])
    assert len(bins) == 8
    check(ds, bins, shape.resources)


def test_anti_correlated_one_bin_fewer() -> None:
    """The repack finds 10 bins for 30 anti-correlated demands where the greedy needs 11."""
    cap = Resources(cpu=32, mem=128 * GiB)
    ds = anti_correlated(random.Random(0), 30)
    assert len(greedy(ds, AllocShape(resources=cap))) == 11
    bins = pack(ds, [AllocShape(resources=cap)])
    assert len(bins) == 10
    check(ds, bins, cap)


@pytest.mark.parametrize("seed", range(8))
def test_repack_valid_and_never_worse(seed: int) -> None:
    """On random instances, every demand is packed once within capacity, in at most the
    greedy's bins."""
    rng = random.Random(seed)
    cap = Resources(cpu=32, mem=128 * GiB, gpu=4)
    ds = [
        Demand(
            id=f"r{i:02}",
            resources=Resources(
                cpu=round(rng.uniform(1, 18), 2),
                mem=int(rng.uniform(4, 80) * GiB),
                gpu=rng.choice([0, 0, 0, 1, 2]),
            ),
            priority=rng.randint(0, 2),
        )
        for i in range(rng.randint(5, 20))
    ]
    ds += anti_correlated(rng, 12)
    bins = pack(ds, [AllocShape(resources=cap)])
    check(ds, bins, cap)
    assert len(bins) <= len(greedy(ds, AllocShape(resources=cap)))


def test_durations_keep_the_greedy_bins() -> None:
    """Demands with expected durations are packed by the greedy alone, bin for bin."""
    cap = Resources(cpu=32, mem=128 * GiB)
    # The instance the repack takes from 11 bins to 10 when durations are unknown.
    ds = [
        Demand(id=d.id, resources=d.resources, expected_duration=60.0)
        for d in anti_correlated(random.Random(0), 30)
    ]
    bins = pack(ds, [AllocShape(resources=cap)])
    assert len(bins) == 11
    assert [b.demand_ids for b in bins] == [
        b.demand_ids for b in greedy(ds, AllocShape(resources=cap))
    ]
    check(ds, bins, cap)
