"""Records for the store tests: tasks, attempts and allocs numbered by `n`."""

from __future__ import annotations

from packsched.resources import GiB, Resources
from packsched.store import AllocRecord
from packsched.task import (
    Attempt,
    RuntimeStatistics,
    Task,
    TaskError,
    TaskOutput,
    TaskResult,
    TaskSpec,
    TaskState,
)


def task_id(n: int) -> str:
    """The id of task number `n`."""
    return f"{n:016x}"


def make_task(
    n: int,
    state: TaskState = TaskState.WAITING,
    *,
    kind: str | None = "align",
    run: str | None = "run-1",
    key: str | None = None,
    at: float | None = None,
    attempt: int = 0,
    result: TaskResult | None = None,
) -> Task:
    """Task number `n` (id and seq from `n`) in `state`, changed at time `at`."""
    changed = 1000.0 + n if at is None else at
    return Task(
        id=task_id(n),
        spec=TaskSpec(
            command=["echo", str(n)],
            resources=Resources(cpu=1, mem=1 * GiB),
            name=kind,
            run=run,
            key=key,
            labels={"n": str(n)},
        ),
        state=state,
        attempt=attempt,
        submitted_at=1000.0,
        state_changed_at=changed,
        finished_at=changed if state.value in {"complete", "error", "failed"} else None,
        result=result,
        seq=n,
    )


def make_attempt(
    n: int,
    attempt: int = 0,
    state: TaskState = TaskState.COMPLETE,
    *,
    kind: str | None = "align",
    run: str | None = "run-1",
    finished_at: float = 2000.0,
) -> Attempt:
    """Attempt `attempt` of task `n`, ended in `state` at `finished_at`, with statistics."""
    errors = [] if state is TaskState.COMPLETE else [TaskError(code="exit-status", message="x")]
    return Attempt(
        task_id=task_id(n),
        attempt=attempt,
        state=state,
        kind=kind,
        run=run,
        alloc_id="alloc-1",
        submitted_at=1000.0,
        started_at=finished_at - 1,
        finished_at=finished_at,
        result=TaskResult(
            exit_code=0 if state is TaskState.COMPLETE else 1,
            output=TaskOutput(
                runtime_statistics=RuntimeStatistics(duration=1.0, memory=(n + 1) * 1000),
                errors=errors,
            ),
        ),
    )


def make_alloc(name: str, *, freed_at: float | None = None) -> AllocRecord:
    """An alloc record, freed at `freed_at` if given."""
    return AllocRecord(
        id=name,
        resources=Resources(cpu=4, mem=8 * GiB),
        labels={"zone": "a"},
        created_at=900.0,
        freed_at=freed_at,
    )
