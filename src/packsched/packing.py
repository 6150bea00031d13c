"""The packing policy: which waiting task runs on which alloc, and which allocs to ask for.

Pure functions of their arguments (no I/O, no asyncio, no clock), deterministic for the same
input, so the scheduler can call them after every event and tests can replay any decision.

- `place` puts waiting demands on the free room of live allocs: priority first, best fit over
  every dimension, no head-of-line blocking, and reservations against starvation when the
  cluster cannot grow.
- `plan` turns the demands that fit nowhere into alloc requests: it first counts pending
  requests at their full size, then packs the rest into the cheapest mix of the shapes on offer.
- `pack` is the offline packer `plan` uses; `first_fit_decreasing` and `lower_bound` are the
  baselines it is measured against (tests and `bench/packing.py`).

Inside, every resource vector becomes a tuple of numbers over a fixed list of dimensions
(cpu, mem, disk, gpu, then the extras in name order), because per-dimension arithmetic on
tuples is several times faster than on `Resources` and `place` must handle 100k demands over
1k allocs in well under a second (measured in `bench/packing.py`).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from .resources import AllocShape, Requirements, Resources

__all__ = [
    "Bin",
    "Demand",
    "PendingRequest",
    "Placement",
    "Plan",
    "Room",
    "first_fit_decreasing",
    "lower_bound",
    "pack",
    "place",
    "plan",
]

# Float dimensions (fractional cpu, extras) are compared with this tolerance so that sums such
# as 0.1 + 0.2 never make a demand look one ulp too large for the room computed for it. Byte
# and device counts are whole numbers, exact in a float up to 2**53, so it never matters there.
_EPS = 1e-9

_Vec = tuple[float, ...]


# -- public types ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Demand:
    """A waiting task as packing sees it: its resources and its place in the queue."""

    id: str
    resources: Resources
    priority: int = 0
    """Lower runs first."""
    order: int = 0
    """FIFO within a priority, lower first; rescheduled lost tasks get negative orders."""
    expected_duration: float | None = None
    """Seconds, when declared or learned from history."""


@dataclass(frozen=True, slots=True)
class Room:
    """A live alloc as packing sees it: its size and what is free on it now."""

    id: str
    capacity: Resources
    free: Resources
    expected_free_at: float | None = None
    """When its current tasks are expected to end, in seconds from now (None: unknown)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """What `place` decided."""

    assignments: list[tuple[str, str]]
    """`(demand id, room id)` in the order decided."""
    unplaced: list[Demand]
    """The demands left waiting, in priority/order order."""
    reserved: dict[str, str]
    """Room id -> the id of the demand it is held for (only when the cluster cannot grow)."""


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """An alloc request already made and not yet granted."""

    id: str
    requirements: Requirements
    """Counted at its full size, `requirements.full`."""
    demand_ids: tuple[str, ...] = ()
    """The demands it was made for (`Plan.request_demands`), when the caller kept them: those
    still waiting are counted in it first, exactly as planned."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What `plan` decided."""

    requests: list[Requirements]
    """New alloc requests to make, most urgent first."""
    cancel: list[str]
    """Ids of pending requests that no waiting demand needs any more."""
    covered: list[str]
    """Ids of the demands that pending or new requests will hold."""
    request_demands: list[tuple[str, ...]] = field(default_factory=list)
    """For each new request, the ids of the demands it is made for: pass them back as
    `PendingRequest.demand_ids` so that later calls count them in it exactly."""


@dataclass(frozen=True, slots=True)
class Bin:
    """One alloc of the offline packer: its shape, the demands it holds and their sum."""

    shape: AllocShape
    demand_ids: tuple[str, ...]
    used: Resources


# -- vectors -----------------------------------------------------------------------------------


class _Space:
    """The fixed order of dimensions that turns `Resources` into float tuples."""

    __slots__ = ("extras",)

    def __init__(self, vectors: Iterable[Resources]) -> None:
        names: set[str] = set()
        for r in vectors:
            if r.extra:
                names.update(k for k, v in r.extra.items() if v)
        self.extras = sorted(names)

    def vec(self, r: Resources) -> _Vec:
        # Whole numbers stay ints: they compare, add and hash like the equal floats.
        if self.extras:
            ex = r.extra
            return (r.cpu, r.mem, r.disk, r.gpu, *(ex.get(k, 0.0) for k in self.extras))
        return (r.cpu, r.mem, r.disk, r.gpu)


def _fits(d: _Vec, free: Sequence[float]) -> bool:
    # An explicit loop: this is the hottest line of `place`, and all() over a generator is
    # about twice as slow.
    for dk, fk in zip(d, free, strict=True):  # noqa: SIM110
        if dk > fk + _EPS:
            return False
    return True


def _weights(capacity: _Vec) -> _Vec:
    """1/capacity per dimension (0 where the capacity is 0): multiplying by it normalises."""
    return tuple(1.0 / c if c > 0 else 0.0 for c in capacity)


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# Queue order: priority, then order, then id so that equal keys still sort the same way.
_urgency = attrgetter("priority", "order", "id")


def _sum(resources: Iterable[Resources]) -> Resources:
    total = Resources()
    for r in resources:
        total = total + r
    return total


# -- place -------------------------------------------------------------------------------------


class _FitIndex:
    """Which rooms have at least a given amount free, per dimension, as bitmasks.

    For each dimension the rooms are sorted by their free amount, and `masks[k][p]` has the bit
    of every room at sorted position p or later set; one bisect per dimension and an AND of
    Python ints then give the set of rooms a demand fits in, in a few microseconds for a
    thousand rooms. Free space only shrinks during a pass, so an index built earlier still
    never misses a room that fits; the rooms changed since are kept apart (`_Rooms.dirty`).
    """

    __slots__ = ("masks", "values")

    def __init__(self, free: Sequence[Sequence[float]], rooms: Iterable[int], width: int) -> None:
        members = list(rooms)
        self.values: list[list[float]] = []
        self.masks: list[list[int]] = []
        for k in range(width):
            members.sort(key=lambda i: free[i][k])
            masks = [0] * (len(members) + 1)
            acc = 0
            for p in range(len(members) - 1, -1, -1):
                acc |= 1 << members[p]
                masks[p] = acc
            self.values.append([free[i][k] for i in members])
            self.masks.append(masks)

    def query(self, d: _Vec, within: int) -> int:
        """The rooms of `within` whose free space, when the index was built, held d."""
        found = within
        for k, need in enumerate(d):
            if need > _EPS:
                found &= self.masks[k][bisect_left(self.values[k], need - _EPS)]
                if not found:
                    break
        return found


# Rebuild the fit index once this many rooms have changed since it was built.
_REINDEX_AFTER = 32


