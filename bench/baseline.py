"""The reference design's packing policy, faults included, for the benchmarks to compare against.

DESIGN §5 lists what the reference design gets wrong; this policy reproduces each fault that a
trace can show, with the same `place` / `plan` signatures as `packsched.packing`, so the same
Scheduler and SimCluster can run it side by side with the real policy:

- a pending alloc request is counted by its minimum only, so every new event (a submit, a task
  ending, an alloc arriving) asks for yet another alloc while demand is left over;
- one request is sized to the largest waiting task in every dimension;
- head-of-line blocking: the first task that fits no alloc stops the placement pass;
- ordering and room choice ignore disk and GPU (first fit by alloc age, FIFO by priority).

Fit itself still checks every dimension: a simulated alloc does not enforce its capacity, so a
baseline that overcommitted would look cheaper than anything real could be.
"""

from __future__ import annotations

from collections.abc import Sequence

from packsched.packing import Demand, PendingRequest, Placement, Plan, Room
from packsched.resources import AllocShape, Requirements, Resources

__all__ = ["ReferencePolicy"]


class ReferencePolicy:
    """The reference design's placement and alloc planning (see the module docstring)."""

    def place(
        self,
        demands: Sequence[Demand],
        rooms: Sequence[Room],
        *,
        can_grow: bool = True,
        **ignored: object,
    ) -> Placement:
        """First fit in FIFO order within priority; stop at the first demand that fits nowhere
        (the shapes on offer and the alloc overhead play no part)."""
        ordered = sorted(demands, key=lambda d: (d.priority, d.order, d.id))
        free = [r.free for r in rooms]
        assignments: list[tuple[str, str]] = []
        unplaced: list[Demand] = []
        for k, demand in enumerate(ordered):
            for i, room in enumerate(rooms):
                if demand.resources.fits_in(free[i]):
                    free[i] = free[i] - demand.resources
                    assignments.append((demand.id, room.id))
                    break
            else:
                # Head-of-line blocking: nothing behind the first misfit is even tried.
                unplaced.extend(ordered[k:])
                break
        return Placement(assignments=assignments, unplaced=unplaced, reserved={})

    def plan(
        self,
        unplaced: Sequence[Demand],
        pending: Sequence[PendingRequest],
        shapes: Sequence[AllocShape],
        *,
        min_alloc: Resources,
        max_new: int,
    ) -> Plan:
        """Ask for one more alloc, sized to the largest task, whenever pending minimums fall short.

        Pending requests are never cancelled: the reference design has no notion of a request
        that is no longer needed.
        """
        ordered = sorted(unplaced, key=lambda d: (d.priority, d.order, d.id))
        # Each pending request is counted by its minimum only: whatever fits in that is covered.
        room = [p.requirements.min for p in pending]
        covered: list[str] = []
        rest: list[Demand] = []
        for demand in ordered:
            for i, free in enumerate(room):
                if demand.resources.fits_in(free):
                    room[i] = free - demand.resources
                    covered.append(demand.id)
                    break
            else:
                rest.append(demand)
        requests: list[Requirements] = []
        if rest and max_new > 0 and shapes:
            largest = Resources()
            for demand in rest:
                largest = largest.max(demand.resources)
            # The reference design would ask for the impossible and stall for good; falling
            # back to the head task alone keeps the replay finite (and flatters the baseline).
            size = rest[0].resources
            for candidate in (largest.max(min_alloc), largest):
                if any(candidate.fits_in(s.resources) for s in shapes):
                    size = candidate
                    break
            requests.append(Requirements(min=size, width=len(rest) - 1))
            covered.extend(d.id for d in rest)
        return Plan(requests=requests, cancel=[], covered=covered)
