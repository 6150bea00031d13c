"""The HTTP API's wire types: request and response bodies, error bodies, run states.

Requests accept resources in people's units (`"500m"`, `"4GiB"`) as well as base-unit numbers;
`WireTaskSpec.to_spec` turns them into the numbers-only `TaskSpec`. Every fault is reported
with its JSON path (`$.tasks[3].resources.mem`), whether msgspec finds it while decoding or
the spec's own checks find it afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Literal

import msgspec

from ..errors import InvalidSpecError
from ..resources import Resources, parse_bytes, parse_cpu
from ..task import Attempt, Task, TaskSpec, TaskState, is_task_id

__all__ = [
    "ErrorBody",
    "ErrorDetail",
    "HistoryResponse",
    "PriorityRequest",
    "RunDetail",
    "RunKillResponse",
    "RunList",
    "RunState",
    "RunSummary",
    "SubmitRequest",
    "SubmitResponse",
    "TaskList",
    "WaitRequest",
    "WaitResponse",
    "WireResources",
    "WireTaskSpec",
    "decode_error",
    "run_state",
    "split_path",
    "summarize_run",
]


# -- requests --------------------------------------------------------------------------------


class WireResources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Resources as people write them: numbers in base units, or strings with units."""

    cpu: float | str = 0
    mem: int | float | str = 0
    disk: int | float | str = 0
    gpu: int | float | str = 0
    extra: dict[str, float | str] = {}

    def to_resources(self, path: str) -> Resources:
        """Parse every quantity; raise `InvalidSpecError` at `path.<field>` for a bad one."""
        gpu = parse_cpu(self.gpu, field=f"{path}.gpu")
        if not gpu.is_integer():
            raise InvalidSpecError(
                f"{path}.gpu must be a whole number of devices, got {self.gpu!r}",
                path=f"{path}.gpu",
            )
        extra: dict[str, float] = {}
        for name, value in self.extra.items():
            where = f"{path}.extra.{name}"
            if not name:
                raise InvalidSpecError(
                    f"{path}.extra: a resource name must not be empty", path=where
                )
            extra[name] = _parsed(parse_cpu, value, where)
        return Resources(
            cpu=_parsed(parse_cpu, self.cpu, f"{path}.cpu"),
            mem=_parsed(parse_bytes, self.mem, f"{path}.mem"),
            disk=_parsed(parse_bytes, self.disk, f"{path}.disk"),
            gpu=int(gpu),
            extra=extra,
        )


def _parsed(parse: Any, value: str | float, path: str) -> Any:
    # parse_cpu / parse_bytes name the field in their message; here it is the JSON path.
    try:
        return parse(value, field=path)
    except InvalidSpecError as exc:
        raise InvalidSpecError(str(exc), path=path) from None


class WireTaskSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A `TaskSpec` on the wire; only `resources` differs (it accepts units)."""

    command: list[str]
    resources: WireResources = WireResources()
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

    def to_spec(self, path: str = "$") -> TaskSpec:
        """The validated `TaskSpec`; a fault raises `InvalidSpecError` with its JSON path."""
        resources = self.resources.to_resources(f"{path}.resources")
        fields = {f: getattr(self, f) for f in self.__struct_fields__ if f != "resources"}
        try:
            return TaskSpec(resources=resources, **fields)
        except (ValueError, TypeError) as exc:
            # TaskSpec's checks start their message with the field they are about.
            message = str(exc)
            match = _LEADING_FIELD.match(message)
            where = path
            if match and match.group(1) in self.__struct_fields__:
                where = f"{path}.{match.group(0)}"
            raise InvalidSpecError(f"{where}: {message}", path=where) from None


_LEADING_FIELD = re.compile(r"^([a-z_]+)(?:\[\d+\])?")


class SubmitRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /v1/tasks`: a batch of specs, accepted all together or not at all."""

    tasks: list[WireTaskSpec]


class WaitRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /v1/wait`: long-poll until all (or the first) of `ids` settle, up to `timeout`
    seconds (capped by the server's `max_wait`)."""

    ids: list[str]
    return_when: Literal["all", "first"] = "all"
    timeout: float | None = None

    def check(self) -> None:
        """Raise `InvalidSpecError` at the path of a malformed id or timeout."""
        for i, task_id in enumerate(self.ids):
            if not is_task_id(task_id):
                raise InvalidSpecError(
                    f"ids[{i}] must be a task id (16 hex digits), got {task_id!r}",
                    path=f"$.ids[{i}]",
                )
        if self.timeout is not None and not 0 <= self.timeout < float("inf"):
            raise InvalidSpecError(
                f"timeout must be a finite number of seconds >= 0, got {self.timeout!r}",
                path="$.timeout",
            )


class PriorityRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /v1/tasks/{id}/priority`: the new priority (lower runs first)."""

    priority: int


# -- responses -------------------------------------------------------------------------------


class SubmitResponse(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The tasks of a submit, in the order of the request (existing ones for repeated keys)."""

    tasks: list[Task]