class _Rooms:
    """The rooms of one `place` call, kept so that the best fit is found without a scan.

    Rooms of the same capacity form a group; inside a group they are kept sorted by
    `(slack, id)`, where slack is the room's free space normalised by its capacity and summed
    over dimensions. For one demand every room of a group loses the same normalised amount, so
    the group's best fit is the first room in that order the demand fits in, and only the
    groups (a handful of alloc sizes) are compared. Which rooms a demand fits in at all comes
    from a `_FitIndex`, so demands that fit nowhere (most of them, when the allocs are busy)
    are turned away without looking at any room. Rooms that can hold no demand of this call
    any more leave the search (`spent`); held rooms leave everything.
    """

    def __init__(
        self,
        rooms: Sequence[Room],
        space: _Space,
        floor: _Vec,
        offered: Sequence[_Vec] = (),
        overhead: float = 0.0,
    ) -> None:
        n = len(rooms)
        self.overhead = overhead
        self.ids = [r.id for r in rooms]
        self.cap = [space.vec(r.capacity) for r in rooms]
        self.free = [list(space.vec(r.free)) for r in rooms]
        self.end = [r.expected_free_at for r in rooms]
        self.empty = [r.free == r.capacity for r in rooms]
        self.floor = floor
        self.width = len(floor)
        groups: dict[_Vec, int] = {}
        self.group_cap: list[_Vec] = []
        self.group_w: list[_Vec] = []
        self.searched: list[list[tuple[float, str, int]]] = []  # live rooms, for fits
        self.holdable: list[list[tuple[float, str, int]]] = []  # unheld rooms, for holds
        self.group_of: list[int] = []
        self.slack: list[float] = []
        self.live = [False] * n
        self.alive = 0  # bitmask of live rooms
        for i, cap in enumerate(self.cap):
            g = groups.get(cap)
            if g is None:
                g = groups[cap] = len(self.group_cap)
                self.group_cap.append(cap)
                self.group_w.append(_weights(cap))
                self.searched.append([])
                self.holdable.append([])
            self.group_of.append(g)
            self.slack.append(_dot(self.group_w[g], self.free[i]))
            entry = (self.slack[i], self.ids[i], i)
            self.holdable[g].append(entry)
            if _fits(floor, self.free[i]):
                self.live[i] = True
                self.alive |= 1 << i
                self.searched[g].append(entry)
        for entries in (*self.searched, *self.holdable):
            entries.sort()
        # Capacities on one scale (shares of the largest in each dimension), to compare the
        # cost of keeping rooms of different sizes alive.
        top = _weights(tuple(max(col) for col in zip(*self.group_cap, *offered, strict=True)))
        self.group_size = [_dot(cap, top) for cap in self.group_cap]
        self.size = [self.group_size[g] for g in self.group_of]
        self.offered = [(_dot(cap, top), cap) for cap in offered]
        self._reindex()

    def _reindex(self) -> None:
        live = [i for i in range(len(self.ids)) if self.live[i]]
        self.index = _FitIndex(self.free, live, self.width)
        self.dirty = 0  # bitmask of rooms changed since the index was built
        self.dirty_count = 0

    def fitting(self, d: _Vec) -> int:
        """The bitmask of the live rooms that d fits in now."""
        found = self.index.query(d, self.alive)
        stale = found & self.dirty
        if stale:
            found ^= stale
            free = self.free
            while stale:
                low = stale & -stale
                if _fits(d, free[low.bit_length() - 1]):
                    found |= low
                stale ^= low
        return found

    def best(
        self, d: _Vec, duration: float | None, fit: int, *, can_grow: bool = False
    ) -> int | None:
        """The room to put demand d on, given `fit`, the non-empty set of rooms it fits in.

        Without a duration: the best fit. With one, see `_by_end`; None when the demand should
        wait for an alloc of its own.
        """
        if duration is not None:
            return self._by_end(d, duration, fit, can_grow)
        best: tuple[float, str, int] | None = None
        for g, entries in enumerate(self.searched):
            if not entries or not _fits(d, self.group_cap[g]):
                continue
            for slack, rid, i in entries:
                if fit >> i & 1:
                    cand = (slack - _dot(d, self.group_w[g]), rid, i)
                    if best is None or cand < best:
                        best = cand
                    break
        assert best is not None
        return best[2]

    def _by_end(self, d: _Vec, duration: float, fit: int, can_grow: bool) -> int | None:
        """The room for a demand expected to run `duration` seconds, or None (see `place`).

        An alloc is paid until its last task ends, so what a placement costs is how much longer
        it keeps its room alive, times the room's size. Rooms whose tasks outlive the demand
        cost nothing: among them the best fit. Then rooms of unknown end (a task there has no
        duration). Then the room that is kept alive for the fewest size-seconds (an empty room
        ends now), unless that costs more than an alloc of its own would (for the demand's
        duration plus `place`'s `alloc_overhead`), which `plan` then asks for. Only when no
        room outlives the demand are all the rooms it fits in looked at.
        """
        cover: tuple[float, str, int] | None = None  # the best fit among rooms that outlive it
        unknown: tuple[float, str, int] | None = None
        extends: tuple[float, float, str, int] | None = None  # (cost, score, id, room)
        ends, empty, size = self.end, self.empty, self.size
        # Each group is walked best fit first, so its first room that outlives the demand is
        # the group's answer and the walk stops there.
        for g, entries in enumerate(self.searched):
            if not entries or not _fits(d, self.group_cap[g]):
                continue
            dw = _dot(d, self.group_w[g])
            for slack, rid, i in entries:
                if not fit >> i & 1:
                    continue
                score = slack - dw
                end = ends[i]
                if empty[i]:
                    end = 0.0
                elif end is None:
                    if unknown is None or (score, rid, i) < unknown:
                        unknown = (score, rid, i)
                    continue
                if end >= duration:
                    if cover is None or (score, rid, i) < cover:
                        cover = (score, rid, i)
                    break
                option = ((duration - end) * size[i], score, rid, i)
                if extends is None or option < extends:
                    extends = option
        if cover is not None:
            return cover[2]
        if unknown is not None:
            return unknown[2]
        assert extends is not None
        i = extends[3]
        # Keeping a busy alloc alive for it costs more than an alloc of its own: leave it for
        # `plan`. An empty room is taken anyway: it is what `plan` asked for (refusing it
        # would ask for it again), and several demands may share it.
        own = self.alone(d) * (duration + self.overhead)
        if can_grow and not self.empty[i] and extends[0] > own + _EPS:
            return None
        return i

    def alone(self, d: _Vec) -> float:
        """What an alloc of d's own would cost per second: the size of the smallest capacity
        that holds d, among the rooms and the shapes on offer (`place(shapes=...)`)."""
        return min(
            (
                *(self.group_size[g] for g, cap in enumerate(self.group_cap) if _fits(d, cap)),
                *(z for z, cap in self.offered if _fits(d, cap)),
            ),
            default=math.inf,
        )

    def _forget(self, i: int) -> None:
        """Take room i out of the sorted lists (before its slack changes or it is held)."""
        g = self.group_of[i]
        entry = (self.slack[i], self.ids[i], i)
        holdable = self.holdable[g]
        del holdable[bisect_left(holdable, entry)]
        if self.live[i]:
            searched = self.searched[g]
            del searched[bisect_left(searched, entry)]

    def _touch(self, i: int) -> None:
        bit = 1 << i
        if not self.dirty & bit:
            self.dirty |= bit
            self.dirty_count += 1
            if self.dirty_count > _REINDEX_AFTER:
                self._reindex()

    def take(self, i: int, d: _Vec, duration: float | None) -> None:
        """Put demand d (expected to take `duration` seconds) on room i."""
        self._forget(i)
        g = self.group_of[i]
        f = self.free[i]
        for k, dk in enumerate(d):
            f[k] = max(0.0, f[k] - dk)
        self.slack[i] = _dot(self.group_w[g], f)
        end = self.end[i]
        if duration is None:
            self.end[i] = None  # a task of unknown length: the room's end is unknown too
        elif self.empty[i] or end is not None:
            self.end[i] = duration if self.empty[i] or end is None else max(end, duration)
        self.empty[i] = False
        entry = (self.slack[i], self.ids[i], i)
        insort(self.holdable[g], entry)
        if _fits(self.floor, f):
            insort(self.searched[g], entry)
        else:
            self.live[i] = False
            self.alive &= ~(1 << i)
        self._touch(i)

    def holdable_left(self) -> bool:
        return any(self.holdable)

    def reserve_for(self, d: _Vec) -> int | None:
        """Hold the room with the most free space (then the smallest id) whose capacity fits d."""
        best: tuple[float, str, int] | None = None
        for g, entries in enumerate(self.holdable):
            if not entries or not _fits(d, self.group_cap[g]):
                continue
            # The group's most free room with the smallest id: the first of the largest slack.
            top = entries[bisect_left(entries, (entries[-1][0],))]
            cand = (-top[0], top[1], top[2])
            if best is None or cand < best:
                best = cand
        if best is None:
            return None
        i = best[2]
        self._forget(i)
        self.live[i] = False
        self.alive &= ~(1 << i)
        return i


