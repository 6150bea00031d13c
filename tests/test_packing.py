"""Tests of the packing policy: place(), plan() and the offline packer."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packsched.packing import (
    Demand,
    PendingRequest,
    Placement,
    Room,
    first_fit_decreasing,
    lower_bound,
    pack,
    place,
    plan,
)
from packsched.resources import AllocShape, GiB, Requirements, Resources

MIN_ALLOC = Resources(cpu=1, mem=1 * GiB, disk=1 * GiB)
EPS = 1e-6


def res(cpu: float = 0, mem: float = 0, disk: float = 0, gpu: int = 0, **extra: float) -> Resources:
    """Resources with mem and disk in GiB, for short tests."""
    return Resources(cpu=cpu, mem=int(mem * GiB), disk=int(disk * GiB), gpu=gpu, extra=extra)


def room(rid: str, capacity: Resources, free: Resources | None = None, **kw: float) -> Room:
    return Room(id=rid, capacity=capacity, free=capacity if free is None else free, **kw)


def total(items: Sequence[Resources]) -> Resources:
    out = Resources()
    for r in items:
        out = out + r
    return out


def fits(a: Resources, b: Resources) -> bool:
    """a fits in b, with a tolerance for float sums."""
    return a.fits_in(b + Resources(cpu=EPS, extra=dict.fromkeys(a.extra, EPS)))


# -- strategies --------------------------------------------------------------------------------

amounts = st.sampled_from([0, 0.5, 1, 2, 3, 4, 8])


@st.composite
def resources(draw: st.DrawFn, scale: int = 1) -> Resources:
    extra = {"lic": float(draw(st.integers(0, 2)))} if draw(st.booleans()) else {}
    return Resources(
        cpu=draw(amounts) * scale,
        mem=int(draw(amounts) * scale * GiB),
        disk=int(draw(amounts) * scale * GiB),
        gpu=draw(st.sampled_from([0, 0, 0, 1, 2])) * scale,
        extra={k: v for k, v in extra.items() if v},
    )


@st.composite
def demands(draw: st.DrawFn, max_size: int = 25) -> list[Demand]:
    n = draw(st.integers(0, max_size))
    out = []
    for i in range(n):
        out.append(
            Demand(
                id=f"d{i:03}",
                resources=draw(resources()),
                priority=draw(st.integers(0, 2)),
                order=draw(st.integers(-3, 30)),
                expected_duration=draw(st.sampled_from([None, 10.0, 60.0, 600.0])),
            )
        )
    return out


@st.composite
def rooms(draw: st.DrawFn) -> list[Room]:
    n = draw(st.integers(0, 6))
    out = []
    for i in range(n):
        cap = draw(resources(scale=4))
        used = draw(resources())
        out.append(
            Room(
                id=f"r{i}",
                capacity=cap,
                free=cap - used,
                expected_free_at=draw(st.sampled_from([None, 5.0, 60.0, 700.0])),
            )
        )
    return out


shapes_menus = st.lists(
    st.builds(
        AllocShape,
        resources=resources(scale=4),
        price=st.one_of(st.none(), st.floats(0.5, 20)),
    ),
    min_size=1,
    max_size=3,
)


# -- place: properties -------------------------------------------------------------------------


def key(d: Demand) -> tuple[int, int, str]:
    """Queue order: priority, then order, then id."""
    return (d.priority, d.order, d.id)


def check_placement(
    ds: list[Demand], rs: list[Room], p: Placement, *, can_grow: bool = True
) -> None:
    """Every invariant place() promises, replayed decision by decision."""
    by_id = {d.id: d for d in ds}
    placed = [d for d, _ in p.assignments]
    assert len(set(placed)) == len(placed), "a demand placed twice"
    assert sorted(placed + [d.id for d in p.unplaced]) == sorted(by_id)
    assert p.unplaced == sorted(p.unplaced, key=key)
    assert [by_id[d] for d in placed] == sorted((by_id[d] for d in placed), key=key)
    free = {r.id: r.free for r in rs}
    # Each room's (end, empty) after each assignment to it, with the assignment's queue key.
    states: dict[str, list[tuple[tuple[int, int, str] | None, float | None, bool]]] = {
        r.id: [(None, r.expected_free_at, r.free == r.capacity)] for r in rs
    }
    for did, rid in p.assignments:
        d = by_id[did]
        assert fits(d.resources, free[rid]), f"{did} does not fit {rid}"
        # No unplaced demand ahead of this one could have used this room now, unless it
        # waits for an alloc of its own: this room would have had to live longer for it.
        for u in p.unplaced:
            if key(u) < key(d) and u.resources.fits_in(free[rid]):
                _, end, empty = [st for st in states[rid] if st[0] is None or st[0] < key(u)][-1]
                dur = u.expected_duration
                assert can_grow and dur is not None
                assert empty or (end is not None and end < dur)
        free[rid] = free[rid] - d.resources
        _, end, empty = states[rid][-1]
        if d.expected_duration is None:
            end = None
        elif empty or end is not None:
            end = d.expected_duration if empty or end is None else max(end, d.expected_duration)
        states[rid].append((key(d), end, False))
    for r in rs:
        used = total([by_id[d].resources for d, rid in p.assignments if rid == r.id])
        assert fits(used, r.free), f"room {r.id} oversubscribed"
    for rid, did in p.reserved.items():
        holder = by_id[did]
        assert holder in p.unplaced
        assert holder.resources.fits_in(next(r.capacity for r in rs if r.id == rid))
        for did, where in p.assignments:
            if where == rid:
                assert key(by_id[did]) < key(holder), "a later demand took a reserved room"


@settings(max_examples=80, deadline=None)
@given(demands(), rooms(), st.booleans())
def test_place_invariants(ds: list[Demand], rs: list[Room], can_grow: bool) -> None:
    """Placements fit, never oversubscribe, respect priority and reservations, each demand once."""
    p = place(ds, rs, can_grow=can_grow)
    check_placement(ds, rs, p, can_grow=can_grow)
    if can_grow:
        assert p.reserved == {}


@settings(max_examples=40, deadline=None)
@given(demands(), rooms(), st.booleans(), st.randoms(use_true_random=False))
def test_place_is_deterministic(
    ds: list[Demand], rs: list[Room], can_grow: bool, rnd: random.Random
) -> None:
    """The same demands and rooms, in any order, give the same placement."""
    first = place(ds, rs, can_grow=can_grow)
    ds2, rs2 = list(ds), list(rs)
    rnd.shuffle(ds2)
    rnd.shuffle(rs2)
    assert place(ds2, rs2, can_grow=can_grow) == first


@settings(max_examples=60, deadline=None)
@given(demands(), rooms())
def test_place_is_best_fit(ds: list[Demand], rs: list[Room]) -> None:
    """Without durations, each demand goes where it leaves the least normalised slack."""
    ds = [Demand(id=d.id, resources=d.resources, priority=d.priority, order=d.order) for d in ds]
    p = place(ds, rs)
    by_id = {d.id: d for d in ds}
    free = {r.id: r.free for r in rs}
    caps = {r.id: r.capacity for r in rs}

    def slack_after(rid: str, d: Resources) -> float:
        return sum(min(v, 1e18) for v in (free[rid] - d).shares(caps[rid]).values())

    for did, rid in p.assignments:
        d = by_id[did].resources
        mine = slack_after(rid, d)
        for other in free:
            if d.fits_in(free[other]):
                assert mine <= slack_after(other, d) + 1e-6
        free[rid] = free[rid] - d


@settings(max_examples=20, deadline=None)
@given(demands())
def test_place_without_rooms_places_nothing(ds: list[Demand]) -> None:
    """With no room at all, every demand is unplaced, in order."""
    p = place(ds, [])
    assert p.assignments == []
    assert p.unplaced == sorted(ds, key=key)


# -- place: examples ---------------------------------------------------------------------------


def test_no_head_of_line_blocking() -> None:
    """A demand that fits nowhere does not stop the smaller ones behind it."""
    big = Demand(id="big", resources=res(cpu=16), order=0)
    small = Demand(id="small", resources=res(cpu=1), order=1)
    p = place([big, small], [room("a", res(cpu=4, mem=4))])
    assert p.assignments == [("small", "a")]
    assert p.unplaced == [big]
    assert p.reserved == {}


def test_priority_goes_first() -> None:
    """A higher-priority demand gets the only room even if submitted later."""
    low = Demand(id="low", resources=res(cpu=3), priority=5, order=0)
    high = Demand(id="high", resources=res(cpu=3), priority=0, order=9)
    p = place([low, high], [room("a", res(cpu=4))])
    assert p.assignments == [("high", "a")]
    assert p.unplaced == [low]


def test_lost_task_with_negative_order_goes_first() -> None:
    """A rescheduled lost task (negative order) is placed before the others of its priority."""
    new = Demand(id="new", resources=res(cpu=2), order=0)
    lost = Demand(id="lost", resources=res(cpu=2), order=-1)
    p = place([new, lost], [room("a", res(cpu=2))])
    assert p.assignments == [("lost", "a")]


def test_best_fit_prefers_fuller_alloc() -> None:
    """A demand goes on the alloc it fills best, leaving the emptier one to drain."""
    rs = [
        room("empty", res(cpu=8, mem=8), res(cpu=8, mem=8)),
        room("busy", res(cpu=8, mem=8), res(cpu=2, mem=2)),
    ]
    p = place([Demand(id="t", resources=res(cpu=2, mem=2))], rs)
    assert p.assignments == [("t", "busy")]


def test_disk_and_gpu_count() -> None:
    """Disk and GPU are fitted like cpu and mem; cpu-only tasks stay off GPU allocs."""
    rs = [
        room("gpu", res(cpu=8, mem=8, disk=10, gpu=1)),
        room("cpu", res(cpu=8, mem=8, disk=1)),
    ]
    ds = [
        Demand(id="diskful", resources=res(cpu=1, mem=1, disk=5), order=0),
        Demand(id="plain", resources=res(cpu=1, mem=1), order=1),
        Demand(id="gpu-task", resources=res(cpu=1, gpu=1), order=2),
    ]
    p = place(ds, rs)
    assert dict(p.assignments) == {"diskful": "gpu", "plain": "cpu", "gpu-task": "gpu"}


def test_extras_must_fit() -> None:
    """A demand for a named extra resource only goes where that resource is free."""
    rs = [room("a", res(cpu=4)), room("b", res(cpu=4, lic=1))]
    p = place([Demand(id="t", resources=res(cpu=1, lic=1))], rs)
    assert p.assignments == [("t", "b")]


def test_no_reservation_when_cluster_can_grow() -> None:
    """With room to grow, a big waiting demand does not hold back small ones."""
    rs = [room("a", res(cpu=8), res(cpu=4))]
    ds = [
        Demand(id="big", resources=res(cpu=6), order=0),
        Demand(id="s", resources=res(cpu=1), order=1),
    ]
    p = place(ds, rs, can_grow=True)
    assert p.assignments == [("s", "a")]
    assert p.reserved == {}


def test_reservation_when_cluster_cannot_grow() -> None:
    """When the cluster cannot grow, a big demand holds the emptiest room it could ever fit."""
    rs = [
        room("a", res(cpu=8), res(cpu=4)),
        room("b", res(cpu=8), res(cpu=2)),
        room("c", res(cpu=4), res(cpu=4)),
    ]
    ds = [
        Demand(id="big", resources=res(cpu=6), priority=0),
        Demand(id="small1", resources=res(cpu=1), priority=1, order=0),
        Demand(id="small2", resources=res(cpu=1), priority=1, order=1),
    ]
    p = place(ds, rs, can_grow=False)
    assert p.reserved == {"a": "big"}
    assert all(r != "a" for _, r in p.assignments)
    assert [d for d, _ in p.assignments] == ["small1", "small2"]


def test_reservation_is_skipped_when_no_capacity_fits() -> None:
    """A demand no room could ever hold reserves nothing."""
    p = place([Demand(id="huge", resources=res(cpu=64))], [room("a", res(cpu=8))], can_grow=False)
    assert p.reserved == {}
    assert [d.id for d in p.unplaced] == ["huge"]


def test_task_that_fits_in_rooms_that_outlive_it_takes_the_best_fit() -> None:
    """Among rooms whose tasks outlive it, a task takes the best fit, not the nearest end."""
    rs = [
        room("short", res(cpu=8), res(cpu=4), expected_free_at=10.0),
        room("long", res(cpu=8), res(cpu=3.75), expected_free_at=3600.0),
    ]
    long_task = Demand(id="l", resources=res(cpu=1), expected_duration=3000.0)
    assert place([long_task], rs).assignments == [("l", "long")]
    # Nearly as good a fit in "short", whose tasks end closer to its own end: best fit wins.
    short_task = Demand(id="s", resources=res(cpu=1), expected_duration=5.0)
    assert place([short_task], rs).assignments == [("s", "long")]
    unknown = Demand(id="u", resources=res(cpu=1))
    assert place([unknown], rs).assignments == [("u", "long")]


def test_long_task_goes_where_tasks_outlive_it() -> None:
    """A task joins a room whose tasks outlive it over a fuller one it would keep alive."""
    rs = [
        room("full", res(cpu=8), res(cpu=1), expected_free_at=100.0),
        room("roomy", res(cpu=8), res(cpu=6), expected_free_at=3600.0),
    ]
    assert place([Demand(id="t", resources=res(cpu=1))], rs).assignments == [("t", "full")]
    long_task = Demand(id="t", resources=res(cpu=1), expected_duration=3000.0)
    assert place([long_task], rs).assignments == [("t", "roomy")]


def test_long_task_extends_the_room_where_that_costs_least() -> None:
    """With no room that outlives it, a task extends the room for the fewest size-seconds."""
    rs = [
        room("big", res(cpu=16), res(cpu=1), expected_free_at=100.0),
        room("small", res(cpu=4), res(cpu=3), expected_free_at=50.0),
    ]
    long_task = Demand(id="t", resources=res(cpu=1), expected_duration=3000.0)
    # Best fit would take "big" (the least slack left), keeping 16 cores for 2,900 s more.
    assert place([long_task], rs).assignments == [("t", "small")]


def test_long_task_waits_for_an_alloc_of_its_own() -> None:
    """A task that would keep a large busy alloc alive for hours waits for a small one."""
    rs = [room("big", res(cpu=16), res(cpu=8), expected_free_at=60.0)]
    small = AllocShape(resources=res(cpu=4), name="small")
    long_task = Demand(id="t", resources=res(cpu=1), expected_duration=3600.0)
    p = place([long_task], rs, shapes=[small])
    assert p.assignments == []
    assert [d.id for d in p.unplaced] == ["t"]
    # Without a smaller shape, or when no new alloc can come, it takes the room.
    assert place([long_task], rs).assignments == [("t", "big")]
    assert place([long_task], rs, shapes=[small], can_grow=False).assignments == [("t", "big")]
    # A smaller live room stands in for the menu when the shapes are not given.
    busy_small = room("small", res(cpu=4), res(cpu=0.5), expected_free_at=10.0)
    assert place([long_task], [*rs, busy_small]).assignments == []
    # A short extension is taken, and so is an empty room, whatever it costs.
    short = Demand(id="s", resources=res(cpu=1), expected_duration=70.0)
    assert place([short], rs, shapes=[small]).assignments == [("s", "big")]
    fresh = room("fresh", res(cpu=16))
    assert place([long_task], [fresh], shapes=[small]).assignments == [("t", "fresh")]


def test_alloc_overhead_counts_against_an_alloc_of_its_own() -> None:
    """An alloc of its own is paid beyond the task (its idle time before it is freed): a task
    whose extension of a busy room costs less than that takes the room instead of waiting."""
    rs = [room("big", res(cpu=16), res(cpu=8), expected_free_at=60.0)]
    small = AllocShape(resources=res(cpu=4), name="small")
    task = Demand(id="t", resources=res(cpu=1), expected_duration=100.0)
    # Keeping 16 cpus 40 s longer (640 cpu-s) against 4 cpus for 100 s (400) or 200 s (800).
    assert place([task], rs, shapes=[small]).assignments == []
    assert place([task], rs, shapes=[small], alloc_overhead=100.0).assignments == [("t", "big")]


def test_many_identical_demands_fill_rooms_in_turn() -> None:
    """A batch of identical tasks fills the fullest room first and never oversubscribes."""
    rs = [room(f"r{i}", res(cpu=4, mem=4), res(cpu=4 - i, mem=4 - i)) for i in range(4)]
    ds = [Demand(id=f"t{i:02}", resources=res(cpu=1, mem=1), order=i) for i in range(12)]
    p = place(ds, rs)
    check_placement(ds, rs, p)
    assert len(p.assignments) == 10  # 4 + 3 + 2 + 1 free cores
    assert [r for _, r in p.assignments[:1]] == ["r3"]


# -- plan --------------------------------------------------------------------------------------


def test_pending_request_counts_at_full_size() -> None:
    """Four small tasks and one pending request big enough for all of them: no new request."""
    ds = [Demand(id=f"t{i}", resources=res(cpu=1, mem=1), order=i) for i in range(4)]
    pending = [PendingRequest(id="p1", requirements=Requirements(min=res(cpu=1, mem=1), width=3))]
    shapes = [AllocShape(resources=res(cpu=16, mem=64, disk=100))]
    out = plan(ds, pending, shapes, min_alloc=MIN_ALLOC, max_new=5)
    assert out.requests == []
    assert out.cancel == []
    assert sorted(out.covered) == ["t0", "t1", "t2", "t3"]


def test_pending_request_for_short_tasks_does_not_hold_a_long_one() -> None:
    """A much longer task is not counted in the room left in a request made for short tasks:
    it gets a request of its own instead of keeping that alloc alive."""
    ds = [
        Demand(id="s1", resources=res(cpu=2, mem=2), order=0, expected_duration=60.0),
        Demand(id="s2", resources=res(cpu=2, mem=2), order=1, expected_duration=60.0),
        Demand(id="long", resources=res(cpu=1, mem=1), order=2, expected_duration=3600.0),
    ]
    pending = [
        PendingRequest(
            id="p", requirements=Requirements(min=res(cpu=8, mem=8)), demand_ids=("s1", "s2")
        )
    ]
    shapes = [AllocShape(resources=res(cpu=4, mem=16)), AllocShape(resources=res(cpu=16, mem=64))]
    out = plan(ds, pending, shapes, min_alloc=MIN_ALLOC, max_new=5)
    assert out.cancel == []
    assert out.request_demands == [("long",)]
    assert sorted(out.covered) == ["long", "s1", "s2"]


def test_unneeded_pending_request_is_cancelled() -> None:
    """A pending request no waiting demand fits in any more is returned for cancelling."""
    ds = [Demand(id="t", resources=res(cpu=2, mem=2))]
    pending = [
        PendingRequest(id="big", requirements=Requirements(min=res(cpu=4, mem=4))),
        PendingRequest(id="spare", requirements=Requirements(min=res(cpu=4, mem=4))),
    ]
    out = plan(
        ds, pending, [AllocShape(resources=res(cpu=8, mem=8))], min_alloc=MIN_ALLOC, max_new=5
    )
    assert out.cancel == ["spare"]
    assert out.requests == []
    assert out.covered == ["t"]
    assert plan([], pending, [], min_alloc=MIN_ALLOC, max_new=5).cancel == ["big", "spare"]


def test_mixed_shapes_are_never_merged_into_an_impossible_request() -> None:
    """A 64-cpu/1GiB and a 1-cpu/256GiB task get two requests that a 64/256 alloc satisfies."""
    ds = [
        Demand(id="wide", resources=res(cpu=64, mem=1), order=0),
        Demand(id="tall", resources=res(cpu=1, mem=256), order=1),
    ]
    shape = AllocShape(resources=res(cpu=64, mem=256, disk=100))
    out = plan(ds, [], [shape], min_alloc=MIN_ALLOC, max_new=5)
    assert len(out.requests) == 2
    assert all(r.min.fits_in(shape.resources) for r in out.requests)
    assert sorted(out.covered) == ["tall", "wide"]
    # With a 65-cpu shape on offer they can share one alloc.
    bigger = AllocShape(resources=res(cpu=65, mem=257, disk=100))
    out = plan(ds, [], [bigger], min_alloc=MIN_ALLOC, max_new=5)
    assert len(out.requests) == 1
    assert out.requests[0].min.cpu == 65


def test_min_alloc_is_raised_to_and_clipped_to_the_shape() -> None:
    """Requests are at least min_alloc, but never more than the shape can give."""
    ds = [Demand(id="t", resources=res(cpu=0.5, mem=0.25))]
    roomy = AllocShape(resources=res(cpu=8, mem=32, disk=100))
    [req] = plan(ds, [], [roomy], min_alloc=MIN_ALLOC, max_new=1).requests
    assert req.min == res(cpu=1, mem=1, disk=1)
    assert req.width == 0
    tiny = AllocShape(resources=res(cpu=0.5, mem=0.5))  # no disk, less cpu than min_alloc
    [req] = plan(ds, [], [tiny], min_alloc=MIN_ALLOC, max_new=1).requests
    assert req.min == res(cpu=0.5, mem=0.5)
    assert req.min.fits_in(tiny.resources)


def test_max_new_is_respected_and_most_urgent_go_first() -> None:
    """At most max_new requests, and the most urgent demands are the ones covered."""
    ds = [
        Demand(id=f"t{i}", resources=res(cpu=4, mem=4), priority=2 - i % 3, order=i)
        for i in range(9)
    ]
    shapes = [AllocShape(resources=res(cpu=4, mem=4, disk=10))]
    out = plan(ds, [], shapes, min_alloc=MIN_ALLOC, max_new=2)
    assert len(out.requests) == 2
    assert out.covered == ["t2", "t5"]  # priority 0, in order
    assert plan(ds, [], shapes, min_alloc=MIN_ALLOC, max_new=0).requests == []


def test_plan_downsizes_to_the_cheapest_shape() -> None:
    """A small leftover bin asks for the small shape's worth, not the large one's."""
    small = AllocShape(resources=res(cpu=4, mem=16), price=1.0, name="small")
    large = AllocShape(resources=res(cpu=32, mem=128), price=6.0, name="large")
    ds = [Demand(id=f"t{i:02}", resources=res(cpu=2, mem=4), order=i) for i in range(17)]
    bins = pack(ds, [small, large])
    assert [b.shape.name for b in bins] == ["large", "small"]
    out = plan(ds, [], [small, large], min_alloc=MIN_ALLOC, max_new=5)
    assert [r.min for r in out.requests] == [res(cpu=32, mem=64), res(cpu=2, mem=4)]
    assert len(out.covered) == 17


def test_plan_picks_the_cheapest_mix_of_shapes() -> None:
    """cpu-heavy work goes to compute allocs and memory-heavy work to memory allocs."""
    compute = AllocShape(resources=res(cpu=32, mem=64), price=1.36, name="compute")
    memory = AllocShape(resources=res(cpu=32, mem=256), price=2.02, name="memory")
    general = AllocShape(resources=res(cpu=64, mem=256), price=3.07, name="general")
    menu = [general, compute, memory]
    cpu_heavy = [Demand(id=f"c{i:02}", resources=res(cpu=4, mem=6)) for i in range(16)]
    mem_heavy = [Demand(id=f"m{i:02}", resources=res(cpu=2, mem=30)) for i in range(16)]
    assert {b.shape.name for b in pack(cpu_heavy, menu)} == {"compute"}
    assert {b.shape.name for b in pack(mem_heavy, menu)} == {"memory"}
    mixed = pack(cpu_heavy + mem_heavy, menu)
    price = sum(b.shape.price or 0.0 for b in mixed)
    assert price <= len(pack(cpu_heavy + mem_heavy, [general])) * 3.07


def test_shapes_without_price_cost_in_proportion_to_size() -> None:
    """With no prices, a bin is downsized to the smallest shape that holds it."""
    small = AllocShape(resources=res(cpu=4, mem=16), name="small")
    large = AllocShape(resources=res(cpu=32, mem=128), name="large")
    ds = [Demand(id=f"t{i:02}", resources=res(cpu=1, mem=4)) for i in range(34)]
    assert [b.shape.name for b in pack(ds, [small, large])] == ["large", "small"]


def test_tasks_that_end_together_share_a_new_alloc() -> None:
    """Short and long tasks of the same size go to separate allocs, so the short ones' alloc
    can be given back early, without using more allocs."""
    shape = AllocShape(resources=res(cpu=8, mem=8))
    ds = [
        Demand(id=f"t{i}", resources=res(cpu=2, mem=2), expected_duration=60.0 if i % 2 else 3600.0)
        for i in range(8)
    ]
    bins = pack(ds, [shape])
    assert len(bins) == 2
    durations = {frozenset(ds[int(i[1:])].expected_duration for i in b.demand_ids) for b in bins}
    assert durations == {frozenset({60.0}), frozenset({3600.0})}


def test_much_longer_task_is_not_filler_in_a_short_bin() -> None:
    """A task far longer than a bin's tasks gets a bin of its own, not the short bin's room."""
    small = AllocShape(resources=res(cpu=2, mem=8), name="small")
    large = AllocShape(resources=res(cpu=8, mem=32), name="large")
    ds = [
        Demand(id="short", resources=res(cpu=6, mem=6), priority=0, expected_duration=60.0),
        Demand(id="long", resources=res(cpu=1, mem=1), priority=1, expected_duration=3600.0),
    ]
    bins = pack(ds, [small, large])
    assert sorted((b.demand_ids, b.shape.name) for b in bins) == [
        (("long",), "small"),
        (("short",), "large"),
    ]


def test_long_straggler_goes_into_the_smallest_shape() -> None:
    """A long task among many short ones gets a small alloc, filled with a few short ones, so
    that no large alloc is kept alive by it alone."""
    small = AllocShape(resources=res(cpu=4, mem=16), name="small")
    large = AllocShape(resources=res(cpu=16, mem=64), name="large")
    ds = [Demand(id="t00", resources=res(cpu=1, mem=1), expected_duration=3600.0)]
    ds += [
        Demand(id=f"t{i:02}", resources=res(cpu=1, mem=1), expected_duration=60.0)
        for i in range(1, 16)
    ]
    bins = pack(ds, [small, large])
    holder = next(b for b in bins if "t00" in b.demand_ids)
    assert holder.shape.name == "small"
    assert sum(len(b.demand_ids) for b in bins) == 16
    # Without durations, one large alloc holds them all.
    blind = [Demand(id=d.id, resources=d.resources) for d in ds]
    assert [b.shape.name for b in pack(blind, [small, large])] == ["large"]


def test_bins_open_with_the_longest_tasks() -> None:
    """Bins open with the longest-lived tasks, so shorter ones fill them without extending
    them: the long task does not land in the large task's short bin."""
    shape = AllocShape(resources=res(cpu=8, mem=8))
    ds = [
        Demand(id="big", resources=res(cpu=6, mem=6), expected_duration=60.0),
        Demand(id="long", resources=res(cpu=2, mem=2), expected_duration=3600.0),
        Demand(id="mid", resources=res(cpu=5, mem=5), expected_duration=2000.0),
    ]
    bins = pack(ds, [shape])
    assert sorted(sorted(b.demand_ids) for b in bins) == [["big"], ["long", "mid"]]


