"""Helpers for users testing their own integrations: a cluster the test drives by hand.

`ManualCluster` hands every alloc request to the test, which grants or refuses it; each granted
`ManualAlloc` runs tasks until the test completes them, and its keepalive fails once the test
calls `fail()`.

    req = await cluster.next_request()
    alloc = req.grant(Resources(cpu=4, mem=8 * GiB))
    await sched.wait(task.id, TaskState.RUNNING)
    alloc.complete(task.id, exit_code=0)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import anyio

from .cluster.base import Alloc, Cluster, StartedCallback
from .errors import AllocationError, PackschedError
from .resources import AllocShape, Requirements, Resources
from .task import RuntimeStatistics, Task, TaskOutput, TaskResult

__all__ = ["ManualAlloc", "ManualCluster", "ManualRequest", "error_codes", "wait_until"]

_ids = itertools.count(1)


class ManualAlloc(Alloc):
    """An alloc whose tasks end when the test says so."""

    def __init__(self, resources: Resources, labels: Mapping[str, str]) -> None:
        self.id = f"manual-{next(_ids)}"
        self.resources = resources
        self.labels = dict(labels)
        self.freed = False
        self.failed = False
        self._running: dict[str, anyio.Event] = {}
        self._results: dict[str, TaskResult] = {}
        self._changed = anyio.Event()

    @property
    def task_ids(self) -> list[str]:
        """Ids of the tasks running here now, in the order they started."""
        return list(self._running)

    def complete(self, task_id: str, exit_code: int = 0, *, stderr: str = "") -> None:
        """End a running task with this exit code."""
        if task_id not in self._running:
            raise PackschedError(f"task {task_id} is not running on alloc {self.id}")
        self._results[task_id] = TaskResult(
            exit_code=exit_code,
            output=TaskOutput(runtime_statistics=RuntimeStatistics(cpu_count=self.resources.cpu)),
            stderr_tail=stderr,
        )
        self._running[task_id].set()

    def fail(self) -> None:
        """Make every keepalive from now on fail: the scheduler will find this alloc dead."""
        self.failed = True

    async def wait_running(self, count: int = 1, *, timeout: float = 10) -> list[str]:
        """Wait until at least `count` tasks run here; return their ids."""
        with anyio.fail_after(timeout):
            while len(self._running) < count:
                await self._changed.wait()
        return self.task_ids

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def run(self, task: Task, started: StartedCallback) -> TaskResult:
        if self.failed or self.freed:
            raise AllocationError(f"alloc {self.id} is gone")
        done = anyio.Event()
        self._running[task.id] = done
        started()
        self._notify()
        try:
            await done.wait()
            return self._results.pop(task.id)
        finally:
            self._running.pop(task.id, None)
            self._notify()

    async def keepalive(self) -> None:
        if self.failed:
            raise AllocationError(f"alloc {self.id} was failed by the test")

    async def free(self) -> None:
        self.freed = True


class ManualRequest:
    """One alloc request the test answers with `grant` or `refuse`."""

    def __init__(self, requirements: Requirements, labels: Mapping[str, str]) -> None:
        self.requirements = requirements
        self.labels = dict(labels)
        self.alloc: ManualAlloc | None = None
        self.refused: str | None = None
        self.cancelled = False
        self._answered = anyio.Event()

    def grant(self, resources: Resources | None = None) -> ManualAlloc:
        """Grant an alloc of these resources (default: exactly `requirements.min`)."""
        if self._answered.is_set():
            raise PackschedError("this request was already answered")
        self.alloc = ManualAlloc(resources or self.requirements.min, self.labels)
        self._answered.set()
        return self.alloc

    def refuse(self, reason: str = "refused by the test") -> None:
        """Make the allocation fail with this reason."""
        if self._answered.is_set():
            raise PackschedError("this request was already answered")
        self.refused = reason
        self._answered.set()


class ManualCluster(Cluster):
    """A cluster whose every alloc request is answered by the test."""

    def __init__(
        self,
        max_alloc: Resources | None = None,
        *,
        shapes: Sequence[AllocShape] | None = None,
    ) -> None:
        if shapes is None:
            if max_alloc is None:
                raise PackschedError("ManualCluster needs max_alloc or shapes")
            shapes = [AllocShape(resources=max_alloc)]
        self._shapes = list(shapes)
        self.requests: list[ManualRequest] = []
        self.allocs: list[ManualAlloc] = []
        self._seen = 0  # requests already handed to the test by next_request()
        self._arrived = anyio.Event()

    def shapes(self) -> Sequence[AllocShape]:
        return self._shapes

    async def next_request(self, *, timeout: float = 10) -> ManualRequest:
        """The next request the scheduler made that the test has not seen yet."""
        with anyio.fail_after(timeout):
            while True:
                while self._seen < len(self.requests):
                    request = self.requests[self._seen]
                    self._seen += 1
                    if not request.cancelled:
                        return request
                await self._arrived.wait()

    def pending_requests(self) -> list[ManualRequest]:
        """Requests not yet answered nor cancelled, oldest first."""
        return [r for r in self.requests if not r._answered.is_set() and not r.cancelled]

    async def allocate(self, requirements: Requirements, labels: Mapping[str, str]) -> Alloc:
        request = ManualRequest(requirements, labels)
        self.requests.append(request)
        self._arrived.set()
        self._arrived = anyio.Event()
        try:
            await request._answered.wait()
        except BaseException:
            request.cancelled = True
            raise
        if request.alloc is None:
            raise AllocationError(request.refused or "refused")
        self.allocs.append(request.alloc)
        return request.alloc


async def wait_until(
    predicate: Callable[[], object], *, timeout: float = 10, interval: float = 0.005
) -> None:
    """Poll `predicate()` until it is true, failing after `timeout` seconds (no bare sleeps)."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling a condition no event announces
            await anyio.sleep(interval)


def error_codes(task: Task) -> list[str]:
    """The error codes of a task's latest result."""
    return [e.code for e in (task.result.output.errors if task.result else [])]