def place(
    demands: Sequence[Demand],
    rooms: Sequence[Room],
    *,
    can_grow: bool = True,
    shapes: Sequence[AllocShape] = (),
    alloc_overhead: float = 0.0,
) -> Placement:
    """Put waiting demands on the free room of live allocs.

    Demands go in priority order, then `order`, each onto the room where it fits with the least
    normalised slack left: slack is the room's free space after the placement, divided by its
    capacity per dimension and summed over every dimension (cpu, mem, disk, gpu, extras).
    Normalising by the room's own capacity fills the fullest allocs first, so the emptiest ones
    drain and can be freed; summing over all dimensions, including those the demand does not
    use, keeps tasks that need no GPU off GPU allocs while others are free. Ties go to the
    smaller room id.

    A demand with an `expected_duration` goes where it keeps an alloc alive the least: the best
    fit among the rooms whose tasks are expected to outlive it, else a room of unknown end, else
    the room whose life it extends for the fewest size-seconds; and when even that costs more
    than an alloc of its own for its duration and `alloc_overhead` (the smallest room or offered
    shape that holds it) and the cluster can grow, it waits for `plan` to ask for one. One long
    task put on an alloc whose tasks all end soon kept that alloc for hours: on the Alibaba
    trace replay (bench/trace.py, with the new-bin rules of `_pack`) this took the billed
    cpu-hours from 1,140 (best fit, end times deciding only among near-equal fits) to 969. Among
    the rooms that outlive it, preferring the one whose tasks end soonest after it (within 0.05
    of the best fit) billed more: 993 (and 522 / 1,539 against 504 / 1,477 on samples of 10,000
    and 30,000 instances), the one that ends soonest whatever the fit 1,022, the one that ends
    last 1,037. Told the shapes on offer and an overhead of the 60 s an idle alloc is kept (as
    the Scheduler tells it), it bills 945 there and 1,478 instead of 1,482 on the synthetic
    trace; 1,074 / 981 against 1,110 / 1,042 on the Alibaba samples of seeds 2 and 3 (synthetic
    1,538 / 1,602 against 1,552 / 1,591). The shapes alone: 963 and 1,509.

    A demand that fits nowhere does not block the ones behind it. When the cluster cannot grow
    (`can_grow=False`), such a demand reserves the room with the most free space whose
    capacity could hold it, so that later demands cannot keep taking that room.

    Args:
        demands: the waiting tasks, in any order.
        rooms: the live allocs.
        can_grow: whether the cluster can give more allocs now.
        shapes: the allocs the cluster offers, if known: what an alloc of its own would cost a
            long demand (without them, the smallest room that holds it stands in).
        alloc_overhead: seconds an alloc is paid for beyond its tasks (the Scheduler passes
            its idle time before an alloc is freed): what an alloc of its own costs a demand
            on top of its duration.
    """
    ordered = sorted(demands, key=_urgency)
    if not ordered or not rooms:
        return Placement(assignments=[], unplaced=ordered, reserved={})
    if shapes and all(d.expected_duration is None for d in ordered):
        shapes = ()  # they only price an alloc of its own for a demand with a duration
    space = _Space(
        [
            *(d.resources for d in ordered),
            *(r.capacity for r in rooms),
            *(r.free for r in rooms),
            *(s.resources for s in shapes),
        ]
    )
    vecs = [space.vec(d.resources) for d in ordered]
    floor = tuple(min(col) for col in zip(*vecs, strict=True))
    state = _Rooms(rooms, space, floor, [space.vec(s.resources) for s in shapes], alloc_overhead)
    assignments: list[tuple[str, str]] = []
    unplaced: list[Demand] = []
    reserved: dict[str, str] = {}
    failed: set[_Vec] = set()  # rooms only shrink, so what failed once fails for good
    no_reservation: set[_Vec] = set()
    last: tuple[_Vec, float | None, int] | None = None
    for n, (demand, d) in enumerate(zip(ordered, vecs, strict=True)):
        if not state.alive and (can_grow or not state.holdable_left()):
            unplaced.extend(ordered[n:])  # no room can take anything any more
            break
        duration = demand.expected_duration
        i: int | None = None
        # The room that was best for the previous, identical demand is still the best if it
        # still fits: only its own slack has shrunk since.
        if (
            last is not None
            and last[0] == d
            and last[1] == duration
            and state.live[last[2]]
            and _fits(d, state.free[last[2]])
        ):
            i = last[2]
        if i is None and d not in failed:
            fit = state.fitting(d)
            if fit:
                i = state.best(d, duration, fit, can_grow=can_grow)
            else:
                failed.add(d)
        if i is not None:
            state.take(i, d, duration)
            assignments.append((demand.id, state.ids[i]))
            last = (d, duration, i)
            continue
        unplaced.append(demand)
        if not can_grow and d not in no_reservation:
            r = state.reserve_for(d)
            if r is None:
                no_reservation.add(d)
            else:
                reserved[state.ids[r]] = demand.id
                if last is not None and last[2] == r:
                    last = None
    return Placement(assignments=assignments, unplaced=unplaced, reserved=reserved)


# -- the offline packer ------------------------------------------------------------------------


