"""Task specs, task snapshots, the task states and the one table of allowed transitions."""

from __future__ import annotations

import math
import re
import secrets
from enum import StrEnum
from typing import Literal

import msgspec

from .errors import InvalidSpecError, InvalidTransition
from .resources import Resources

__all__ = [
    "Attempt",
    "ErrorCode",
    "RuntimeStatistics",
    "Task",
    "TaskError",
    "TaskOutput",
    "TaskResult",
    "TaskSpec",
    "TaskState",
    "check_transition",
    "decode_spec",
    "decode_specs",
    "is_settled",
    "is_task_id",
    "new_task_id",
    "stage",
]


class TaskState(StrEnum):
    """Where a task is in its life. Terminal: COMPLETE, FAILED, KILLED, SKIPPED."""

    WAITING = "waiting"
    HOLD = "hold"
    STAGING = "staging"
    RUNNING = "running"
    LOST = "lost"
    COMPLETE = "complete"
    ERROR = "error"
    FAILED = "failed"
    KILLED = "killed"
    SKIPPED = "skipped"


S = TaskState

# DESIGN §3, row by row: from -> {to: why}. Every state change goes through check_transition.
TRANSITIONS: dict[TaskState, dict[TaskState, str]] = {
    S.WAITING: {
        S.HOLD: "hold",
        S.STAGING: "placed",
        S.ERROR: "unschedulable",
        S.KILLED: "kill",
        S.SKIPPED: "dependency ended badly",
    },
    S.HOLD: {
        S.WAITING: "release",
        S.KILLED: "kill",
        S.SKIPPED: "dependency ended badly",
    },
    S.STAGING: {
        S.RUNNING: "started",
        S.LOST: "alloc died",
        S.ERROR: "could not start",
        S.KILLED: "kill",
    },
    S.RUNNING: {
        S.LOST: "alloc died",
        S.COMPLETE: "exit 0",
        S.ERROR: "exit != 0, timeout",
        S.KILLED: "kill",
    },
    S.LOST: {
        S.WAITING: "rescheduled (attempt+1)",
        S.FAILED: "attempts used up",
    },
    S.ERROR: {
        S.WAITING: "retry (attempt+1), auto retry",
        S.FAILED: "give up, aged out",
        S.KILLED: "kill",
    },
    S.COMPLETE: {},
    S.FAILED: {},
    S.KILLED: {},
    S.SKIPPED: {},
}

TERMINAL: frozenset[TaskState] = frozenset({S.COMPLETE, S.FAILED, S.KILLED, S.SKIPPED})
SETTLED: frozenset[TaskState] = TERMINAL | {S.ERROR}
# The order wait(id, state) uses: a task has reached `state` once its stage is at least that.
_STAGE: dict[TaskState, int] = {
    S.WAITING: 0,
    S.HOLD: 0,
    S.LOST: 0,
    S.STAGING: 1,
    S.RUNNING: 2,
    **dict.fromkeys(SETTLED, 3),
}


def check_transition(task_id: str, current: TaskState, target: TaskState, action: str) -> None:
    """Raise `InvalidTransition` unless the table allows `current -> target`."""
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(task_id, current.value, target.value, action)


def is_settled(state: TaskState) -> bool:
    """True for terminal states and ERROR (settled, though it can be retried)."""
    return state in SETTLED


def stage(state: TaskState) -> int:
    """The stage `wait(id, state)` compares: WAITING/HOLD < STAGING < RUNNING < settled."""
    return _STAGE[state]


ErrorCode = Literal[
    "unschedulable",
    "spawn-failed",
    "exit-status",
    "timeout",
    "lost",
    "killed",
    "dependency-failed",
    "invalid",
]


# The records below are `gc=False`: frozen values that never refer back to what holds them, so
# they cannot be part of a reference cycle. A daemon holds one Task per task it knows, and
# keeping them out of the cyclic collector's scans made a 100k-task run 7 % faster
# (bench/throughput.py).