def test_demands_no_shape_holds_are_left_out() -> None:
    """A demand that no shape can hold gets no request (the scheduler settles it)."""
    ds = [Demand(id="huge", resources=res(cpu=128)), Demand(id="ok", resources=res(cpu=1))]
    out = plan(ds, [], [AllocShape(resources=res(cpu=8, mem=8))], min_alloc=MIN_ALLOC, max_new=5)
    assert out.covered == ["ok"]
    assert len(out.requests) == 1


@settings(max_examples=60, deadline=None)
@given(
    demands(),
    st.lists(st.builds(Requirements, min=resources(), width=st.integers(0, 2)), max_size=3),
    shapes_menus,
    st.integers(0, 4),
)
def test_plan_invariants(
    ds: list[Demand], pending_reqs: list[Requirements], shapes: list[AllocShape], max_new: int
) -> None:
    """Requests fit some shape, are at most max_new, cover each demand once, cancel only unused."""
    pending = [PendingRequest(id=f"p{i}", requirements=r) for i, r in enumerate(pending_reqs)]
    out = plan(ds, pending, shapes, min_alloc=MIN_ALLOC, max_new=max_new)
    assert len(out.requests) <= max_new
    for r in out.requests:
        assert any(r.min.fits_in(s.resources) for s in shapes)
        assert r.width == 0
    assert len(set(out.covered)) == len(out.covered)
    assert set(out.covered) <= {d.id for d in ds}
    assert set(out.cancel) <= {p.id for p in pending}
    # A demand that fits a cancelled request's full size would have been put there.
    for p in pending:
        if p.id in out.cancel:
            for d in ds:
                assert not d.resources.fits_in(p.requirements.full) or d.id in out.covered
    assert plan(ds, pending, shapes, min_alloc=MIN_ALLOC, max_new=max_new) == out


