"""The async engine: queues, placement passes, alloc lifecycle, keepalive and lost tasks.

One `Scheduler` owns every task and alloc record. All changes happen on the event loop, through
`_transition`, which checks the state table and queues the new snapshot for the store. A
committer writes each step's changes as one batch and only then publishes them: `get`, `wait`
and `stats` show what the store holds, never more (durable before visible).

Placement and alloc planning are pure functions in `packing.py`; this module turns events into
their inputs and their outputs into actions.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, Self

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskGroup

from . import packing
from .clock import Clock
from .cluster.base import Alloc, Cluster
from .errors import InvalidSpecError, InvalidTransition, PackschedError, TaskNotFoundError
from .log import get_logger
from .resources import AllocShape, GiB, Requirements, Resources
from .stats.history import History, KindHistory
from .stats.recorder import StatsRecorder
from .stats.snapshot import AllocStats, StatsSnapshot, TaskStats
from .store.base import AllocRecord, HistoryQuery, Store, StoreBatch
from .task import (
    SETTLED,
    TERMINAL,
    Attempt,
    Task,
    TaskError,
    TaskOutput,
    TaskResult,
    TaskSpec,
    TaskState,
    check_transition,
    new_task_id,
    stage,
)

__all__ = ["Scheduler", "SchedulerClosedError", "SchedulerConfig"]

log = get_logger("packsched.scheduler")
S = TaskState


class SchedulerClosedError(PackschedError):
    """The scheduler is stopping or stopped and takes no more work."""


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the scheduler paces itself. Times are seconds.

    Attributes:
        max_pending_allocs: alloc requests in flight at once.
        max_alloc_idle_time: an alloc with no task for this long is freed.
        drain_timeout: submits arriving within this window are placed in one pass.
        min_alloc: the smallest alloc worth asking for (clipped to what the cluster offers).
        keepalive_interval: how often each alloc's lease is renewed.
        keepalive_timeout: a renewal that takes longer than this has failed.
        labels: added to every alloc request.
        allocate_timeout: an allocation that takes longer than this has failed (None: no limit).
        alloc_retry_initial / alloc_retry_max: backoff after a failed allocation, doubling.
        free_timeout: how long freeing one alloc may take before it is abandoned.
        error_max_age: an ERROR task left alone this long becomes FAILED (None: never); the
            first error's code is kept and the message says it aged out.
        prune_settled_after: settled tasks older than this are deleted from the store and
            forgotten, with their history (None: kept until pruned by hand).
        keep_dead_allocs: how many dead or freed allocs the stats snapshot still shows.
    """

    max_pending_allocs: int = 5
    max_alloc_idle_time: float = 300.0
    drain_timeout: float = 0.05
    min_alloc: Resources = Resources(cpu=1, mem=1 * GiB, disk=1 * GiB)
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0
    labels: dict[str, str] = {}
    allocate_timeout: float | None = None
    alloc_retry_initial: float = 1.0
    alloc_retry_max: float = 60.0
    free_timeout: float = 30.0
    error_max_age: float | None = None
    prune_settled_after: float | None = None
    keep_dead_allocs: int = 100

    def __post_init__(self) -> None:
        if self.max_pending_allocs < 1:
            raise ValueError(f"max_pending_allocs must be >= 1, got {self.max_pending_allocs}")
        for name in (
            "max_alloc_idle_time",
            "drain_timeout",
            "keepalive_interval",
            "keepalive_timeout",
            "alloc_retry_initial",
            "alloc_retry_max",
            "free_timeout",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be > 0")
        if self.keep_dead_allocs < 0:
            raise ValueError("keep_dead_allocs must be >= 0")


class PackingPolicy(Protocol):
    """Where placement and alloc planning come from; the module `packsched.packing` is the default.

    Benchmarks pass another policy (e.g. the reference design's) to compare in the same engine.
    """

    def place(
        self,
        demands: Sequence[packing.Demand],
        rooms: Sequence[packing.Room],
        *,
        can_grow: bool = True,
        shapes: Sequence[AllocShape] = (),
        alloc_overhead: float = 0.0,
    ) -> packing.Placement: ...

    def plan(
        self,
        unplaced: Sequence[packing.Demand],
        pending: Sequence[packing.PendingRequest],
        shapes: Sequence[AllocShape],
        *,
        min_alloc: Resources,
        max_new: int,
    ) -> packing.Plan: ...


# How many waiting tasks one placement call looks at (first, and at most), and the planner at
# most per pass.
_FIRST_WINDOW = 32
_MAX_WINDOW = 4096
_PLAN_MAX = 20_000
# With nothing new to plan for (only placements since), the planner runs at most this often.
_PLAN_INTERVAL = 0.25
# Runner tasks kept waiting for the next attempt. Starting an anyio task costs more than a
# zero-duration attempt itself (a task, a cancel scope and events each time), so a runner
# that ends its attempt takes the next one; beyond this many idle ones, a runner ends.
_IDLE_RUNNERS = 64
HISTORY_WINDOW = 7 * 24 * 3600.0  # seconds of past attempts loaded into the per-kind history

CancelReason = Literal["kill", "lost", "shutdown"]


@dataclass(eq=False, slots=True)
class _TaskEntry:
    """The scheduler's live record of one task: the latest snapshot and the runtime handles."""

    task: Task  # the latest snapshot, perhaps not yet durable
    visible: Task  # the latest durable snapshot: what everyone else sees
    order: int  # FIFO within a priority; lost tasks go to the head with a negative order
    # Dependencies not yet COMPLETE, and the tasks that wait for this one; made on first use,
    # since most tasks have neither (two empty containers per task cost memory and GC time).
    waiting_on: set[str] | None = None
    dependents: list[str] | None = None
    alloc: _AllocEntry | None = None
    scope: anyio.CancelScope | None = None
    cancel_reason: CancelReason | None = None
    changed: anyio.Event | None = None  # set when `visible` changes
    write_seq: int = 0  # the committer sequence number of the latest change
    ready_at: float = 0.0  # monotonic time it last became WAITING (for queue-wait stats)
    queue_wait: float | None = None  # how long the latest attempt waited to be placed
    demand: packing.Demand | None = None  # cached view for packing
    expected_end: float | None = None  # monotonic time the running attempt should end


@dataclass(eq=False, slots=True)
class _AllocEntry:
    alloc: Alloc
    capacity: Resources
    used: Resources
    created_at: float
    idle_since: float | None  # monotonic
    tasks: set[str] = field(default_factory=set)
    dead: bool = False
    freeing: bool = False
    freed_at: float | None = None
    created_wall: float = 0.0
    idle_wall: float | None = None
    scope: anyio.CancelScope | None = None
    # When its running tasks should end, kept incrementally (a pass must not walk every task).
    unknown_ends: int = 0  # running tasks with no expected duration
    max_end: float = -math.inf
    max_end_stale: bool = False

    def add_end(self, end: float | None) -> None:
        if end is None:
            self.unknown_ends += 1
        else:
            self.max_end = max(self.max_end, end)

    def remove_end(self, end: float | None) -> None:
        if end is None:
            self.unknown_ends -= 1
        elif end >= self.max_end:
            self.max_end_stale = True

    @property
    def free(self) -> Resources:
        return self.capacity - self.used


@dataclass(eq=False, slots=True)
class _Request:
    id: str
    requirements: Requirements
    demand_ids: tuple[str, ...] = ()  # the tasks the planner made it for
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class _ReadyQueue:
    """WAITING tasks whose dependencies completed, in placement order (priority, then order).

    Kept sorted as tasks arrive (bisect; a new task at the back is an append), and a task that
    leaves stays behind as a tombstone until tombstones are half the list: so a placement pass
    over a long queue costs what it looks at, not the queue's length. `floor` is the least of
    every dimension over the tasks added since the last compaction, a lower bound of what the
    smallest waiting task needs.
    """

    def __init__(self) -> None:
        # (priority, order, generation, entry); a slot is live while its generation is the
        # entry's current one, so re-adding a task (new priority) leaves the old slot dead.
        self._items: list[tuple[int, int, int, _TaskEntry]] = []
        self._live: dict[str, int] = {}
        self._generation = 0
        self._head = 0  # every slot before it is dead (placed tasks leave from the front)
        self.floor: Resources | None = None

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._live

    def __iter__(self) -> Iterator[_TaskEntry]:
        """The live entries in order; safe while entries are discarded (not while added)."""
        live, items = self._live, self._items
        while (
            self._head < len(items)
            and live.get(items[self._head][3].task.id) != (items[self._head][2])
        ):
            self._head += 1
        # By index: islice(items, head, None) would step over the `head` dead slots one by one
        # on every call, and a pass under a queue of 100,000 makes several calls.
        i = self._head
        while i < len(items):
            _, _, generation, entry = items[i]
            i += 1
            if live.get(entry.task.id) == generation:
                yield entry

    def add(self, entry: _TaskEntry) -> None:
        self._generation += 1
        item = (entry.task.spec.priority, entry.order, self._generation, entry)
        if not self._items or item[:3] >= self._items[-1][:3]:
            self._items.append(item)
        else:
            at = bisect.bisect_right(self._items, item[:3], key=lambda i: i[:3])
            self._items.insert(at, item)
            self._head = min(self._head, at)
        self._live[entry.task.id] = self._generation
        need = entry.task.spec.resources
        if self.floor is None:
            self.floor = need
        elif need != self.floor:  # equal needs (the common case) leave the floor as it is
            self.floor = self.floor.min(need)

    def discard(self, task_id: str) -> None:
        self._live.pop(task_id, None)

    def compact(self) -> None:
        """Drop dead slots once they are half the list; recompute the floor then."""
        if len(self._items) <= 2 * len(self._live) + 64:
            return
        live = self._live
        self._items = [item for item in self._items if live.get(item[3].task.id) == item[2]]
        self._head = 0
        floor: Resources | None = None
        for *_, entry in self._items:
            need = entry.task.spec.resources
            if floor is None:
                floor = need
            elif need != floor:
                floor = floor.min(need)
        self.floor = floor


class Scheduler:
    """Packs submitted tasks into allocs taken from a cluster (DESIGN §4).

    Use it as an async context manager; leaving it kills what runs, frees every alloc and leaves
    no background task behind.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        config: SchedulerConfig | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        policy: PackingPolicy | None = None,
    ) -> None:
        from .store.memory import MemoryStore

        self.cluster = cluster
        self.config = config or SchedulerConfig()
        self.store: Store = store if store is not None else MemoryStore()
        self.clock = clock or Clock()
        self._policy: PackingPolicy = policy if policy is not None else packing
        self._recorder = StatsRecorder()
        self._history = History()
        self._tasks: dict[str, _TaskEntry] = {}
        self._seqs: list[int] = []  # seq of every task in self._tasks, ascending (for paging)
        self._by_seq: list[str] = []
        self._keys: dict[str, str] = {}
        self._ready = _ReadyQueue()  # WAITING with every dependency COMPLETE
        self._allocs: dict[str, _AllocEntry] = {}
        self._gone_allocs: list[_AllocEntry] = []
        self._requests: dict[str, _Request] = {}
        self._to_launch: list[_TaskEntry] = []
        self._plan_news = True  # something the planner has not seen: new tasks, requests, allocs
        self._planned_at = -math.inf
        self._plan_timer: float | None = None
        self._next_seq = 0
        self._next_order = 0
        self._next_head_order = -1
        self._write_seq = 0
        self._durable_seq = 0
        self._dirty_tasks: dict[str, Task] = {}
        self._dirty_attempts: list[Attempt] = []
        self._dirty_allocs: dict[str, AllocRecord] = {}
        self._commit_wakeup = _Signal()
        self._committed: anyio.Event | None = None  # made by whoever waits for a commit
        self._wakeup = _Signal()
        self._submitted_since_pass = False
        self._backoff_until = 0.0
        self._backoff = self.config.alloc_retry_initial
        self._runners = 0
        self._runners_done: anyio.Event | None = None  # made by whoever waits for zero runners
        self._idle_runners: list[_Handoff] = []
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._accepting = False
        self._placing = True
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise PackschedError("a Scheduler can be started only once")
        self._started = True
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await self.store.open()
            stack.push_async_callback(self.store.close)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self._tg.start_soon(self._committer)
            await self._resume()
            # Learn durations and failure patterns from the last week of attempts.
            await self._history.load_from(self.store, since=self.clock.now() - HISTORY_WINDOW)
            self._tg.start_soon(self._main_loop)
            if self.config.error_max_age is not None:
                self._tg.start_soon(self._age_errors, self.config.error_max_age)
            if self.config.prune_settled_after is not None:
                self._tg.start_soon(self._prune_periodically, self.config.prune_settled_after)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        self._accepting = True
        log.info("scheduler started", store=self.store.describe(), tasks=len(self._tasks))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        assert self._stack is not None and self._tg is not None
        self._accepting = False
        self._placing = False
        try:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
        finally:
            self._tg.cancel_scope.cancel()
            await self._stack.__aexit__(exc_type, exc, tb)
        log.info("scheduler stopped")

    async def _shutdown(self) -> None:
        """Kill what runs (its tasks go back to the queue), cancel requests, free every alloc."""
        for alloc in self._allocs.values():
            for task_id in alloc.tasks:
                self._cancel_attempt(self._tasks[task_id], "shutdown")
        for request in list(self._requests.values()):
            request.scope.cancel()
        self._launch(self._write_seq)  # placed but never started: their runners end at once
        with anyio.move_on_after(self.config.free_timeout + 5):
            while self._runners:
                self._runners_done = anyio.Event()
                await self._runners_done.wait()
        async with anyio.create_task_group() as tg:
            for alloc in list(self._allocs.values()):
                tg.start_soon(self._free_alloc, alloc, False)
        await self._flush()

    def stop_accepting(self) -> None:
        """Refuse further submits and start nothing new; what runs goes on.

        A draining daemon calls this, waits for `running_count()` to reach zero (up to a grace),
        then leaves the `async with`.
        """
        self._accepting = False
        self._placing = False
        for request in list(self._requests.values()):
            request.scope.cancel()

    def running_count(self) -> int:
        """How many attempts are staging or running now."""
        return self._runners

    @property
    def accepting(self) -> bool:
        """True while submits are taken."""
        return self._accepting

    # -- the public API ------------------------------------------------------------------

    async def submit(self, *specs: TaskSpec) -> list[Task]:
        """Accept a batch of specs atomically and return their tasks once durable.

        A spec whose `key` was seen before returns the earlier task instead of a new one.

        Raises:
            InvalidSpecError: a spec names an `after` id that does not exist (nothing accepted).
            SchedulerClosedError: the scheduler is not running.
        """
        if not self._accepting:
            raise SchedulerClosedError("the scheduler is not accepting work (stopped or draining)")
        batch_keys: dict[str, int] = {}
        for i, spec in enumerate(specs):
            if not isinstance(spec, TaskSpec):
                raise InvalidSpecError(f"$[{i}] must be a TaskSpec, got {type(spec).__name__}")
            for j, dep in enumerate(spec.after):
                if dep not in self._tasks:
                    raise InvalidSpecError(
                        f"after[{j}] names task {dep}, which does not exist - at `$[{i}].after[{j}]`",
                        path=f"$[{i}].after[{j}]",
                    )
        now = self.clock.now()
        out: list[_TaskEntry] = []
        created = 0
        for spec in specs:
            if spec.key is not None:
                existing = self._keys.get(spec.key)
                if existing is not None:
                    out.append(self._tasks[existing])
                    continue
                if spec.key in batch_keys:
                    out.append(out[batch_keys[spec.key]])
                    continue
                batch_keys[spec.key] = len(out)
            entry = self._create(spec, now)
            created += 1
            out.append(entry)
        self._recorder.task_submitted(created)
        self._submitted_since_pass = True
        self._news()
        await self._wait_durable(max((e.write_seq for e in out), default=0))
        return [e.visible for e in out]

    def get(self, task_id: str) -> Task:
        """The task as the store holds it. Raises `TaskNotFoundError`."""
        return self._entry(task_id).visible

    async def wait(
        self, task_id: str, state: TaskState | None = None, *, timeout: float | None = None
    ) -> Task:
        """Wait until the task is settled, or has reached `state` or gone past it.

        Raises:
            TimeoutError: not reached within `timeout` seconds.
            TaskNotFoundError: no such task.
        """
        entry = self._entry(task_id)
        target = 3 if state is None else stage(state)
        with anyio.fail_after(timeout):
            while stage(entry.visible.state) < target:
                if entry.changed is None:
                    entry.changed = anyio.Event()
                await entry.changed.wait()
        return entry.visible

    async def wait_many(
        self,
        task_ids: Sequence[str],
        *,
        return_when: Literal["all", "first"] = "all",
        timeout: float | None = None,
    ) -> list[Task]:
        """Wait until all (or the first) of these tasks are settled; return the settled ones.

        On timeout, returns what has settled so far instead of raising.
        """
        entries = [self._entry(t) for t in task_ids]

        def settled() -> list[Task]:
            return [e.visible for e in entries if e.visible.state in SETTLED]

        with anyio.move_on_after(timeout):
            if return_when == "all":
                # One pass in order: each entry is waited for once, so n ids cost O(n).
                for entry in entries:
                    while entry.visible.state not in SETTLED:
                        if entry.changed is None:
                            entry.changed = anyio.Event()
                        await entry.changed.wait()
            else:
                while not any(e.visible.state in SETTLED for e in entries):
                    await self._next_commit()
        return settled()

    async def hold(self, task_id: str) -> Task:
        """WAITING -> HOLD: keep it from being placed until released."""
        entry = self._entry(task_id)
        self._transition(entry, S.HOLD, action="hold")
        self._ready.discard(task_id)
        return await self._published(entry)

    async def release(self, task_id: str) -> Task:
        """HOLD -> WAITING."""
        entry = self._entry(task_id)
        self._transition(entry, S.WAITING, action="release")
        self._enqueue(entry)
        return await self._published(entry)

    async def kill(self, task_id: str) -> Task:
        """Kill the task wherever it is; a running one is killed with its process tree."""
        entry = self._entry(task_id)
        state = entry.task.state
        if state in (S.STAGING, S.RUNNING):
            check_transition(entry.task.id, state, S.KILLED, "kill")
            self._cancel_attempt(entry, "kill")
            await self.wait(task_id)
            return entry.visible
        self._transition(
            entry,
            S.KILLED,
            action="kill",
            result=_error_result("killed", "killed on request before it ran"),
        )
        return await self._published(entry)

    async def retry(self, task_id: str) -> Task:
        """ERROR -> WAITING as a new attempt."""
        entry = self._entry(task_id)
        self._transition(entry, S.WAITING, action="retry", new_attempt=True)
        self._recorder.task_retried()
        self._enqueue(entry)
        return await self._published(entry)

    async def set_priority(self, task_id: str, priority: int) -> Task:
        """Change the priority (lower runs first) of a task that has not ended."""
        entry = self._entry(task_id)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidSpecError(
                f"priority must be an integer, got {priority!r}", path="$.priority"
            )
        state = entry.task.state
        if state in TERMINAL:
            raise InvalidTransition(task_id, state.value, state.value, "reprioritise")
        spec = msgspec.structs.replace(entry.task.spec, priority=priority)
        self._update(entry, msgspec.structs.replace(entry.task, spec=spec))
        entry.demand = None
        if task_id in self._ready:
            self._ready.add(entry)  # re-sorted under its new priority
            self._news()
        return await self._published(entry)

    def list_tasks(
        self,
        *,
        states: Iterable[TaskState] | None = None,
        labels: Mapping[str, str] | None = None,
        run: str | None = None,
        kind: str | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
    ) -> list[Task]:
        """Tasks in submission order, filtered; page with `after_seq` (the last seq seen)."""
        wanted = set(states) if states is not None else None
        start = 0 if after_seq is None else bisect.bisect_right(self._seqs, after_seq)
        out: list[Task] = []
        for task_id in self._by_seq[start:]:
            task = self._tasks[task_id].visible
            if wanted is not None and task.state not in wanted:
                continue
            if run is not None and task.spec.run != run:
                continue
            if kind is not None and task.spec.kind != kind:
                continue
            if labels and any(task.spec.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(task)
            if limit is not None and len(out) >= limit:
                break
        return out

    async def history(self, query: HistoryQuery) -> list[Attempt]:
        """Finished attempts from the store's log."""
        return await self.store.history(query)

    def kind_history(self, kind: str) -> KindHistory:
        """What past attempts of `kind` used and how often they succeeded (DESIGN §7)."""
        return self._history.history(kind)

    def stats(self, *, include_tasks: bool = True) -> StatsSnapshot:
        """An immutable snapshot of everything (DESIGN §7); `include_tasks=False` skips per-task rows."""
        by_state: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        tasks: list[TaskStats] = []
        for entry in self._tasks.values():
            t = entry.visible
            by_state[t.state] += 1
            if include_tasks:
                tasks.append(
                    TaskStats(
                        id=t.id,
                        name=t.spec.display_name(),
                        kind=t.spec.kind,
                        state=t.state,
                        attempt=t.attempt,
                        alloc_id=t.alloc_id,
                        priority=t.spec.priority,
                        error=t.error,
                        runtime_statistics=t.result.output.runtime_statistics if t.result else None,
                    )
                )
        allocs = [self._alloc_stats(a) for a in self._allocs.values()]
        allocs += [self._alloc_stats(a) for a in self._gone_allocs]
        pending = Resources()
        for request in self._requests.values():
            pending = pending + request.requirements.full
        return StatsSnapshot(
            taken_at=self.clock.now(),
            total_allocs=len(self._allocs),
            total_tasks=len(self._tasks),
            tasks_by_state=by_state,
            allocs=allocs,
            tasks=tasks,
            pending_alloc_requests=len(self._requests),
            pending_alloc_resources=pending,
            counters=self._recorder.counters(),
        )

    def _alloc_stats(self, a: _AllocEntry) -> AllocStats:
        return AllocStats(
            id=a.alloc.id,
            resources=a.capacity,
            available=a.free,
            dead=a.dead or a.freed_at is not None,
            task_ids=sorted(a.tasks),
            labels=dict(a.alloc.labels),
            created_at=a.created_wall,
            idle_since=a.idle_wall,
            freed_at=a.freed_at,
        )

    # -- task records --------------------------------------------------------------------

    def _entry(self, task_id: str) -> _TaskEntry:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFoundError(task_id) from None

    def _create(self, spec: TaskSpec, now: float) -> _TaskEntry:
        task_id = new_task_id()
        while task_id in self._tasks:  # pragma: no cover - 64 random bits
            task_id = new_task_id()
        self._next_seq += 1
        task = Task(
            id=task_id,
            spec=spec,
            state=S.HOLD if spec.hold else S.WAITING,
            submitted_at=now,
            state_changed_at=now,
            seq=self._next_seq,
        )
        entry = self._add_entry(task)
        self._update(entry, task)
        if spec.key is not None:
            self._keys[spec.key] = task_id
        self._link_dependencies(entry)
        if task.state is S.WAITING:
            self._enqueue(entry)
        return entry

    def _add_entry(self, task: Task) -> _TaskEntry:
        self._next_order += 1
        entry = _TaskEntry(task=task, visible=task, order=self._next_order)
        self._tasks[task.id] = entry
        self._seqs.append(task.seq)
        self._by_seq.append(task.id)
        return entry

    def _link_dependencies(self, entry: _TaskEntry) -> None:
        """Record what the task waits for; skip it at once if a dependency already ended badly."""
        for dep_id in entry.task.spec.after:
            dep = self._tasks[dep_id]
            state = dep.task.state
            if state is S.COMPLETE:
                continue
            if state in TERMINAL:
                self._skip(entry, dep)
                return
            _depend(entry, dep)

    def _skip(self, entry: _TaskEntry, dep: _TaskEntry) -> None:
        reason = f"dependency {dep.task.id} ({dep.task.spec.display_name()}) ended {dep.task.state.value}"
        result = TaskResult(
            output=TaskOutput(
                errors=[
                    TaskError(code="dependency-failed", message=f"{reason}; this task was skipped")
                ],
                skip_reason=reason,
            )
        )
        self._ready.discard(entry.task.id)
        self._transition(entry, S.SKIPPED, action="skip", result=result)

    def _update(self, entry: _TaskEntry, task: Task) -> None:
        """Queue a new snapshot of the task for the store."""
        entry.task = task
        self._dirty_tasks[task.id] = task
        self._write_seq += 1
        entry.write_seq = self._write_seq
        if not self._commit_wakeup.is_set:
            self._commit_wakeup.set()

    def _transition(
        self,
        entry: _TaskEntry,
        target: TaskState,
        *,
        action: str,
        result: TaskResult | None = None,
        new_attempt: bool = False,
        alloc_id: str | None = None,
        count_lost: bool = True,
    ) -> None:
        """The one place a task changes state: check the table, update, queue for the store."""
        task = entry.task
        check_transition(task.id, task.state, target, action)
        now = self.clock.now()
        changes: dict[str, object] = {"state": target, "state_changed_at": now}
        if target is S.STAGING:
            changes.update(alloc_id=alloc_id, started_at=None, finished_at=None, result=None)
        elif target is S.RUNNING:
            changes["started_at"] = now
        elif target in SETTLED or target is S.LOST:
            changes["finished_at"] = now
            if result is not None:
                changes["result"] = result
        if target is S.LOST and count_lost:
            changes["lost_count"] = task.lost_count + 1
        if new_attempt:
            changes.update(
                attempt=task.attempt + 1,
                alloc_id=None,
                started_at=None,
                finished_at=None,
            )
            if task.state is S.ERROR:
                changes["retries_used"] = task.retries_used + 1
        new = msgspec.structs.replace(task, **changes)
        if target in SETTLED or target is S.LOST:
            attempt = Attempt(
                task_id=task.id,
                attempt=task.attempt,
                state=target,
                kind=task.spec.kind,
                run=task.spec.run,
                alloc_id=task.alloc_id,
                submitted_at=task.submitted_at,
                started_at=task.started_at,
                finished_at=now,
                result=new.result,
            )
            self._dirty_attempts.append(attempt)
            self._history.record(attempt)
        self._update(entry, new)
        if target in SETTLED:
            self._recorder.task_finished(
                target.value,
                queue_wait=entry.queue_wait,
                run_time=(now - task.started_at) if task.started_at is not None else None,
            )
        if target in TERMINAL:
            self._settle_dependents(entry)

    def _settle_dependents(self, entry: _TaskEntry) -> None:
        """A task ended: free its dependents, or skip them if it did not complete."""
        if not entry.dependents:
            return
        for dep_id in entry.dependents:
            dependent = self._tasks[dep_id]
            if not dependent.waiting_on or entry.task.id not in dependent.waiting_on:
                continue
            if entry.task.state is S.COMPLETE:
                dependent.waiting_on.discard(entry.task.id)
                if not dependent.waiting_on and dependent.task.state is S.WAITING:
                    self._enqueue(dependent)
            elif dependent.task.state in (S.WAITING, S.HOLD):
                dependent.waiting_on.clear()
                self._skip(dependent, entry)
        entry.dependents.clear()

    def _enqueue(self, entry: _TaskEntry, *, head: bool = False) -> None:
        """Make a WAITING task a candidate for placement (once its dependencies completed)."""
        entry.demand = None
        if head:
            entry.order = self._next_head_order
            self._next_head_order -= 1
        entry.ready_at = self.clock.monotonic()
        if entry.waiting_on:
            return
        if not self.cluster.can_allocate(entry.task.spec.resources):
            self._transition(
                entry,
                S.ERROR,
                action="schedule",
                result=_error_result("unschedulable", self._unschedulable_message(entry.task)),
            )
            return
        self._ready.add(entry)
        self._news()

    def _unschedulable_message(self, task: Task) -> str:
        need = task.spec.resources
        largest = self.cluster.max_alloc()
        over = need.exceeding(largest)
        if over:
            parts = [
                f"{dim}={_fmt(dim, need.amount(dim))} but the largest alloc this cluster offers "
                f"has {dim}={_fmt(dim, largest.amount(dim))}"
                for dim in over
            ]
            return (
                f"task {task.id} needs {'; and '.join(parts)}. Ask for less, or run it on a "
                f"cluster with larger allocs."
            )
        return (
            f"task {task.id} needs {need.describe()} together, but no alloc shape this cluster "
            f"offers holds all of it at once (largest per resource: {largest.describe()}). "
            f"Ask for less, or add a larger shape."
        )

    async def _published(self, entry: _TaskEntry) -> Task:
        await self._wait_durable(entry.write_seq)
        return entry.visible

    # -- the committer: durable before visible --------------------------------------------

    async def _committer(self) -> None:
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            await self._commit_once()

    async def _commit_once(self) -> None:
        if not (self._dirty_tasks or self._dirty_attempts or self._dirty_allocs):
            return
        batch = StoreBatch(
            tasks=list(self._dirty_tasks.values()),
            attempts=self._dirty_attempts,
            allocs=list(self._dirty_allocs.values()),
        )
        seq = self._write_seq
        self._dirty_tasks = {}
        self._dirty_attempts = []
        self._dirty_allocs = {}
        await self.store.write(batch)
        for task in batch.tasks:
            entry = self._tasks.get(task.id)
            if entry is None:
                continue
            entry.visible = task
            if entry.changed is not None:
                entry.changed.set()
                entry.changed = None
        self._durable_seq = seq
        if self._committed is not None:
            self._committed.set()
            self._committed = None
        self._launch(seq)

    async def _wait_durable(self, seq: int) -> None:
        while self._durable_seq < seq:
            await self._next_commit()

    async def _next_commit(self) -> None:
        if self._committed is None:
            self._committed = anyio.Event()
        await self._committed.wait()

    async def _flush(self) -> None:
        while self._dirty_tasks or self._dirty_attempts or self._dirty_allocs:
            await self._commit_once()

    # -- the main loop: one placement pass per batch of events ----------------------------

    def _wake(self) -> None:
        if not self._wakeup.is_set:
            self._wakeup.set()

    def _news(self) -> None:
        """Wake the loop for something the planner must see (not just a finished task)."""
        self._plan_news = True
        self._wake()

    async def _main_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            if self._submitted_since_pass and self.config.drain_timeout > 0:
                # Let a burst of submits gather so that one pass packs them together.
                await self.clock.sleep(self.config.drain_timeout)
            else:
                await anyio.lowlevel.checkpoint()
            self._wakeup.clear()
            self._submitted_since_pass = False
            self._pass()

    def _pass(self) -> None:
        """Place what fits, then plan alloc requests for the rest."""
        if not self._placing:
            return
        now = self.clock.monotonic()
        can_request = now >= self._backoff_until
        max_new = self.config.max_pending_allocs - len(self._requests) if can_request else 0
        if self._allocs and len(self._ready):
            # Rooms are held for big waiting tasks only when no new alloc can come to them.
            self._place(now, can_grow=can_request and self.cluster.can_grow())
        self._ready.compact()
        if not self._requests and max_new <= 0:
            return
        # Placements alone only shrink the queue; re-planning after each of them would cost a
        # planner call per finished task under a long queue, so it waits for news or a period.
        if not self._plan_news and now - self._planned_at < _PLAN_INTERVAL:
            if self._plan_timer is None:
                self._plan_timer = now + _PLAN_INTERVAL
                assert self._tg is not None
                self._tg.start_soon(self._wake_after, _PLAN_INTERVAL)
            return
        self._plan_news = False
        self._planned_at = now
        self._plan_timer = None
        unplaced = self._planning_window(max_new)
        if not unplaced and not self._requests:
            return
        pending = [
            packing.PendingRequest(id=r.id, requirements=r.requirements, demand_ids=r.demand_ids)
            for r in self._requests.values()
        ]
        plan = self._policy.plan(
            unplaced,
            pending,
            self.cluster.shapes(),
            min_alloc=self.config.min_alloc,
            max_new=max(0, max_new),
        )
        for request_id in plan.cancel:
            self._requests[request_id].scope.cancel()
        # Each request remembers the tasks it was made for, so that later passes count those
        # tasks in it instead of re-packing them into new requests after every event.
        for i, requirements in enumerate(plan.requests):
            ids = plan.request_demands[i] if i < len(plan.request_demands) else ()
            self._request(requirements, ids)

    def _place(self, now: float, *, can_grow: bool) -> None:
        """Offer the queue to the policy window by window, in order, until no room is left.

        Placement is greedy in queue order, so windows decide exactly what one call over the
        whole queue would; but a pass that frees a few slots under a queue of 100,000 looks at
        one window, not at every waiting task.
        """
        floor = self._ready.floor
        if floor is None:
            return
        held: set[str] = set()  # rooms reserved for a waiting task of an earlier window
        queue = iter(self._ready)
        # What an alloc of its own would cost a long task, against keeping a busy one alive.
        shapes = self.cluster.shapes()
        size = 0  # doubling: a pass that frees a few slots looks at a few tasks
        while True:
            rooms = [
                packing.Room(
                    id=a.alloc.id,
                    capacity=a.capacity,
                    free=a.free,
                    expected_free_at=self._expected_free_at(a, now),
                )
                for a in self._allocs.values()
                if not (a.dead or a.freeing) and a.alloc.id not in held and floor.fits_in(a.free)
            ]
            if not rooms:
                return
            if not size:
                # No more tasks than the rooms could hold at the smallest waiting size: a
                # pass after 8 slots freed up looks at 8 tasks first, not 32.
                size = min(_FIRST_WINDOW, max(1, _room_for(floor, rooms)))
            window = [e.demand or self._demand(e) for e in itertools.islice(queue, size)]
            if not window:
                return
            placement = self._policy.place(
                window,
                rooms,
                can_grow=can_grow,
                shapes=shapes,
                alloc_overhead=self.config.max_alloc_idle_time,
            )
            for task_id, alloc_id in placement.assignments:
                self._start(self._tasks[task_id], self._allocs[alloc_id])
            held.update(placement.reserved)
            if len(window) < size:
                return
            size = min(2 * size, _MAX_WINDOW)

    def _planning_window(self, max_new: int) -> list[packing.Demand]:
        """The waiting tasks the planner is shown: enough, in order, to fill every pending
        request and `max_new` new allocs of the largest shape, plus every task a pending request
        was made for (so it is not cancelled for a task beyond the window)."""
        largest = self.cluster.max_alloc()
        budget = 2.0 * (len(self._requests) + max(0, max_new)) + 2.0
        out: list[packing.Demand] = []
        seen: set[str] = set()
        used = 0.0
        for entry in self._ready:
            if used > budget or len(out) >= _PLAN_MAX:
                break
            demand = entry.demand or self._demand(entry)
            out.append(demand)
            seen.add(demand.id)
            used += min(1.0, demand.resources.dominant_share(largest))
        for request in self._requests.values():
            for task_id in request.demand_ids:
                if task_id not in seen and task_id in self._ready:
                    entry = self._tasks[task_id]
                    out.append(entry.demand or self._demand(entry))
                    seen.add(task_id)
        return out

    def _start(self, entry: _TaskEntry, alloc: _AllocEntry) -> None:
        self._ready.discard(entry.task.id)
        now = self.clock.monotonic()
        entry.queue_wait = now - entry.ready_at
        duration = entry.demand.expected_duration if entry.demand else None
        entry.expected_end = now + duration if duration is not None else None
        alloc.add_end(entry.expected_end)
        self._transition(entry, S.STAGING, action="place", alloc_id=alloc.alloc.id)
        alloc.used = alloc.used + entry.task.spec.resources
        alloc.tasks.add(entry.task.id)
        alloc.idle_since = None
        alloc.idle_wall = None
        entry.alloc = alloc
        entry.cancel_reason = None
        self._runners += 1
        # The store must know the task was placed before it runs, so that a crash marks it
        # lost instead of forgetting that an attempt began: the committer launches it.
        self._to_launch.append(entry)

    def _launch(self, durable_seq: int) -> None:
        """Start the runners of placed tasks whose STAGING is now durable."""
        if not self._to_launch:
            return
        assert self._tg is not None
        keep: list[_TaskEntry] = []
        for entry in self._to_launch:
            if entry.write_seq > durable_seq and entry.task.state is S.STAGING:
                keep.append(entry)
            elif entry.alloc is not None:
                self._run_soon(entry, entry.alloc)
        self._to_launch = keep

    def _expected_free_at(self, a: _AllocEntry, now: float) -> float | None:
        """When the alloc's running tasks are expected to have ended, in seconds from now."""
        if not a.tasks or a.unknown_ends:
            return None
        if a.max_end_stale:
            ends = (self._tasks[t].expected_end for t in a.tasks)
            a.max_end = max((e for e in ends if e is not None), default=-math.inf)
            a.max_end_stale = False
        return max(0.0, a.max_end - now)

    def _demand(self, entry: _TaskEntry) -> packing.Demand:
        """The task as packing sees it, cached until its priority or order changes."""
        spec = entry.task.spec
        entry.demand = packing.Demand(
            id=entry.task.id,
            resources=spec.resources,
            priority=spec.priority,
            order=entry.order,
            # Undeclared durations are learned from the kind's history (its median).
            expected_duration=spec.expected_duration or self._history.expected_duration(spec.kind),
        )
        return entry.demand

    # -- running one attempt ---------------------------------------------------------------

    def _run_soon(self, entry: _TaskEntry, alloc: _AllocEntry, *, attach: bool = False) -> None:
        """Hand the attempt to an idle runner, or start a runner for it."""
        if self._idle_runners:
            handoff = self._idle_runners.pop()
            handoff.attempt = (entry, alloc, attach)
            handoff.ready.set()
        else:
            assert self._tg is not None
            self._tg.start_soon(self._runner, entry, alloc, attach)

    async def _runner(self, entry: _TaskEntry, alloc: _AllocEntry, attach: bool) -> None:
        """Run attempts one after another until there are enough idle runners.

        The attempts of one runner share a cancel scope (entering a new one per attempt cost
        more than a zero-duration attempt): cancelling it ends the attempt in flight, which is
        then settled outside the scope, and the runner goes on in a fresh one.
        """
        while True:
            with anyio.CancelScope() as scope:
                while True:
                    await self._run(entry, alloc, attach, scope)
                    if scope.cancel_called:
                        break  # cancelled just as its attempt ended: the scope is spent
                    next_attempt = await self._next_attempt()
                    if next_attempt is None:
                        return
                    entry, alloc, attach = next_attempt
            if scope.cancelled_caught:
                self._settle_attempt(entry, alloc, None, None, False)
            next_attempt = await self._next_attempt()
            if next_attempt is None:
                return
            entry, alloc, attach = next_attempt

    async def _next_attempt(self) -> tuple[_TaskEntry, _AllocEntry, bool] | None:
        """Wait as an idle runner for the next attempt; None when enough runners are idle."""
        if len(self._idle_runners) >= _IDLE_RUNNERS:
            return None
        handoff = _Handoff()
        self._idle_runners.append(handoff)
        await handoff.ready.wait()
        return handoff.attempt

    def _cancel_attempt(self, entry: _TaskEntry, reason: CancelReason) -> None:
        """Stop the task's placed or running attempt, for the first reason given."""
        if entry.alloc is None or entry.cancel_reason is not None:
            return
        entry.cancel_reason = reason
        if entry.scope is not None:  # running; one placed but not started never starts
            entry.scope.cancel()

    async def _run(
        self, entry: _TaskEntry, alloc: _AllocEntry, attach: bool, scope: anyio.CancelScope
    ) -> None:
        """Run one attempt in the runner's scope and settle it; a cancelled one raises out of
        here (the runner settles it)."""
        task_id = entry.task.id
        started = False
        result: TaskResult | None = None
        failure: BaseException | None = None

        def on_started() -> None:
            nonlocal started
            if not started and entry.task.state is S.STAGING:
                started = True
                self._transition(entry, S.RUNNING, action="start")

        try:
            if entry.cancel_reason is None:  # not killed or lost before it started
                entry.scope = scope
                if not attach:
                    result = await alloc.alloc.run(entry.task, on_started)
                else:
                    started = entry.task.state is S.RUNNING
                    result = await alloc.alloc.attach(entry.task, on_started)
        except Exception as exc:
            failure = exc
        finally:
            entry.scope = None
            entry.alloc = None
            alloc.tasks.discard(task_id)
            alloc.remove_end(entry.expected_end)
            alloc.used = alloc.used - entry.task.spec.resources
            if not alloc.tasks:
                alloc.idle_since = self.clock.monotonic()
                alloc.idle_wall = self.clock.now()
            self._runners -= 1
            if self._runners == 0 and self._runners_done is not None:
                self._runners_done.set()
            self._wake()
        self._settle_attempt(entry, alloc, result, failure, started)

    def _settle_attempt(
        self,
        entry: _TaskEntry,
        alloc: _AllocEntry,
        result: TaskResult | None,
        failure: BaseException | None,
        started: bool,
    ) -> None:
        """Record how an attempt ended: cancelled (for its reason), failed to run, or done."""
        task_id = entry.task.id
        reason = entry.cancel_reason if result is None else None
        entry.cancel_reason = None
        if reason == "kill":
            self._transition(
                entry, S.KILLED, action="kill", result=_error_result("killed", "killed on request")
            )
        elif reason == "lost":
            self._lose(
                entry, f"alloc {alloc.alloc.id} died (its keepalive failed) while this task ran"
            )
        elif reason == "shutdown":
            self._lose(
                entry,
                "the scheduler stopped while this task ran; it runs again when a scheduler resumes",
                count=False,
            )
        elif failure is not None:
            log.warning(
                "alloc failed to run a task",
                task_id=task_id,
                alloc_id=alloc.alloc.id,
                error=repr(failure),
            )
            self._lose(entry, f"alloc {alloc.alloc.id} could not run this task: {failure!r}")
        elif result is not None:
            self._finish(entry, result, started)

    def _finish(self, entry: _TaskEntry, result: TaskResult, started: bool) -> None:
        ok = result.exit_code == 0 and not result.output.errors
        if ok and not started:
            self._transition(entry, S.RUNNING, action="start")
            started = True
        if ok:
            self._transition(entry, S.COMPLETE, action="complete", result=result)
            return
        if not result.output.errors:
            result = msgspec.structs.replace(
                result,
                output=msgspec.structs.replace(
                    result.output,
                    errors=[
                        TaskError(
                            code="exit-status",
                            message=f"the command exited with status {result.exit_code}; "
                            f"see its stderr for why",
                        )
                    ],
                ),
            )
        note = self._history.describe_failure(entry.task.spec.kind)
        if note is not None:
            first, *rest = result.output.errors
            first = TaskError(code=first.code, message=f"{first.message} ({note})")
            result = msgspec.structs.replace(
                result, output=msgspec.structs.replace(result.output, errors=[first, *rest])
            )
        self._transition(entry, S.ERROR, action="fail", result=result)
        task = entry.task
        if task.retries_used < task.spec.retries:
            self._transition(entry, S.WAITING, action="auto retry", new_attempt=True)
            self._recorder.task_retried()
            self._enqueue(entry)

    def _lose(self, entry: _TaskEntry, message: str, *, count: bool = True) -> None:
        """The attempt was lost with its alloc: reschedule at the head of its priority, or fail."""
        result = _error_result("lost", message)
        self._transition(entry, S.LOST, action="lose", result=result, count_lost=count)
        if count:
            self._recorder.task_lost()
        task = entry.task
        if task.lost_count >= task.spec.max_lost:
            failed = _error_result(
                "lost",
                f"{message}; this was loss {task.lost_count} of at most {task.spec.max_lost} "
                f"(max_lost), so the task failed. Look for why its allocs die (memory, preemption).",
            )
            self._transition(entry, S.FAILED, action="give up", result=failed)
            return
        self._transition(entry, S.WAITING, action="reschedule", new_attempt=True)
        self._enqueue(entry, head=True)

    # -- allocs ----------------------------------------------------------------------------

    def _request(self, requirements: Requirements, demand_ids: tuple[str, ...] = ()) -> None:
        request = _Request(id=new_task_id(), requirements=requirements, demand_ids=demand_ids)
        self._requests[request.id] = request
        self._recorder.alloc_requested()
        assert self._tg is not None
        self._tg.start_soon(self._allocate, request)

    async def _allocate(self, request: _Request) -> None:
        alloc: Alloc | None = None
        try:
            with request.scope:
                with anyio.fail_after(self.config.allocate_timeout):
                    alloc = await self.cluster.allocate(request.requirements, self.config.labels)
        except Exception as exc:
            delay = self._backoff
            self._backoff = min(self._backoff * 2, self.config.alloc_retry_max)
            self._backoff_until = self.clock.monotonic() + delay
            self._recorder.alloc_request_failed()
            log.warning(
                "allocation failed; retrying after a backoff",
                error=str(exc) or repr(exc),
                requirements=request.requirements.min.describe(),
                retry_in=delay,
            )
            assert self._tg is not None
            self._tg.start_soon(self._wake_after, delay)
        finally:
            self._requests.pop(request.id, None)
            self._news()
        if alloc is None:
            return
        self._backoff = self.config.alloc_retry_initial
        if not self._placing:
            with anyio.CancelScope(shield=True):
                await alloc.free()
            return
        self._add_alloc(alloc)

    async def _wake_after(self, delay: float) -> None:
        await self.clock.sleep(delay)
        self._news()

    def _add_alloc(self, alloc: Alloc, *, created_wall: float | None = None) -> _AllocEntry:
        now = self.clock.monotonic()
        entry = _AllocEntry(
            alloc=alloc,
            capacity=alloc.resources,
            used=Resources(),
            created_at=now,
            idle_since=now,
            created_wall=created_wall if created_wall is not None else self.clock.now(),
        )
        entry.idle_wall = entry.created_wall
        self._allocs[alloc.id] = entry
        self._record_alloc(entry)
        self._recorder.alloc_started()
        log.info("alloc started", alloc_id=alloc.id, resources=alloc.resources.describe())
        assert self._tg is not None
        self._tg.start_soon(self._keep_alive, entry)
        self._news()
        return entry

    def _record_alloc(self, a: _AllocEntry) -> None:
        self._dirty_allocs[a.alloc.id] = AllocRecord(
            id=a.alloc.id,
            resources=a.capacity,
            labels=dict(a.alloc.labels),
            created_at=a.created_wall,
            freed_at=a.freed_at,
            dead=a.dead,
        )
        self._write_seq += 1
        self._commit_wakeup.set()

    async def _keep_alive(self, a: _AllocEntry) -> None:
        """Renew the lease every interval; free the alloc once idle for too long."""
        interval = self.config.keepalive_interval
        idle = False
        with anyio.CancelScope() as scope:
            a.scope = scope
            next_renewal = self.clock.monotonic() + interval
            while not (a.dead or a.freeing):
                now = self.clock.monotonic()
                idle_deadline = (
                    a.idle_since + self.config.max_alloc_idle_time
                    if a.idle_since is not None
                    else math.inf
                )
                if now >= idle_deadline and not a.tasks:
                    idle = True
                    break
                if now >= next_renewal:
                    try:
                        with anyio.fail_after(self.config.keepalive_timeout):
                            await a.alloc.keepalive()
                    except Exception as exc:
                        self._alloc_died(a, exc)
                        return
                    next_renewal = self.clock.monotonic() + interval
                    continue
                await self.clock.sleep_until(min(next_renewal, idle_deadline))
        if idle:
            log.info("freeing idle alloc", alloc_id=a.alloc.id)
            await self._free_alloc(a, False)

    def _alloc_died(self, a: _AllocEntry, exc: BaseException) -> None:
        log.warning(
            "alloc died: keepalive failed", alloc_id=a.alloc.id, error=str(exc) or repr(exc)
        )
        a.dead = True
        self._recorder.alloc_freed(dead=True)
        for task_id in list(a.tasks):
            self._cancel_attempt(self._tasks[task_id], "lost")
        assert self._tg is not None
        self._tg.start_soon(self._free_alloc, a, True)
        self._news()

    async def _free_alloc(self, a: _AllocEntry, dead: bool) -> None:
        """Free the alloc (shielded, bounded), drop it from the live set, record it."""
        if a.freeing:
            return
        a.freeing = True
        if a.scope is not None:
            a.scope.cancel()
        with anyio.CancelScope(shield=True):
            for task_id in list(a.tasks):
                self._cancel_attempt(self._tasks[task_id], "lost" if dead else "shutdown")
            with anyio.move_on_after(self.config.free_timeout) as free_scope:
                try:
                    await a.alloc.free()
                except Exception as exc:
                    log.warning("freeing an alloc failed", alloc_id=a.alloc.id, error=repr(exc))
            if free_scope.cancelled_caught:
                log.warning("freeing an alloc timed out", alloc_id=a.alloc.id)
        if not dead:
            self._recorder.alloc_freed(dead=False)
        a.freed_at = self.clock.now()
        self._allocs.pop(a.alloc.id, None)
        self._gone_allocs.append(a)
        del self._gone_allocs[: max(0, len(self._gone_allocs) - self.config.keep_dead_allocs)]
        self._record_alloc(a)
        self._news()

    async def prune(self, settled_before: float) -> int:
        """Delete settled tasks that settled before this time (epoch seconds), with their
        history, from the store and from memory; return how many.

        A task some unsettled task still waits on is kept whatever its age.
        """
        await self._flush()
        removed = await self.store.prune(settled_before)
        gone = {
            task_id
            for task_id, entry in self._tasks.items()
            if entry.visible.state in SETTLED
            and (entry.visible.finished_at or entry.visible.state_changed_at) < settled_before
            and not entry.dependents
        }
        if gone:
            for task_id in gone:
                entry = self._tasks.pop(task_id)
                self._ready.discard(task_id)
                key = entry.task.spec.key
                if key is not None and self._keys.get(key) == task_id:
                    del self._keys[key]
            kept = [
                (seq, t) for seq, t in zip(self._seqs, self._by_seq, strict=True) if t not in gone
            ]
            self._seqs = [seq for seq, _ in kept]
            self._by_seq = [t for _, t in kept]
        log.info("pruned settled tasks", before=settled_before, store=removed, memory=len(gone))
        return removed

    async def _prune_periodically(self, age: float) -> None:
        period = min(max(age / 4, 0.01), 3600.0)
        while True:
            await self.clock.sleep(period)
            await self.prune(self.clock.now() - age)

    async def _age_errors(self, max_age: float) -> None:
        """Give up on ERROR tasks nobody retried or killed within `max_age` seconds."""
        period = min(max(max_age / 4, 0.01), 60.0)
        while True:
            await self.clock.sleep(period)
            for task_id in await self.store.error_tasks_older_than(self.clock.now() - max_age):
                entry = self._tasks.get(task_id)
                if entry is None or entry.task.state is not S.ERROR:
                    continue
                previous = entry.task.error
                message = (
                    f"left in ERROR for more than {max_age:g}s without a retry, so it was given "
                    f"up on; the last error was: "
                    f"{previous.message if previous else 'unknown'}"
                )
                code = previous.code if previous else "exit-status"
                self._transition(
                    entry, S.FAILED, action="age out", result=_error_result(code, message)
                )

    # -- resume ------------------------------------------------------------------------------

    async def _resume(self) -> None:
        """Carry on from what the store holds (DESIGN §8)."""
        tasks = await self.store.load_tasks()
        records = await self.store.load_allocs()
        reattached: dict[str, _AllocEntry] = {}
        for record in records:
            alloc: Alloc | None = None
            if not record.dead:
                try:
                    alloc = await self.cluster.reattach(record.id, record.resources, record.labels)
                except Exception as exc:
                    log.warning("could not re-attach alloc", alloc_id=record.id, error=repr(exc))
            if alloc is None:
                self._dirty_allocs[record.id] = msgspec.structs.replace(
                    record, dead=True, freed_at=record.freed_at or self.clock.now()
                )
                continue
            reattached[alloc.id] = self._add_alloc(alloc, created_wall=record.created_at)
        for task in tasks:
            entry = self._add_entry(task)
            self._next_seq = max(self._next_seq, task.seq)
            if task.spec.key is not None:
                self._keys[task.spec.key] = task.id
        for task_id in self._by_seq:
            entry = self._tasks[task_id]
            if entry.task.state in TERMINAL:
                continue
            for dep_id in entry.task.spec.after:
                dep = self._tasks.get(dep_id)
                if dep is None or dep.task.state is S.COMPLETE:
                    continue
                _depend(entry, dep)
        for task_id in list(self._by_seq):
            entry = self._tasks[task_id]
            state = entry.task.state
            if state in (S.STAGING, S.RUNNING):
                a = reattached.get(entry.task.alloc_id or "")
                if a is not None:
                    self._reattach(entry, a)
                else:
                    self._lose(
                        entry, f"alloc {entry.task.alloc_id} was gone when the scheduler resumed"
                    )
            elif state is S.LOST:
                self._transition(entry, S.WAITING, action="reschedule", new_attempt=True)
                self._enqueue(entry, head=True)
            elif state is S.WAITING:
                self._enqueue(entry)
        # Dependencies that ended badly while we were down.
        for task_id in self._by_seq:
            entry = self._tasks[task_id]
            if entry.task.state in TERMINAL and entry.task.state is not S.COMPLETE:
                self._settle_dependents(entry)
        await self._flush()

    def _reattach(self, entry: _TaskEntry, a: _AllocEntry) -> None:
        a.used = a.used + entry.task.spec.resources
        a.tasks.add(entry.task.id)
        entry.expected_end = None
        a.add_end(None)
        a.idle_since = None
        a.idle_wall = None
        entry.alloc = a
        self._runners += 1
        self._run_soon(entry, a, attach=True)


class _Signal:
    """An event that is cleared to be waited for again; `is_set` is a plain attribute, since
    the scheduler signals on every state change and reading it must cost nothing."""

    __slots__ = ("_event", "is_set")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.is_set = False

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            self._event.set()

    def clear(self) -> None:
        if self.is_set:
            self.is_set = False
            self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _Handoff:
    """An idle runner waiting for its next attempt (see `Scheduler._run_soon`)."""

    __slots__ = ("attempt", "ready")

    def __init__(self) -> None:
        self.ready = anyio.Event()
        self.attempt: tuple[_TaskEntry, _AllocEntry, bool] | None = None


def _depend(entry: _TaskEntry, dep: _TaskEntry) -> None:
    """Record that `entry` waits for `dep` to complete."""
    if entry.waiting_on is None:
        entry.waiting_on = set()
    entry.waiting_on.add(dep.task.id)
    if dep.dependents is None:
        dep.dependents = []
    dep.dependents.append(entry.task.id)


def _room_for(floor: Resources, rooms: Iterable[packing.Room]) -> int:
    """How many tasks of the `floor` size the rooms could take together (rounded down per
    room): no pass places more tasks than this, since every waiting task needs at least it."""
    total = 0.0
    for room in rooms:
        share = floor.dominant_share(room.free)
        if share <= 0:
            return _FIRST_WINDOW  # tasks that need nothing: no bound
        total += math.floor(1 / share + 1e-9)
        if total >= _FIRST_WINDOW:
            break  # a few rooms are enough to know (a pass may offer a thousand)
    return int(min(total, _FIRST_WINDOW))


def _error_result(code: str, message: str) -> TaskResult:
    return TaskResult(output=TaskOutput(errors=[TaskError(code=code, message=message)]))  # type: ignore[arg-type]


def _fmt(dim: str, amount: float) -> str:
    from .resources import format_bytes

    if dim in ("mem", "disk"):
        return format_bytes(amount)
    return f"{amount:g}"