class _Menu:
    """The alloc shapes on offer, as vectors, with a price for each and a common scale."""

    def __init__(self, shapes: Sequence[AllocShape], space: _Space) -> None:
        self.shapes = list(shapes)
        self.cap = [space.vec(s.resources) for s in shapes]
        width = len(self.cap[0]) if self.cap else 0
        # Shares are taken of the largest capacity on offer in each dimension, so that one
        # unit of normalised size means the same in every shape.
        top = tuple(max((c[k] for c in self.cap), default=0.0) for k in range(width))
        self.w = _weights(top)
        self.size = [_dot(c, self.w) for c in self.cap]
        priced = [
            (s.price, z) for s, z in zip(shapes, self.size, strict=True) if s.price is not None
        ]
        # With no price, a shape costs in proportion to its size; when only some shapes have a
        # price, the others are priced at the mean rate of those that do.
        rates = [p / z for p, z in priced if z > 0]
        rate = sum(rates) / len(rates) if rates else 1.0
        self.price = [
            s.price if s.price is not None else z * rate
            for s, z in zip(shapes, self.size, strict=True)
        ]

    def opening(self, d: _Vec) -> int | None:
        """The shape a new bin for d is packed in: the best price per size, then the largest."""
        best: tuple[float, float, int] | None = None
        for j, cap in enumerate(self.cap):
            if not _fits(d, cap):
                continue
            z = self.size[j]
            cand = (self.price[j] / z if z > 0 else math.inf, -z, j)
            if best is None or cand < best:
                best = cand
        return None if best is None else best[2]

    def cheapest(self, used: _Vec, current: int) -> int:
        """The cheapest shape that still holds `used` (ties: the larger, then menu order)."""
        best = (self.price[current], -self.size[current], current)
        for j, cap in enumerate(self.cap):
            if _fits(used, cap):
                best = min(best, (self.price[j], -self.size[j], j))
        return best[2]


class _Bin:
    __slots__ = ("free", "items", "life", "shape")

    def __init__(self, shape: int, cap: _Vec) -> None:
        self.shape = shape
        self.free = list(cap)
        self.items: list[int] = []
        self.life: float | None = None  # the longest expected duration in it, when known


# How many candidate items one bin's subset search may examine. Enough to find the exact
# fills of hard instances (triplets) and keep plan() within a few milliseconds per bin.
_SEARCH_BUDGET = 3000


def _next_distinct(pool: Sequence[int], vecs: Sequence[_Vec]) -> list[int]:
    """For each position of `pool`, the next position holding a different vector (or the end),
    so that backing out of an item skips all its identical followers in one step."""
    n = len(pool)
    out = [n] * n
    for i in range(n - 2, -1, -1):
        out[i] = i + 1 if vecs[pool[i + 1]] != vecs[pool[i]] else out[i + 1]
    return out


def _fill(
    free: Sequence[float],
    pool: Sequence[int],
    vecs: Sequence[_Vec],
    size: Sequence[float] | Mapping[int, float],
    w: _Vec,
    budget: int = _SEARCH_BUDGET,
) -> list[int]:
    """The subset of `pool` that fills `free` with the least normalised slack left.

    A depth-first search over the pool in its order (largest first): its first path is the
    first-fit fill (whatever its length: thousands of tiny tasks fill one large alloc), and
    within `budget` further examined items it looks for a better one, stopping at an exact fill.
    Items identical to one just backed out of are skipped (same subsets again), and a sorted
    sizes array skips items too large for what is left.
    """
    n = len(pool)
    neg = [-size[i] for i in pool]  # ascending, so bisect finds the first item small enough
    room = list(free)
    slack = _dot(room, w)
    best_slack = slack
    best: list[int] = []
    chosen: list[int] = []  # positions in pool
    pos = 0
    nodes = 0
    searching = False  # the first (first-fit) path is free; the budget bounds the search after it
    next_distinct: list[int] | None = None  # built on the first backtrack
    while True:
        pos = max(pos, bisect_left(neg, -slack - _EPS))
        taken = False
        while pos < n and nodes < budget:
            nodes += searching
            d = vecs[pool[pos]]
            if _fits(d, room):
                for k, x in enumerate(d):
                    room[k] -= x
                slack -= size[pool[pos]]
                chosen.append(pos)
                if slack < best_slack - _EPS:
                    best_slack = slack
                    best = list(chosen)
                pos += 1
                taken = True
                break
            pos += 1
        if taken:
            if best_slack <= _EPS:
                break
            continue
        if not chosen or nodes >= budget:
            break
        searching = True
        nodes += 1  # a backtrack counts too, so identical items cannot make it unbounded
        last = chosen.pop()
        d = vecs[pool[last]]
        for k, x in enumerate(d):
            room[k] += x
        slack += size[pool[last]]
        if next_distinct is None:
            next_distinct = _next_distinct(pool, vecs)
        pos = next_distinct[last]
    return [pool[p] for p in best]


def _life(demand: Demand) -> float | None:
    """The demand's expected duration when it is known and positive, else None."""
    d = demand.expected_duration
    return d if d is not None and d > 0 else None