def test_plan_considers_only_what_max_new_allocs_could_hold() -> None:
    """With 5000 waiting demands and one request allowed, plan covers one alloc's worth."""
    ds = [Demand(id=f"t{i:04}", resources=res(cpu=1, mem=1), order=i) for i in range(5000)]
    shape = AllocShape(resources=res(cpu=16, mem=64, disk=10))
    out = plan(ds, [], [shape], min_alloc=MIN_ALLOC, max_new=1)
    assert len(out.requests) == 1
    assert out.covered == [f"t{i:04}" for i in range(16)]  # the 16 most urgent
    assert out.requests[0].min == res(cpu=16, mem=16, disk=1)


def test_pending_requests_fill_in_priority_order() -> None:
    """The most urgent demands are the ones a pending request is counted for."""
    ds = [
        Demand(id="low", resources=res(cpu=2, mem=2), priority=3),
        Demand(id="high", resources=res(cpu=2, mem=2), priority=0),
    ]
    pending = [PendingRequest(id="p", requirements=Requirements(min=res(cpu=2, mem=2)))]
    shape = AllocShape(resources=res(cpu=2, mem=2))
    out = plan(ds, pending, [shape], min_alloc=Resources(), max_new=1)
    assert out.covered == ["high", "low"]
    assert out.requests == [Requirements(min=res(cpu=2, mem=2))]