class TaskError(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One thing that went wrong with an attempt: a stable `code` and a message for people."""

    code: ErrorCode
    message: str


class RuntimeStatistics(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False
):
    """What one attempt used, measured over its whole process tree (DESIGN §7)."""

    duration: float = 0.0
    cpu_time: float = 0.0
    memory: int = 0
    disk_space: int = 0
    available_memory: int = 0
    available_disk_space: int = 0
    cpu_count: float = 0.0


class TaskOutput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """The output of an attempt: its statistics, its errors, and why it was skipped."""

    runtime_statistics: RuntimeStatistics | None = None
    errors: list[TaskError] = []
    skip_reason: str | None = None


class TaskResult(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """How an attempt ended: the exit code (None when it never ran) and its output."""

    exit_code: int | None = None
    output: TaskOutput = TaskOutput()
    stdout_tail: str = ""
    stderr_tail: str = ""

    @property
    def error(self) -> TaskError | None:
        """The first error, if any."""
        return self.output.errors[0] if self.output.errors else None


_ID = re.compile(r"^[0-9a-f]{16}$")


def new_task_id() -> str:
    """A fresh task id: 16 lowercase hex digits."""
    return secrets.token_hex(8)


def is_task_id(value: str) -> bool:
    """True when `value` has the form of a task id."""
    return bool(_ID.match(value))


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """What a user submits. Validated on construction and on decode.

    Lower `priority` runs first. `after` lists ids of tasks that must COMPLETE first. `key`
    makes a submit idempotent: a second submit with the same key returns the first task.
    `kind` groups runs of the same job for statistics and defaults to `name`.
    """

    command: list[str]
    resources: Resources = Resources()
    priority: int = 0
    name: str | None = None
    kind: str | None = None
    env: dict[str, str] = {}
    cwd: str | None = None
    labels: dict[str, str] = {}
    run: str | None = None
    after: list[str] = []
    expected_duration: float | None = None
    timeout: float | None = None
    retries: int = 0
    max_lost: int = 5
    hold: bool = False
    key: str | None = None

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("command must not be empty")
        if not self.command[0]:
            raise ValueError("command[0] (the program) must not be empty")
        for i, arg in enumerate(self.command):
            if "\0" in arg:
                raise ValueError(f"command[{i}] must not contain a NUL byte")
        for i, dep in enumerate(self.after):
            if not is_task_id(dep):
                raise ValueError(f"after[{i}] must be a task id (16 hex digits), got {dep!r}")
        for name in ("expected_duration", "timeout"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.max_lost < 1:
            raise ValueError(f"max_lost must be >= 1, got {self.max_lost}")
        if isinstance(self.priority, bool):
            raise ValueError("priority must be an integer")
        if self.kind is None and self.name is not None:
            msgspec.structs.force_setattr(self, "kind", self.name)

    def display_name(self) -> str:
        """The name, else the program."""
        return self.name or self.command[0]


_spec_decoder = msgspec.json.Decoder(TaskSpec)
_specs_decoder = msgspec.json.Decoder(list[TaskSpec])


def _invalid(exc: msgspec.ValidationError | msgspec.DecodeError) -> InvalidSpecError:
    text = str(exc)
    path = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
    return InvalidSpecError(text, path=path)


def decode_spec(data: bytes | str) -> TaskSpec:
    """Decode one TaskSpec from JSON; errors keep msgspec's JSON path."""
    try:
        return _spec_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _invalid(exc) from None


def decode_specs(data: bytes | str) -> list[TaskSpec]:
    """Decode a JSON list of TaskSpecs; errors keep msgspec's JSON path (`$[3].resources`)."""
    try:
        return _specs_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _invalid(exc) from None


class Task(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A snapshot of the scheduler's record of one submitted spec, as the store holds it.

    `seq` orders submissions (first in, first out within a priority); `lost_count` and
    `retries_used` count toward `max_lost` and `retries`.
    """

    id: str
    spec: TaskSpec
    state: TaskState
    attempt: int = 0
    alloc_id: str | None = None
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: TaskResult | None = None
    lost_count: int = 0
    retries_used: int = 0
    state_changed_at: float = 0.0
    seq: int = 0

    @property
    def settled(self) -> bool:
        """True when terminal or ERROR."""
        return self.state in SETTLED

    @property
    def error(self) -> TaskError | None:
        """The first error of the latest result, if any."""
        return self.result.error if self.result else None


class Attempt(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One finished attempt of a task, as the history keeps it."""

    task_id: str
    attempt: int
    state: TaskState
    kind: str | None = None
    run: str | None = None
    alloc_id: str | None = None
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: TaskResult | None = None