def _pack(
    items: Sequence[Demand], vecs: Sequence[_Vec], menu: _Menu, max_bins: int | None
) -> list[_Bin]:
    """Pack items (already in urgency order) into new bins; returns the bins, most urgent first.

    Priorities are packed one after another, so the most urgent demands open the first bins
    and a cap on the number of bins leaves out the least urgent; a priority's items first fill
    what earlier bins left free. Within a priority the packer is bin-centric ("minimum bin
    slack", Gupta and Ho): each new bin starts with the largest item left (by normalised size,
    the sum of its shares of the largest capacity on offer in each dimension) and is filled
    with the subset of the rest that leaves the least normalised slack, found by a bounded
    search (`_fill`). Measured in bench/packing.py against best-fit-decreasing by largest
    share, by L2 norm and by dot product, and bin-centric dot product: it used the fewest
    allocs in every family (e.g. 1.01x the lower bound on uniform random demands where the
    others need 1.02-1.04x, the optimum on anti-correlated ones where they need 1-6% more).
    With several shapes, each candidate shape is filled and the one with the least price per
    normalised size packed wins.

    With expected durations, an alloc is paid until its last task ends, so a bin lives about
    as long as its longest item: bins are opened by the longest-lived items first (the
    largest item among those within a factor of 2 of the longest left), so shorter items fill
    them without extending them, and are filled first with items that end about when the
    opener does (`_fill_bin`); a shape's cost is its price x the bin's life against the
    resource-seconds packed, so a long straggler goes alone into the smallest shape that
    holds it instead of keeping a large alloc alive. Items with no duration are opened last
    and fill any bin, as when no item has one. Measured: the Alibaba trace replay
    (bench/trace.py) went from 1,241 to 1,140 billed cpu-hours with these rules alone, and
    the durations table of bench/packing.py from 57.3 / 59.5 to 56.4 / 58.8 alloc-hours.
    """
    size = [_dot(v, menu.w) for v in vecs]
    life = [_life(d) for d in items]
    bins: list[_Bin] = []
    start = 0
    n = len(items)
    while start < n:
        end = start
        while end < n and items[end].priority == items[start].priority:
            end += 1
        pool = sorted(
            (i for i in range(start, end) if menu.opening(vecs[i]) is not None),
            key=lambda i: (-size[i], i),
        )
        start = end
        for b in bins:
            if not pool:
                break
            taken = _fill_bin(b.life, b.free, pool, vecs, size, life, menu.w)
            if taken:
                _put(b, taken, vecs)
                b.life = _longest(b.life, taken, life)
                gone = set(taken)
                pool = [i for i in pool if i not in gone]
        while pool and (max_bins is None or len(bins) < max_bins):
            at = _opener(pool, life)
            first, rest = pool[at], pool[:at] + pool[at + 1 :]
            opened = life[first]
            shapes = [j for j, cap in enumerate(menu.cap) if _fits(vecs[first], cap)]
            # With several shapes, a quick search in each picks the shape, then the full search
            # fills it: the full one in every shape would multiply plan()'s time by the menu.
            quick = _SEARCH_BUDGET // 10 if len(shapes) > 1 else _SEARCH_BUDGET
            best: tuple[float, float, int, list[int]] | None = None
            for j in shapes:
                room = [c - x for c, x in zip(menu.cap[j], vecs[first], strict=True)]
                taken = _fill_bin(opened, room, rest, vecs, size, life, menu.w, quick)
                cost = menu.price[j] / _packed([first, *taken], size, life)
                cand = (cost, -menu.size[j], j, taken)
                if best is None or cand[:3] < best[:3]:
                    best = cand
            if best is not None and quick < _SEARCH_BUDGET:
                j = best[2]
                room = [c - x for c, x in zip(menu.cap[j], vecs[first], strict=True)]
                best = (*best[:3], _fill_bin(opened, room, rest, vecs, size, life, menu.w))
            assert best is not None  # the pool only holds items some shape can hold
            bin_ = _Bin(best[2], menu.cap[best[2]])
            _put(bin_, [first, *best[3]], vecs)
            bin_.life = _longest(opened, best[3], life)
            bins.append(bin_)
            gone = set(best[3])
            pool = [i for i in rest if i not in gone]
    return bins


def _opener(pool: Sequence[int], life: Sequence[float | None]) -> int:
    """The position in `pool` (largest first) of the item a new bin opens with: the largest
    of those within a factor of 2 of the longest expected duration, or the largest item when
    no duration is known."""
    longest = max((d for i in pool if (d := life[i]) is not None), default=None)
    if longest is None:
        return 0
    return next(p for p, i in enumerate(pool) if (d := life[i]) is not None and 2 * d >= longest)


def _longest(
    current: float | None, taken: Iterable[int], life: Sequence[float | None]
) -> float | None:
    """A bin's life after `taken` joins it: the longest known duration in it."""
    for i in taken:
        d = life[i]
        if d is not None and (current is None or d > current):
            current = d
    return current


def _packed(content: Sequence[int], size: Sequence[float], life: Sequence[float | None]) -> float:
    """What a bin holds, for its price: normalised size, each item weighted by the share of
    the bin's life it runs (1 when durations are unknown), so that a bin kept alive by one long
    item is worth only what that item uses."""
    known = [d for i in content if (d := life[i]) is not None]
    longest = max(known, default=None)
    if longest is None:
        total = sum(size[i] for i in content)
    else:
        total = sum(size[i] * (1.0 if (d := life[i]) is None else d / longest) for i in content)
    return total if total > 0 else 1.0