def test_each_new_request_is_counted_by_the_next_plan() -> None:
    """Re-planning with the requests just made as pending asks for nothing more."""
    ds = [Demand(id=f"t{i}", resources=res(cpu=3, mem=5), order=i) for i in range(10)]
    shapes = [AllocShape(resources=res(cpu=8, mem=16, disk=4))]
    first = plan(ds, [], shapes, min_alloc=MIN_ALLOC, max_new=5)
    assert len(first.requests) == 5
    pending = [PendingRequest(id=f"p{i}", requirements=r) for i, r in enumerate(first.requests)]
    again = plan(ds, pending, shapes, min_alloc=MIN_ALLOC, max_new=5)
    assert again.requests == []
    assert again.cancel == []
    assert sorted(again.covered) == sorted(d.id for d in ds)


def random_demands(rng: random.Random, n: int, start: int = 0) -> list[Demand]:
    """n demands of mixed sizes (cpu, mem, disk, some GPUs) over three priorities."""
    return [
        Demand(
            id=f"t{i:03}",
            resources=Resources(
                cpu=round(rng.uniform(0.5, 12), 1),
                mem=int(rng.uniform(1, 48) * GiB),
                disk=int(rng.uniform(0, 20) * GiB),
                gpu=rng.choice([0, 0, 0, 1]),
            ),
            priority=rng.randint(0, 2),
            order=i,
        )
        for i in range(start, start + n)
    ]


