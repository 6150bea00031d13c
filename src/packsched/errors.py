"""The exceptions packsched raises; all of them are `PackschedError`s."""

from __future__ import annotations

__all__ = [
    "AllocationError",
    "InvalidSpecError",
    "InvalidTransition",
    "PackschedError",
    "StoreError",
    "TaskNotFoundError",
]


class PackschedError(Exception):
    """The base of every error packsched raises on purpose."""


class InvalidSpecError(PackschedError, ValueError):
    """A task spec, resource quantity or config value is malformed.

    The message names the field (as a JSON path where there is one) and what is wrong.
    """

    def __init__(self, message: str, *, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


class InvalidTransition(PackschedError):
    """A control asked for a state change the transition table does not allow."""

    def __init__(self, task_id: str, current: str, target: str, action: str) -> None:
        super().__init__(
            f"cannot {action} task {task_id}: it is {current}, and {current} -> {target} "
            f"is not allowed"
        )
        self.task_id = task_id
        self.current = current
        self.target = target
        self.action = action


class TaskNotFoundError(PackschedError, KeyError):
    """No task has this id."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"no task has id {self.task_id!r}"


class AllocationError(PackschedError):
    """A cluster could not grant an alloc (refused, timed out or failed to start)."""


class StoreError(PackschedError):
    """The durable store cannot be opened or written: corrupt, foreign, newer, or locked."""