def _fill_bin(
    opened: float | None,
    room: Sequence[float],
    pool: Sequence[int],
    vecs: Sequence[_Vec],
    size: Sequence[float] | Mapping[int, float],
    life: Sequence[float | None],
    w: _Vec,
    budget: int = _SEARCH_BUDGET,
) -> list[int]:
    """Fill the room of a bin that lives `opened` seconds: first with items expected to end
    about when it does (within a factor of 2), then with shorter ones or ones of unknown
    duration; much longer items are left out, since they would keep the bin alive.

    An alloc can only be given back when its last task ends, so tasks that end together
    should share one (DESIGN 5). Measured in bench/packing.py: half the alloc-seconds of the
    same packer blind to durations (56.4 / 58.8 alloc-hours against 111.1 / 116.9), for at
    most 2% more allocs (121 / 119 against 119 / 119).
    """
    if opened is None:
        return _fill(room, pool, vecs, size, w, budget)
    low, high = opened / 2, opened * 2
    alike = [i for i in pool if (d := life[i]) is not None and low <= d <= high]
    if len(alike) == len(pool):
        return _fill(room, pool, vecs, size, w, budget)
    taken = _fill(room, alike, vecs, size, w, budget // 2) if alike else []
    if taken:
        room = list(room)
        for i in taken:
            for k, x in enumerate(vecs[i]):
                room[k] -= x
    shorter = [i for i in pool if (d := life[i]) is None or d < low]
    return taken + _fill(room, shorter, vecs, size, w, budget - budget // 2)


def _put(b: _Bin, taken: Sequence[int], vecs: Sequence[_Vec]) -> None:
    for i in taken:
        b.items.append(i)
        b.free = [f - x for f, x in zip(b.free, vecs[i], strict=True)]


def _finish(
    bins: list[_Bin], items: Sequence[Demand], vecs: Sequence[_Vec], menu: _Menu
) -> list[Bin]:
    """Downsize each bin to the cheapest shape that holds its content, as public `Bin`s."""
    out: list[Bin] = []
    for b in bins:
        used = tuple(sum(col) for col in zip(*(vecs[i] for i in b.items), strict=True))
        j = menu.cheapest(used, b.shape)
        out.append(
            Bin(
                shape=menu.shapes[j],
                demand_ids=tuple(items[i].id for i in b.items),
                used=_sum(items[i].resources for i in b.items),
            )
        )
    return out


# Bin completion (`_fewer_bins`): bounds on the exact search that follows the greedy packing.
# Item examinations across the whole search: spending them all takes 0.4-0.8 s (measured on
# the anti-correlated and triplets instances of 30-60 items in bench/packing.py).
_REPACK_BUDGET = 300_000
# Above this many items the search is not tried: a failure costs ~0.45 s at 1000 items, where
# one alloc fewer is a fraction of a percent.
_REPACK_MAX_ITEMS = 256
# How many completions of each bin the search recurses over, the fullest first.
_COMPLETIONS = 6


class _OutOfBudget(Exception):
    """The bin completion search examined `_REPACK_BUDGET` items without an answer."""


def _fewer_bins(bins: list[_Bin], vecs: Sequence[_Vec], cap: _Vec) -> list[_Bin]:
    """Repack the content of `bins` (all of capacity `cap`) into fewer bins when an exact
    search finds a way, else return them unchanged.

    The greedy packer is one alloc over the optimum on small hard instances (anti-correlated
    pairs, triplets) where the optimum leaves almost no room in any alloc; bin completion
    (`_repack`) proves or refutes a packing into one bin fewer there, then one fewer again,
    down to the lower bound, within `_REPACK_BUDGET` examined items in all. The bins returned
    are ordered by their most urgent item, as the greedy opens them.
    """
    items = [i for b in bins for i in b.items]
    if len(bins) < 2 or len(items) > _REPACK_MAX_ITEMS:
        return bins
    total = _total([vecs[i] for i in items], len(cap))
    floor = _bins_needed(total, cap)
    w = _weights(cap)
    order = sorted(items, key=lambda i: (-_dot(vecs[i], w), i))
    budget = [_REPACK_BUDGET]
    failed: dict[tuple[_Vec, ...], int] = {}
    best = bins
    while len(best) > floor:
        try:
            found = _repack(order, vecs, cap, w, len(best) - 1, list(total), budget, failed)
        except _OutOfBudget:
            break
        if found is None:
            break
        best = []
        for content in sorted(found, key=min):
            b = _Bin(0, cap)
            _put(b, sorted(content), vecs)
            best.append(b)
    return best


def _repack(
    order: Sequence[int],
    vecs: Sequence[_Vec],
    cap: _Vec,
    w: _Vec,
    bins: int,
    total: list[float],
    budget: list[int],
    failed: dict[tuple[_Vec, ...], int],
) -> list[list[int]] | None:
    """The items of `order` (largest first, summing to `total`) in at most `bins` bins of
    `cap`, or None when the search finds no such packing; raises `_OutOfBudget` when
    `budget[0]` item examinations run out first. `failed` remembers the sets of items (as
    sorted vectors) the search found no packing of, with the most bins tried.

    Bin completion (Korf, for vector bins): the largest item left opens the next bin, and the
    search tries the ways to complete that bin with the items left (`_completions`), the
    fullest first, recursing on what each leaves. Room left in a bin is room wasted, so a
    completion that leaves more room in some dimension than the bins left could waste in all
    (bins x capacity - what is left to pack) leads nowhere and is not tried. Different
    completions often leave the same items to pack (by vector), which are searched only once:
    on the small instances of bench/packing.py this cut the items examined 2.5-4 times.
    """
    if not order:
        return []
    if bins <= 0:
        return None
    allowed = [bins * c - t for c, t in zip(cap, total, strict=True)]
    if any(a < -_EPS for a in allowed):
        return None
    key = tuple(sorted(vecs[i] for i in order))
    if failed.get(key, -1) >= bins:
        return None
    first = order[0]
    rest = order[1:]
    room = [c - x for c, x in zip(cap, vecs[first], strict=True)]
    for content in _completions(rest, vecs, room, allowed, w, budget):
        gone = set(content)
        left = [i for i in rest if i not in gone]
        used = _total([vecs[i] for i in (first, *content)], len(cap))
        rest_total = [t - u for t, u in zip(total, used, strict=True)]
        below = _repack(left, vecs, cap, w, bins - 1, rest_total, budget, failed)
        if below is not None:
            return [[first, *content], *below]
    failed[key] = bins
    return None


def _completions(
    pool: Sequence[int],
    vecs: Sequence[_Vec],
    room: list[float],
    allowed: Sequence[float],
    w: _Vec,
    budget: list[int],
) -> list[list[int]]:
    """The `_COMPLETIONS` fullest subsets of `pool` (largest first) that fit in `room` and
    leave at most `allowed` of it in every dimension, distinct as multisets of vectors.

    A depth-first search in pool order, taking each item before leaving it out; once an item
    is left out, the identical items after it are too (the same subsets again). Two sorted
    arrays bound each step: items larger (normalised) than the room left are skipped, and a
    branch stops where even all the items after it could not fill the room down to `allowed`.
    """
    n = len(pool)
    width = len(room)
    neg = [-_dot(vecs[i], w) for i in pool]  # ascending, so bisect finds the first that fits
    # tail[k][p]: minus the sum in dimension k of the items at positions p and later
    # (ascending in p, for bisect).
    tail = [[0.0] * (n + 1) for _ in range(width)]
    for k in range(width):
        col = tail[k]
        for p in range(n - 1, -1, -1):
            col[p] = col[p + 1] - vecs[pool[p]][k]
    skip = _next_distinct(pool, vecs) if n else []
    found: dict[tuple[_Vec, ...], tuple[float, list[int]]] = {}
    chosen: list[int] = []

    def visit(p: int, slack: float) -> None:
        # slack: the room left, normalised. Past `limit`, the items left cannot take the room
        # down to what may be wasted.
        limit = n
        full = True
        for k in range(width):
            need = room[k] - allowed[k]
            if need > _EPS:
                full = False
                limit = min(limit, bisect_right(tail[k], _EPS - need))
        if full:
            key = tuple(sorted(vecs[pool[q]] for q in chosen))
            if key not in found:
                found[key] = (slack, list(chosen))
        p = max(p, bisect_left(neg, -slack - _EPS))
        while p < limit:
            budget[0] -= 1
            if budget[0] < 0:
                raise _OutOfBudget
            d = vecs[pool[p]]
            if _fits(d, room):
                for k, x in enumerate(d):
                    room[k] -= x
                chosen.append(p)
                visit(p + 1, slack + neg[p])
                chosen.pop()
                for k, x in enumerate(d):
                    room[k] += x
            p = skip[p]  # the items identical to this one: the same subsets again

    visit(0, _dot(room, w))
    best = sorted(found.values())[:_COMPLETIONS]
    return [[pool[q] for q in positions] for _, positions in best]


def pack(
    demands: Sequence[Demand], shapes: Sequence[AllocShape], *, max_bins: int | None = None
) -> list[Bin]:
    """Pack demands into new allocs of the shapes on offer, for the least total price.

    Bins are opened in priority order (most urgent first); with `max_bins`, the least urgent
    demands that would need more bins are left out. Demands no shape can hold are left out.
    With one shape, no `max_bins` and no expected durations, an exact search then looks for a
    packing into fewer bins (`_fewer_bins`): in bench/packing.py it saves one alloc on 4 of
    the 20 anti-correlated and triplets instances of 24-30 demands, and on both of 60.
    """
    ordered = sorted(demands, key=_urgency)
    space = _Space([*(d.resources for d in ordered), *(s.resources for s in shapes)])
    menu = _Menu(shapes, space)
    vecs = [space.vec(d.resources) for d in ordered]
    bins = _pack(ordered, vecs, menu, max_bins)
    if len(menu.cap) == 1 and max_bins is None and all(_life(d) is None for d in ordered):
        bins = _fewer_bins(bins, vecs, menu.cap[0])
    return _finish(bins, ordered, vecs, menu)


def first_fit_decreasing(demands: Sequence[Demand], capacity: Resources) -> list[Bin]:
    """The textbook baseline: by decreasing dominant share, each into the first bin it fits."""
    space = _Space([*(d.resources for d in demands), capacity])
    cap = space.vec(capacity)
    w = _weights(cap)
    shape = AllocShape(resources=capacity)
    vecs = [space.vec(d.resources) for d in demands]
    order = sorted(
        range(len(demands)),
        key=lambda i: (-max(x * y for x, y in zip(vecs[i], w, strict=True)), demands[i].id),
    )
    bins: list[_Bin] = []
    for i in order:
        d = vecs[i]
        if not _fits(d, cap):
            continue
        for b in bins:
            if _fits(d, b.free):
                break
        else:
            b = _Bin(0, cap)
            bins.append(b)
        b.items.append(i)
        b.free = [f - x for f, x in zip(b.free, d, strict=True)]
    return [
        Bin(
            shape=shape,
            demand_ids=tuple(demands[i].id for i in b.items),
            used=_sum(demands[i].resources for i in b.items),
        )
        for b in bins
    ]


def lower_bound(demands: Sequence[Demand], capacity: Resources) -> int:
    """The fewest allocs of `capacity` that could hold the demands: max over dimensions of
    ceil(total demand / capacity), and at least 1 when there is any demand.

    Raises:
        ValueError: when the demands need a dimension the capacity lacks.
    """
    if not demands:
        return 0
    space = _Space([*(d.resources for d in demands), capacity])
    cap = space.vec(capacity)
    return _bins_needed(_total([space.vec(d.resources) for d in demands], len(cap)), cap)


def _bins_needed(total: Sequence[float], cap: _Vec) -> int:
    """max over dimensions of ceil(total / capacity), at least 1.

    Raises:
        ValueError: when the total needs a dimension the capacity lacks.
    """
    bound = 1
    for need, have in zip(total, cap, strict=True):
        if need <= _EPS:
            continue
        if have <= 0:
            raise ValueError("the demands need a dimension that the capacity lacks")
        bound = max(bound, math.ceil(need / have - _EPS))
    return bound


# -- plan --------------------------------------------------------------------------------------


# How many leftover items `_fill_pending` tries to fit by moving another item (bounded work).
_REPAIRS = 32


def _fill_pending(
    items: Sequence[Demand], vecs: Sequence[_Vec], bins: Sequence[_Bin], candidates: Sequence[int]
) -> set[int]:
    """Virtually put candidate items (in urgency order) into the room left in pending requests.

    Priority by priority, each request in turn takes the subset that fills it best (`_fill_bin`,
    as the packer fills a bin, so an item much longer than a request's tasks is not counted in
    it); then each leftover item gets one more chance, directly or by moving one item to
    another request (`_move_in`). Returns the items placed.
    """
    life = [_life(d) for d in items]
    placed: set[int] = set()
    if not bins or not candidates:
        return placed
    top = tuple(max(col) for col in zip(*(b.free for b in bins), strict=True))
    fitting = [i for i in candidates if _fits(vecs[i], top)]  # the others fit no request
    w = _weights(top)
    size = {i: _dot(vecs[i], w) for i in fitting}
    start = 0
    n = len(fitting)
    while start < n:
        end = start
        level = items[fitting[start]].priority
        while end < n and items[fitting[end]].priority == level:
            end += 1
        pool = sorted(fitting[start:end], key=lambda i: (-size[i], i))
        start = end
        for b in bins:
            if not pool:
                break
            taken = _fill_bin(b.life, b.free, pool, vecs, size, life, w)
            if taken:
                _put(b, taken, vecs)
                b.life = _longest(b.life, taken, life)
                placed.update(taken)
                pool = [i for i in pool if i not in placed]
    leftover = [i for i in fitting if i not in placed]
    for x in leftover[:_REPAIRS]:
        if _move_in(x, bins, vecs, life):
            placed.add(x)
    return placed


def _move_in(
    x: int, bins: Sequence[_Bin], vecs: Sequence[_Vec], life: Sequence[float | None] = ()
) -> bool:
    """Put item x into one of the bins, directly or by moving one item to another bin; not into
    a bin whose tasks x would outlive by more than a factor of 2 (`life`, when known)."""
    d = vecs[x]
    if life and (own := life[x]) is not None:
        bins = [b for b in bins if b.life is None or own <= 2 * b.life]
    for b in bins:
        if _fits(d, b.free):
            _put(b, [x], vecs)
            return True
    for a in bins:
        for pos, y in enumerate(a.items):
            room = [f + v for f, v in zip(a.free, vecs[y], strict=True)]
            if not _fits(d, room):
                continue
            for b in bins:
                if b is not a and _fits(vecs[y], b.free):
                    a.items[pos] = x
                    a.free = [f - v for f, v in zip(room, d, strict=True)]
                    _put(b, [y], vecs)
                    return True
    return False


def plan(
    unplaced: Sequence[Demand],
    pending: Sequence[PendingRequest],
    shapes: Sequence[AllocShape],
    *,
    min_alloc: Resources,
    max_new: int,
) -> Plan:
    """Turn demands that fit on no live alloc into alloc requests.

    Pending requests count at their full size, so that an event never makes the planner ask
    again for room it has asked for: the demands are first virtually put in them, and a pending
    request that receives none is no longer needed (`cancel`). In that order:

    1. a request that knows its demands (`demand_ids`) holds those still waiting;
    2. the most urgent demands are packed as if nothing were pending (`pack`), and a pending
       request holds each bin it is exactly the request for: packing is deterministic, so the
       requests made by an earlier call find their bins again;
    3. the bins left over are often the content of the requests left over, rearranged by what
       changed since: a bounded search (`_assign`) tries to fit all of it into them;
    4. whatever else fits in pending room goes there, priority by priority, each request
       taking the subset that fills it best.

    Measured on random mixed demands (tests), re-planning with the requests just made pending
    asks for nothing more, where filling pending requests first-fit in queue order asked again
    in three cases out of four. The rest are packed into new bins of the shapes on offer, at
    most `max_new`, the most urgent first. Each request asks for its bin's content, raised to
    `min_alloc` and clipped to the cheapest shape that holds the content, so that it is never
    more than some shape can give. Requests have `width=0`: a bin is already the content one
    alloc should get, and a wider request would be counted at its full size by the next call
    while the cluster may grant only `min`.

    Args:
        unplaced: the waiting demands that fit on no live alloc now.
        pending: the alloc requests made and not yet granted.
        shapes: the allocs the cluster offers.
        min_alloc: the least a request asks for in every dimension (clipped to the shape).
        max_new: how many new requests may be made now.
    """
    max_new = max(0, max_new)
    ordered = sorted(unplaced, key=_urgency)
    full = [p.requirements.full for p in pending]
    space = _Space(
        [*(d.resources for d in ordered), *full, *(s.resources for s in shapes), min_alloc]
    )
    vecs = [space.vec(d.resources) for d in ordered]
    lives = [_life(d) for d in ordered]
    held = [_Bin(j, space.vec(r)) for j, r in enumerate(full)]
    menu = _Menu(shapes, space) if shapes else None
    taken: set[int] = set()
    if any(p.demand_ids for p in pending):
        # Requests that know the demands they were made for hold those still waiting.
        index = {d.id: i for i, d in enumerate(ordered)}
        for p, b in zip(pending, held, strict=True):
            for did in p.demand_ids:
                i = index.get(did)
                if i is not None and i not in taken and _fits(vecs[i], b.free):
                    _put(b, [i], vecs)
                    b.life = _longest(b.life, [i], lives)
                    taken.add(i)
    spare: list[tuple[int, list[int]]] = []  # (shape, content): bins no pending request holds
    considered: list[int] = []
    if menu is not None:
        # Pack the most urgent demands as if nothing were pending, and let a pending request
        # hold each bin it is exactly the request for. Packing is deterministic, so the
        # requests a previous call made for these demands hold the bins they were made for;
        # only what changed since goes through the approximate fill below.
        considered = [
            i for i in _considered(vecs, menu, max_new + len(held), taken) if i not in taken
        ]
        bins = _pack(
            [ordered[i] for i in considered],
            [vecs[i] for i in considered],
            menu,
            max_new + len(held),
        )
        for b in bins:
            content = [considered[i] for i in b.items]
            request = _request(ordered, vecs, content, b.shape, menu, min_alloc)
            j = next(
                (
                    j
                    for j, p in enumerate(pending)
                    if not held[j].items and p.requirements == request
                ),
                None,
            )
            if j is None:
                spare.append((b.shape, content))
                continue
            _put(held[j], content, vecs)
            held[j].life = _longest(held[j].life, content, lives)
            taken.update(content)
    # The bins no request matched (something changed since the requests were made) are
    # often the content of the unmatched requests rearranged: look for an assignment of all
    # of it into them. Then pending room takes whatever else fits, most urgent first.
    late: set[int] = set()
    if spare and menu is not None:
        loose = [i for _, content in spare for i in content]
        free_bins = [b for b in held if not b.items]
        if free_bins and _assign(loose, free_bins, vecs, menu.w):
            late.update(loose)
    late |= _fill_pending(
        ordered, vecs, held, [i for i in range(len(ordered)) if i not in taken and i not in late]
    )
    taken |= late
    covered = [ordered[i].id for i in sorted(taken)]
    cancel = [p.id for p, b in zip(pending, held, strict=True) if not b.items]

    # New bins for the rest, at most max_new, most urgent first.
    requests: list[Requirements] = []
    request_demands: list[tuple[str, ...]] = []
    if menu is not None and max_new > 0:
        if any(i in late for _, content in spare for i in content):
            rest = [i for i in considered if i not in taken]
            spare = [
                (b.shape, [rest[i] for i in b.items])
                for b in _pack([ordered[i] for i in rest], [vecs[i] for i in rest], menu, max_new)
            ]
        for packed_in, content in spare[:max_new]:
            requests.append(_request(ordered, vecs, content, packed_in, menu, min_alloc))
            request_demands.append(tuple(ordered[i].id for i in content))
            covered.extend(request_demands[-1])
    return Plan(requests=requests, cancel=cancel, covered=covered, request_demands=request_demands)


# How many tries `_assign` may make: enough for the few bins one event rearranges.
_ASSIGN_BUDGET = 20_000


def _assign(items: Sequence[int], bins: Sequence[_Bin], vecs: Sequence[_Vec], w: _Vec) -> bool:
    """Put every item into the bins (and return True), or change nothing (and return False).

    A depth-first search, largest item first, that tries the bins it fits in from the fullest
    (best fit first), skipping a bin whose room left is the same as one already tried for that
    item, within `_ASSIGN_BUDGET` tries.
    """
    width = len(w)
    need = _total([vecs[i] for i in items], width)
    room = _total([tuple(b.free) for b in bins], width)
    if not _fits(need, room):
        return False  # more than all the room together: no assignment can exist
    order = sorted(items, key=lambda i: (-_dot(vecs[i], w), i))
    free = [list(b.free) for b in bins]
    where = [-1] * len(order)
    tries = 0
    k = 0
    nxt = [0] * len(order)  # the next bin to try for the item at each depth
    # The rooms already tried for the item at each depth: a bin with the same room left is
    # the same choice again.
    seen: list[set[tuple[float, ...]]] = [set() for _ in order]
    choices: list[list[int]] = [[] for _ in order]
    while 0 <= k < len(order):
        d = vecs[order[k]]
        if where[k] >= 0:  # back here after a failure deeper down: take it out again
            f = free[where[k]]
            for t, x in enumerate(d):
                f[t] += x
            where[k] = -1
        if nxt[k] == 0:
            # Best fit first: the bins with the least room left, where the item fits.
            tries += len(bins)
            choices[k] = sorted(
                (j for j in range(len(bins)) if _fits(d, free[j])),
                key=lambda j: (_dot(free[j], w), j),
            )
        options = choices[k]
        placed = False
        while nxt[k] < len(options) and tries < _ASSIGN_BUDGET:
            tries += 1
            j = options[nxt[k]]
            nxt[k] += 1
            f = free[j]
            key = tuple(f)
            if key in seen[k]:
                continue
            seen[k].add(key)
            for t, x in enumerate(d):
                f[t] -= x
            where[k] = j
            placed = True
            break
        if placed:
            k += 1
            if k < len(order):
                nxt[k] = 0
                seen[k] = set()
        else:
            if tries >= _ASSIGN_BUDGET:
                return False
            k -= 1
    if k < 0:
        return False
    for pos, i in enumerate(order):
        _put(bins[where[pos]], [i], vecs)
    return True


def _considered(
    vecs: Sequence[_Vec], menu: _Menu, bins: int, skip: set[int] | None = None
) -> list[int]:
    """The most urgent items that could fill `bins` of the largest bins, and that fit a shape.

    A bin holds items whose largest shares sum to at most the number of dimensions, so this
    is never fewer than the bins could take; the others wait for a later call (bounded work).
    """
    budget = float(bins * len(menu.w))
    chosen: list[int] = []
    if budget <= 0:
        return chosen
    for i, d in enumerate(vecs):
        if skip and i in skip:
            continue
        share = max((x * y for x, y in zip(d, menu.w, strict=True)), default=0.0)
        if math.isinf(share) or menu.opening(d) is None:
            continue
        chosen.append(i)
        budget -= share
        if budget < 0:
            break
    return chosen


def _total(vectors: Sequence[_Vec], width: int) -> _Vec:
    return tuple(sum(col) for col in zip(*vectors, strict=True)) if vectors else (0.0,) * width


def _request(
    items: Sequence[Demand],
    vecs: Sequence[_Vec],
    content: Sequence[int],
    packed_in: int,
    menu: _Menu,
    min_alloc: Resources,
) -> Requirements:
    """The request for one bin: its content raised to min_alloc, clipped to the cheapest shape
    that holds the content."""
    used = _total([vecs[i] for i in content], len(menu.w))
    shape = menu.shapes[menu.cheapest(used, packed_in)]
    total = _sum(items[i].resources for i in content)
    return Requirements(min=total.max(min_alloc).min(shape.resources))