REPLAN_MENUS = [
    [AllocShape(resources=res(cpu=32, mem=128, disk=100, gpu=4))],
    [
        AllocShape(resources=res(cpu=c, mem=m, disk=100, gpu=g), price=p)
        for c, m, g, p in [(4, 16, 0, 0.19), (16, 64, 0, 0.77), (32, 256, 0, 2.02), (32, 128, 4, 4)]
    ],
]


def test_requests_just_made_hold_their_demands_on_the_next_call() -> None:
    """Re-planning the same mixed demands with their requests pending asks for nothing more."""
    for seed in range(40):
        rng = random.Random(seed)
        shapes = REPLAN_MENUS[seed % 2]
        ds = random_demands(rng, rng.choice([5, 12, 25]))
        first = plan(ds, [], shapes, min_alloc=MIN_ALLOC, max_new=10)
        assert len(first.request_demands) == len(first.requests)
        assert sorted(i for ids in first.request_demands for i in ids) == sorted(first.covered)
        pending = [PendingRequest(id=f"p{i}", requirements=r) for i, r in enumerate(first.requests)]
        again = plan(ds, pending, shapes, min_alloc=MIN_ALLOC, max_new=10 - len(pending))
        assert again.requests == [], seed
        assert again.cancel == [], seed
        assert sorted(again.covered) == sorted(first.covered), seed


