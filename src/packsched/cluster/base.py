"""The Cluster and Alloc protocols: where allocs come from and what an alloc does.

A Cluster grants allocs; an Alloc runs tasks, reports their results, keeps its lease alive and
frees itself. The scheduler drives both and knows nothing else of a provider.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence

from ..resources import AllocShape, Requirements, Resources
from ..task import Task, TaskResult

__all__ = ["Alloc", "Cluster", "StartedCallback"]

StartedCallback = Callable[[], None]


class Alloc(abc.ABC):
    """A lease on resources from a Cluster. It runs tasks and must be kept alive.

    Attributes:
        id: unique among all allocs of the cluster, stable across daemon restarts.
        resources: what the lease holds (at least what was asked for).
        labels: the labels it was allocated with, plus the provider's own.
    """

    id: str
    resources: Resources
    labels: Mapping[str, str]

    @abc.abstractmethod
    async def run(self, task: Task, started: StartedCallback) -> TaskResult:
        """Run one attempt of `task` to its end and return its result.

        Calls `started()` once, when the command is running. A result returned without
        `started()` having been called means the command could not start (the result's errors
        say why, code `spawn-failed`). Cancellation kills the attempt and its whole process
        tree before re-raising; the cleanup runs shielded.
        """

    async def attach(self, task: Task, started: StartedCallback) -> TaskResult:
        """Wait for an attempt that was already running here before the daemon restarted.

        The default cannot re-attach and raises `LookupError`; the task is then LOST.
        """
        raise LookupError(f"alloc {self.id} cannot re-attach task {task.id}")

    @abc.abstractmethod
    async def keepalive(self) -> None:
        """Renew the lease. Raise (any exception) if it cannot be renewed: the alloc is dead."""

    @abc.abstractmethod
    async def free(self) -> None:
        """Give the lease back. Must be safe to call once on a dead alloc too."""


class Cluster(abc.ABC):
    """The provider of allocs."""

    @abc.abstractmethod
    async def allocate(self, requirements: Requirements, labels: Mapping[str, str]) -> Alloc:
        """Return an alloc holding at least `requirements.min`, or raise.

        It may hold up to `requirements.full`. Cancellation abandons the request (and releases
        anything half-granted).
        """

    @abc.abstractmethod
    def shapes(self) -> Sequence[AllocShape]:
        """The shapes of alloc on offer, each with its capacity and price; never empty."""

    def can_allocate(self, resources: Resources) -> bool:
        """Whether any alloc this cluster could ever grant would hold `resources`."""
        return any(resources.fits_in(shape.resources) for shape in self.shapes())

    def can_grow(self) -> bool:
        """Whether a new alloc could be granted soon. False when the cluster is full now (a
        request is already waiting for room), so the scheduler holds rooms for big waiting
        tasks instead of letting small ones starve them."""
        return True

    def max_alloc(self) -> Resources:
        """The largest alloc on offer in every dimension (for messages, not for planning)."""
        largest = Resources()
        for shape in self.shapes():
            largest = largest.max(shape.resources)
        return largest

    async def reattach(
        self, alloc_id: str, resources: Resources, labels: Mapping[str, str]
    ) -> Alloc | None:
        """After a restart, get back an alloc the previous daemon held, or None if it is gone.

        The default re-attaches nothing: the tasks that were on it become LOST.
        """
        return None

    async def aclose(self) -> None:  # noqa: B027 - an optional hook with a no-op default
        """Release whatever the cluster itself holds (not the allocs: the scheduler frees those)."""
