"""How the stores turn tasks, attempts and allocs into rows: a msgpack blob plus the columns
that queries filter on.

Both stores use the same encoding, so a test against `MemoryStore` also proves that every
record survives the round trip that `SQLiteStore` puts it through.
"""

from __future__ import annotations

import msgspec

from ..errors import InvalidSpecError
from ..task import SETTLED, Attempt, Task
from .base import AllocRecord, HistoryQuery

__all__ = [
    "attempt_ended_at",
    "check_query",
    "decode_alloc",
    "decode_attempt",
    "decode_task",
    "encode",
    "matches",
    "task_settled_at",
]

# One encoder for every record type, one decoder per type (msgspec reuses their buffers).
_encoder = msgspec.msgpack.Encoder()
_task_decoder = msgspec.msgpack.Decoder(Task)
_attempt_decoder = msgspec.msgpack.Decoder(Attempt)
_alloc_decoder = msgspec.msgpack.Decoder(AllocRecord)

encode = _encoder.encode
decode_task = _task_decoder.decode
decode_attempt = _attempt_decoder.decode
decode_alloc = _alloc_decoder.decode


def task_settled_at(task: Task) -> float | None:
    """When the task settled (the time of its last change), or None while it is unsettled."""
    if task.state not in SETTLED:
        return None
    return task.state_changed_at or task.finished_at or task.submitted_at


def attempt_ended_at(attempt: Attempt) -> float:
    """The time an attempt ended, which history's time range and order use.

    An attempt that never started (lost while staging, unschedulable) falls back to the
    latest time it has.
    """
    return attempt.finished_at or attempt.started_at or attempt.submitted_at


def check_query(query: HistoryQuery) -> None:
    """Reject a query no store can answer, naming the field."""
    if query.limit is not None and query.limit < 0:
        raise InvalidSpecError(f"limit must be >= 0, got {query.limit}", path="$.limit")


def matches(query: HistoryQuery, attempt: Attempt, ended_at: float) -> bool:
    """Whether `attempt` passes every filter set in `query` (`limit` aside).

    The time range is half-open on the time the attempt ended: `since <= ended < until`.
    """
    return (
        (query.task_id is None or attempt.task_id == query.task_id)
        and (query.kind is None or attempt.kind == query.kind)
        and (query.run is None or attempt.run == query.run)
        and (query.state is None or attempt.state == query.state)
        and (query.since is None or ended_at >= query.since)
        and (query.until is None or ended_at < query.until)
    )