def test_requests_that_know_their_demands_never_over_ask() -> None:
    """With demand_ids passed back, a demand placed elsewhere or a new one never makes the
    planner ask for room the pending requests already hold."""
    for seed in range(40):
        rng = random.Random(seed)
        shapes = REPLAN_MENUS[seed % 2]
        ds = random_demands(rng, rng.choice([5, 12, 25]))
        first = plan(ds, [], shapes, min_alloc=MIN_ALLOC, max_new=8)
        pending = [
            PendingRequest(id=f"p{i}", requirements=r, demand_ids=ids)
            for i, (r, ids) in enumerate(zip(first.requests, first.request_demands, strict=True))
        ]
        max_new = 8 - len(pending)
        placed_elsewhere = rng.choice(ds)
        fewer = [d for d in ds if d is not placed_elsewhere]
        out = plan(fewer, pending, shapes, min_alloc=MIN_ALLOC, max_new=max_new)
        assert out.requests == [], seed
        assert set(out.covered) == set(first.covered) - {placed_elsewhere.id}, seed
        more = [*ds, *random_demands(rng, 1, start=len(ds))]
        out = plan(more, pending, shapes, min_alloc=MIN_ALLOC, max_new=max_new)
        assert len(out.requests) <= 1, seed
        assert out.cancel == [], seed


