"""SimCluster: simulated allocs with shapes, prices, a start-up delay and fault injection.

Tasks "run" for their `expected_duration` (or a default) on the scheduler's clock, so with a
virtual-time event loop hours of work replay in seconds. The cluster keeps the bill: every
alloc's resource-seconds and price-seconds, from the moment it was granted to its free.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import anyio
import msgspec

from ..clock import Clock
from ..errors import AllocationError
from ..resources import AllocShape, Requirements, Resources
from ..task import RuntimeStatistics, Task, TaskOutput, TaskResult
from .base import Alloc, Cluster, StartedCallback

__all__ = ["SimAlloc", "SimCluster", "SimUsage"]


class SimUsage(msgspec.Struct, frozen=True, kw_only=True):
    """The bill so far: allocs started and the resource-seconds and price-seconds they held."""

    allocs_started: int
    allocs_live: int
    cpu_seconds: float
    mem_byte_seconds: float
    gpu_seconds: float
    cost: float
    executions: int


def _price(shape: AllocShape, largest: Resources) -> float:
    if shape.price is not None:
        return shape.price
    # No price given: proportional to the shape's size, as the sum of its shares of the largest.
    return sum(v for v in shape.resources.shares(largest).values() if math.isfinite(v))


class SimAlloc(Alloc):
    """A simulated alloc. Tasks sleep for their expected duration and exit with 0 (or as told)."""

    def __init__(
        self, cluster: SimCluster, shape: AllocShape, labels: Mapping[str, str], n: int
    ) -> None:
        self.id = f"sim-{n}"
        self.resources = shape.resources
        self.labels = {**labels, "shape": shape.name} if shape.name else dict(labels)
        self.shape = shape
        self.dead = False
        self.freed = False
        self._cluster = cluster
        self.started_at = cluster.clock.monotonic()
        self.running: set[str] = set()

    async def run(self, task: Task, started: StartedCallback) -> TaskResult:
        if self.dead or self.freed:
            raise AllocationError(f"alloc {self.id} is dead")
        clock = self._cluster.clock
        begin = clock.monotonic()
        self.running.add(task.id)
        started()
        try:
            duration = task.spec.expected_duration or self._cluster.default_duration
            if duration > 0:
                await clock.sleep(duration)
            exit_code = self._cluster.exit_code(task)
            self._cluster.executions.append((task.id, task.attempt))
            if self._cluster.on_execute is not None:
                self._cluster.on_execute(task)
        finally:
            self.running.discard(task.id)
        elapsed = clock.monotonic() - begin
        stats = RuntimeStatistics(
            duration=elapsed,
            cpu_time=elapsed * task.spec.resources.cpu,
            memory=task.spec.resources.mem,
            available_memory=self.resources.mem,
            available_disk_space=self.resources.disk,
            cpu_count=self.resources.cpu,
        )
        return TaskResult(exit_code=exit_code, output=TaskOutput(runtime_statistics=stats))

    async def keepalive(self) -> None:
        if self.dead:
            raise AllocationError(f"alloc {self.id} was killed by fault injection")

    async def free(self) -> None:
        if not self.freed:
            self.freed = True
            self._cluster._bill(self)


class SimCluster(Cluster):
    """A simulated cluster.

    Args:
        shapes: the menu of alloc shapes (capacity and price); default one 64-cpu/256-GiB shape.
        startup_delay: seconds from an allocate call to the alloc being ready.
        default_duration: how long a task without `expected_duration` runs.
        max_allocs: how many live allocs the cluster holds at most (None: unbounded); beyond
            it, allocate waits for one to be freed.
        exit_code: decides each task's exit code (default 0).
        clock: the clock tasks run on (share the scheduler's for virtual time).
    """

    def __init__(
        self,
        shapes: Sequence[AllocShape] | None = None,
        *,
        startup_delay: float = 0.0,
        default_duration: float = 0.0,
        max_allocs: int | None = None,
        exit_code: Callable[[Task], int] | None = None,
        on_execute: Callable[[Task], None] | None = None,
        clock: Clock | None = None,
    ) -> None:
        from ..resources import GiB

        self._shapes = list(
            shapes or [AllocShape(resources=Resources(cpu=64, mem=256 * GiB, disk=1024 * GiB))]
        )
        if not self._shapes:
            raise ValueError("SimCluster needs at least one shape")
        self.startup_delay = startup_delay
        self.default_duration = default_duration
        self.max_allocs = max_allocs
        self.exit_code: Callable[[Task], int] = exit_code or (lambda task: 0)
        self.on_execute = on_execute
        self.clock = clock or Clock()
        self.allocs: dict[str, SimAlloc] = {}
        self.executions: list[tuple[str, int]] = []
        self._refuse: list[str] = []
        self._ids = itertools.count(1)
        self._freed = anyio.Event()
        self._largest = Resources()
        for shape in self._shapes:
            self._largest = self._largest.max(shape.resources)
        self._billed = [0.0, 0.0, 0.0, 0.0]  # cpu-s, mem-byte-s, gpu-s, cost
        self._started = 0
        self._waiting = 0

    def shapes(self) -> Sequence[AllocShape]:
        return self._shapes

    def can_grow(self) -> bool:
        """False while a request waits for an alloc to be freed (at `max_allocs`)."""
        return self._waiting == 0

    def live(self) -> list[SimAlloc]:
        """Allocs granted and not yet freed."""
        return [a for a in self.allocs.values() if not a.freed]

    def refuse_next(self, count: int = 1, reason: str = "refused by fault injection") -> None:
        """Make the next `count` allocate calls fail."""
        self._refuse.extend([reason] * count)

    def kill(self, alloc_id: str) -> None:
        """Fault injection: the alloc's keepalive fails from now on."""
        self.allocs[alloc_id].dead = True

    async def allocate(self, requirements: Requirements, labels: Mapping[str, str]) -> Alloc:
        if self._refuse:
            raise AllocationError(self._refuse.pop(0))
        fitting = [s for s in self._shapes if requirements.min.fits_in(s.resources)]
        if not fitting:
            raise AllocationError(
                f"no shape holds {requirements.min.describe()}; the largest is {self._largest.describe()}"
            )
        shape = min(fitting, key=lambda s: (_price(s, self._largest), s.name))
        self._waiting += 1
        try:
            while self.max_allocs is not None and len(self.live()) >= self.max_allocs:
                await self._freed.wait()
        finally:
            self._waiting -= 1
        if self.startup_delay > 0:
            await self.clock.sleep(self.startup_delay)
        alloc = SimAlloc(self, shape, labels, next(self._ids))
        self.allocs[alloc.id] = alloc
        self._started += 1
        return alloc

    def _bill(self, alloc: SimAlloc) -> None:
        held = self.clock.monotonic() - alloc.started_at
        self._billed[0] += held * alloc.resources.cpu
        self._billed[1] += held * alloc.resources.mem
        self._billed[2] += held * alloc.resources.gpu
        self._billed[3] += held * _price(alloc.shape, self._largest)
        self._freed.set()
        self._freed = anyio.Event()

    def usage(self) -> SimUsage:
        """The bill so far, counting live allocs up to now."""
        cpu, mem, gpu, cost = self._billed
        now = self.clock.monotonic()
        for a in self.live():
            held = now - a.started_at
            cpu += held * a.resources.cpu
            mem += held * a.resources.mem
            gpu += held * a.resources.gpu
            cost += held * _price(a.shape, self._largest)
        return SimUsage(
            allocs_started=self._started,
            allocs_live=len(self.live()),
            cpu_seconds=cpu,
            mem_byte_seconds=mem,
            gpu_seconds=gpu,
            cost=cost,
            executions=len(self.executions),
        )