class WaitResponse(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The settled tasks among those asked for, the ids still unsettled, and whether the wait
    ended because its time ran out."""

    tasks: list[Task]
    pending: list[str]
    timed_out: bool


class TaskList(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One page of tasks in submission order; pass `next_cursor` as `after` for the next."""

    tasks: list[Task]
    next_cursor: int | None = None


class RunState(StrEnum):
    """A run's state, derived from its tasks' states by `run_state`."""

    PENDING = "pending"
    RUNNING = "running"
    HELD = "held"
    ERROR = "error"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"


class RunSummary(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One run: its derived state and how many of its tasks are in each state."""

    run: str
    state: RunState
    total: int
    counts: dict[TaskState, int]
    submitted_at: float
    finished_at: float | None = None


class RunDetail(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One run and its tasks in submission order."""

    summary: RunSummary
    tasks: list[Task]


class RunList(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every run the daemon knows, oldest first."""

    runs: list[RunSummary]


class RunKillResponse(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A killed run: its summary afterwards and the ids that were killed."""

    summary: RunSummary
    killed: list[str]


class HistoryResponse(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Finished attempts, oldest first."""

    attempts: list[Attempt]


class ErrorDetail(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """What went wrong: a stable `code`, a message for people, and where.

    `path` is the JSON path (or `query.<name>`) of the fault in the request. An
    `invalid-transition` also names the task and both states.
    """

    code: str
    message: str
    path: str | None = None
    task_id: str | None = None
    current: str | None = None
    target: str | None = None
    action: str | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every 4xx and 5xx body: `{"error": {...}}`."""

    error: ErrorDetail


# -- run states ------------------------------------------------------------------------------

_ACTIVE = frozenset({TaskState.STAGING, TaskState.RUNNING})
_QUEUED = frozenset({TaskState.WAITING, TaskState.LOST})
_DONE = frozenset({TaskState.COMPLETE, TaskState.SKIPPED})


def run_state(states: Iterable[TaskState]) -> RunState:
    """Derive a run's state from its tasks' states.

    Any FAILED -> FAILED; else any KILLED -> CANCELED; else any staging or running -> RUNNING;
    else any ERROR -> ERROR (it waits for a retry or a kill); else all complete (or skipped)
    -> DONE; else queued work with some already settled -> RUNNING (the run is under way);
    queued work and nothing settled -> PENDING; only held work left -> HELD.
    """
    seen = set(states)
    if TaskState.FAILED in seen:
        return RunState.FAILED
    if TaskState.KILLED in seen:
        return RunState.CANCELED
    if seen & _ACTIVE:
        return RunState.RUNNING
    if TaskState.ERROR in seen:
        return RunState.ERROR
    if seen <= _DONE:
        return RunState.DONE
    if seen & _QUEUED:
        return RunState.RUNNING if seen & _DONE else RunState.PENDING
    return RunState.HELD


def summarize_run(run: str, tasks: list[Task]) -> RunSummary:
    """A run's summary from its tasks (at least one)."""
    counts: dict[TaskState, int] = {}
    for task in tasks:
        counts[task.state] = counts.get(task.state, 0) + 1
    state = run_state(counts)
    finished = [t.finished_at or t.state_changed_at for t in tasks]
    settled = state in (RunState.DONE, RunState.FAILED, RunState.CANCELED) and all(
        t.settled for t in tasks
    )
    return RunSummary(
        run=run,
        state=state,
        total=len(tasks),
        counts=counts,
        submitted_at=min(t.submitted_at for t in tasks),
        finished_at=max(finished) if settled else None,
    )


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.DOTALL)


def split_path(text: str) -> tuple[str, str | None]:
    """Split msgspec's `message - at `$.path`` into the message and the path (None if absent)."""
    match = _AT.match(text)
    assert match is not None  # the pattern matches any text
    return match.group("msg"), match.group("path")


def decode_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> InvalidSpecError:
    """msgspec's error as an `InvalidSpecError` whose path is the JSON path of the fault."""
    message, at = split_path(str(exc))
    path = at or "$"
    message = message.replace("`", "")
    if not isinstance(exc, msgspec.ValidationError):
        message = f"malformed JSON: {message[:1].lower()}{message[1:]}"
    elif message.startswith("Object contains unknown field"):
        path = f"{path}.{message.rsplit(' ', 1)[-1]}"
        message = f"{path}: unknown field"
    else:
        message = f"{path}: {message[:1].lower()}{message[1:]}"
    return InvalidSpecError(message, path=path)