# -- the offline packer ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(demands(max_size=40), shapes_menus, st.one_of(st.none(), st.integers(0, 5)))
def test_pack_invariants(ds: list[Demand], shapes: list[AllocShape], max_bins: int | None) -> None:
    """Every bin holds its content, each demand is packed at most once, all of them if allowed."""
    bins = pack(ds, shapes, max_bins=max_bins)
    by_id = {d.id: d for d in ds}
    ids = [i for b in bins for i in b.demand_ids]
    assert len(ids) == len(set(ids))
    for b in bins:
        assert b.demand_ids
        assert b.used == total([by_id[i].resources for i in b.demand_ids])
        assert fits(b.used, b.shape.resources)
    if max_bins is not None:
        assert len(bins) <= max_bins
    else:
        packable = {d.id for d in ds if any(d.resources.fits_in(s.resources) for s in shapes)}
        assert set(ids) == packable
    assert pack(list(reversed(ds)), shapes, max_bins=max_bins) == bins


@settings(max_examples=40, deadline=None)
@given(demands(max_size=40))
def test_pack_against_bounds(ds: list[Demand]) -> None:
    """With one shape, no packer beats the lower bound, and both pack everything."""
    cap = res(cpu=16, mem=32, disk=32, gpu=8, lic=4)
    shape = AllocShape(resources=cap)
    ours = pack(ds, [shape])
    ffd = first_fit_decreasing(ds, cap)
    bound = lower_bound(ds, cap)
    assert len(ours) >= bound
    assert len(ffd) >= bound
    assert sorted(i for b in ffd for i in b.demand_ids) == sorted(d.id for d in ds)
    assert all(fits(b.used, cap) for b in ffd)


def test_lower_bound() -> None:
    """The bound is the max over dimensions of ceil(total / capacity)."""
    ds = [Demand(id=str(i), resources=res(cpu=3, mem=1)) for i in range(5)]
    assert lower_bound(ds, res(cpu=4, mem=4)) == 4
    assert lower_bound([], res(cpu=4)) == 0
    assert lower_bound([Demand(id="z", resources=Resources())], res(cpu=4)) == 1
    with pytest.raises(ValueError, match="lacks"):
        lower_bound([Demand(id="g", resources=res(gpu=1))], res(cpu=4))


def test_first_fit_decreasing_baseline() -> None:
    """The baseline puts each demand, largest first, into the first bin it fits."""
    ds = [Demand(id=f"i{k}", resources=res(cpu=s)) for k, s in enumerate([2, 5, 4, 7, 1, 3])]
    bins = first_fit_decreasing(ds, res(cpu=10))
    assert [b.demand_ids for b in bins] == [("i3", "i5"), ("i1", "i2", "i4"), ("i0",)]
    assert [b.used.cpu for b in bins] == [10, 10, 2]


def test_triplets_pack_optimally() -> None:
    """Items in triplets that exactly fill a bin pack into n/3 bins, where FFD needs more."""
    sizes = [50, 25, 25, 40, 30, 30, 45, 35, 20, 60, 21, 19]
    ds = [Demand(id=f"i{k:02}", resources=res(cpu=s)) for k, s in enumerate(sizes)]
    bins = pack(ds, [AllocShape(resources=res(cpu=100))])
    assert len(bins) == lower_bound(ds, res(cpu=100)) == 4
    assert len(first_fit_decreasing(ds, res(cpu=100))) == 5


def test_anti_correlated_demands_pair_up() -> None:
    """cpu-heavy and memory-heavy tasks share allocs instead of each filling one dimension."""
    ds = [Demand(id=f"c{i}", resources=res(cpu=6, mem=2)) for i in range(4)]
    ds += [Demand(id=f"m{i}", resources=res(cpu=2, mem=6)) for i in range(4)]
    bins = pack(ds, [AllocShape(resources=res(cpu=8, mem=8))])
    assert len(bins) == 4
    assert all(sorted(i[0] for i in b.demand_ids) == ["c", "m"] for b in bins)


# -- place against a plain reference -----------------------------------------------------------


def reference_place(ds: list[Demand], rs: list[Room], can_grow: bool) -> Placement:
    """place() written as the obvious scan over every room, for comparing decisions."""

    def vec(r: Resources) -> tuple[float, ...]:
        return (float(r.cpu), float(r.mem), float(r.disk), float(r.gpu))

    def dot(a: Sequence[float], b: Sequence[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    caps = [vec(r.capacity) for r in rs]
    ws = [tuple(1 / c if c > 0 else 0.0 for c in cap) for cap in caps]
    free = [list(vec(r.free)) for r in rs]
    ends = [r.expected_free_at for r in rs]
    empty = [r.free == r.capacity for r in rs]
    held = [False] * len(rs)
    largest = [max(col) for col in zip(*caps, strict=True)]
    sizes: list[float] = [
        sum(c / t for c, t in zip(cap, largest, strict=True) if t > 0) for cap in caps
    ]

    def fits_cap(d: tuple[float, ...], j: int) -> bool:
        return all(x <= c + 1e-9 for x, c in zip(d, caps[j], strict=True))

    assignments: list[tuple[str, str]] = []
    unplaced: list[Demand] = []
    reserved: dict[str, str] = {}
    for dm in sorted(ds, key=key):
        d = vec(dm.resources)
        fit = [
            i
            for i in range(len(rs))
            if not held[i] and all(x <= f + 1e-9 for x, f in zip(d, free[i], strict=True))
        ]
        dur = dm.expected_duration
        if fit and dur is not None:
            # Rooms that outlive it, then rooms of unknown end, then the cheapest extension.
            scores = {i: dot(ws[i], free[i]) - dot(d, ws[i]) for i in fit}
            covers = [j for j in fit if not empty[j] and (e := ends[j]) is not None and e >= dur]
            unknown = [j for j in fit if not empty[j] and ends[j] is None]
            if covers:
                i = min(covers, key=lambda j: (scores[j], rs[j].id))
            elif unknown:
                i = min(unknown, key=lambda j: (scores[j], rs[j].id))
            else:

                def cost(j: int, dur: float = dur) -> float:
                    return (dur - (0.0 if empty[j] else ends[j] or 0.0)) * sizes[j]

                i = min(fit, key=lambda j: (cost(j), scores[j], rs[j].id))
                alone = min(sizes[j] for j in range(len(rs)) if fits_cap(d, j))
                if can_grow and not empty[i] and cost(i) > alone * dur + 1e-9:
                    fit = []  # it waits for an alloc of its own
        if fit:
            scores = {i: dot(ws[i], free[i]) - dot(d, ws[i]) for i in fit}
            if dur is None:
                i = min(fit, key=lambda i: (scores[i], rs[i].id))
            free[i] = [max(0.0, f - x) for f, x in zip(free[i], d, strict=True)]
            e = ends[i]
            if dur is None:
                ends[i] = None
            elif empty[i] or e is not None:
                ends[i] = dur if empty[i] or e is None else max(e, dur)
            empty[i] = False
            assignments.append((dm.id, rs[i].id))
            continue
        unplaced.append(dm)
        if not can_grow:
            holders = [
                i
                for i in range(len(rs))
                if not held[i] and all(x <= c + 1e-9 for x, c in zip(d, caps[i], strict=True))
            ]
            if holders:
                i = min(holders, key=lambda i: (-dot(ws[i], free[i]), rs[i].id))
                held[i] = True
                reserved[rs[i].id] = dm.id
    return Placement(assignments=assignments, unplaced=unplaced, reserved=reserved)


def test_place_matches_reference_on_many_rooms() -> None:
    """With enough rooms and demands to rebuild the fit index, place() decides as a plain scan."""
    caps = [
        res(cpu=64, mem=256, disk=100),
        res(cpu=32, mem=64, disk=50),
        res(cpu=16, mem=64, gpu=2),
    ]
    kinds = [res(cpu=1, mem=2), res(cpu=4, mem=8, disk=1), res(cpu=2, mem=16), res(cpu=1, gpu=1)]
    for seed in range(2):
        rng = random.Random(seed)
        rs = []
        for i in range(90):
            cap = caps[i % 3]
            part = rng.choice([0.0, 0.5, 0.9, 1.0])
            free = Resources(
                cpu=round(cap.cpu * part * rng.random(), 1),
                mem=int(cap.mem * part * rng.random()),
                disk=int(cap.disk * part),
                gpu=cap.gpu if part == 1.0 else 0,
            )
            end = rng.choice([None, 30.0, 300.0])
            rs.append(
                Room(
                    id=f"r{i:02}",
                    capacity=cap,
                    free=cap if part == 1.0 else free,
                    expected_free_at=end,
                )
            )
        ds = []
        for i in range(700):
            r = (
                rng.choice(kinds)
                if rng.random() < 0.6
                else res(cpu=round(rng.uniform(0.1, 8), 1), mem=round(rng.uniform(0.1, 32), 2))
            )
            ds.append(
                Demand(
                    id=f"t{i:03}",
                    resources=r,
                    priority=rng.randint(0, 2),
                    order=i,
                    expected_duration=rng.choice([None, None, 20.0, 400.0]),
                )
            )
        for can_grow in (True, False):
            got = place(ds, rs, can_grow=can_grow)
            assert got == reference_place(ds, rs, can_grow), (seed, can_grow)
            check_placement(ds, rs, got, can_grow=can_grow)


# -- the helpers that find pending requests' bins again ----------------------------------------


def test_assign_backtracks_to_a_full_assignment() -> None:
    """Best fit first would strand the last item; the search backs up and finds the fit."""
    from packsched.packing import _assign, _Bin

    vecs = [(float(s),) for s in (6, 5, 3, 2, 2, 2)]
    bins = [_Bin(0, (10.0,)), _Bin(1, (10.0,))]
    assert _assign(list(range(6)), bins, vecs, (0.1,))
    assert sorted(sorted(vecs[i][0] for i in b.items) for b in bins) == [[2, 2, 6], [2, 3, 5]]
    assert all(b.free == [0.0] for b in bins)


def test_assign_changes_nothing_when_there_is_no_assignment() -> None:
    """Items that cannot all fit leave the bins untouched."""
    from packsched.packing import _assign, _Bin

    vecs = [(6.0,), (6.0,), (6.0,)]
    bins = [_Bin(0, (10.0,)), _Bin(1, (10.0,))]
    assert not _assign([0, 1, 2], bins, vecs, (0.1,))  # 18 <= 20 in all, but no bin takes two
    assert all(not b.items and b.free == [10.0] for b in bins)
    assert not _assign([0, 1, 2], [_Bin(0, (5.0,))], vecs, (0.1,))  # over the total room


def test_move_in_makes_room_by_moving_one_item() -> None:
    """A leftover item fits once an item of its bin moves to another bin."""
    from packsched.packing import _Bin, _move_in, _put

    vecs = [(4.0,), (5.0,), (3.0,)]
    a, b = _Bin(0, (8.0,)), _Bin(1, (6.0,))
    _put(a, [0], vecs)  # a: 4 used, 4 left
    _put(b, [2], vecs)  # b: 3 used, 3 left
    assert _move_in(1, [a, b], vecs)  # 5 fits nowhere; 3 moves from b to a, then 5 into b
    assert sorted(a.items) == [0, 2]
    assert b.items == [1]
    assert not _move_in(1, [_Bin(0, (4.0,))], vecs)


def test_thousands_of_tiny_demands_fill_large_bins() -> None:
    """10,000 demands of 0.01 cpu need two 64-cpu allocs, not one per search budget."""
    shape = AllocShape(resources=Resources(cpu=64, mem=256 * GiB))
    demands = [
        Demand(id=str(i), resources=Resources(cpu=0.01, mem=1), order=i) for i in range(10_000)
    ]
    result = plan(demands, [], [shape], min_alloc=Resources(), max_new=5)
    assert len(result.requests) == 2
