"""Agent-backed allocs: the daemon's side of `packsched agent`.

A remote alloc (a Slurm job, a pod, a local process) runs an agent that registers with the
daemon, renews a lease with heartbeats, long-polls for assignments and reports when each attempt
started and how it ended. This module holds the wire types of that protocol, the registry of
agents the routes in `api/agent_routes.py` talk to, the `RemoteAlloc` the scheduler drives, and
`AgentCluster`, the provider-neutral half of every cluster whose allocs run an agent.

The rules that make it safe:
- every report is keyed by (task id, attempt), so a retried report changes nothing;
- an assignment is re-sent until the agent reports it started (or ended), and the agent runs each
  (task id, attempt) at most once, so a lost response never loses or doubles an attempt;
- the lease is the time since the agent was last heard from; the scheduler's keepalive fails
  once it runs out, or at once when the provider knows the job or process is gone.
"""

from __future__ import annotations

import abc
import contextlib
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec

from ..cluster.base import Alloc, Cluster, StartedCallback
from ..errors import AllocationError
from ..log import get_logger
from ..resources import Requirements, Resources
from ..task import Task, TaskError, TaskOutput, TaskResult

__all__ = [
    "AgentCluster",
    "AgentRegistry",
    "AgentRejectedError",
    "AgentUnknownError",
    "AttemptRef",
    "ByeRequest",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "LeaseConfig",
    "LeaseSettings",
    "PollRequest",
    "PollResponse",
    "RegisterRequest",
    "RegisterResponse",
    "RemoteAlloc",
    "ResultReport",
    "StartedReport",
]

log = get_logger("packsched.remote")

PROTOCOL_VERSION = 1


# -- wire types -------------------------------------------------------------------------------


class _Wire(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the agent protocol's messages."""


class AttemptRef(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One attempt of one task: the key of every report."""

    task_id: str
    attempt: int


class LeaseSettings(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the daemon tells an agent at registration: how often to call, how long to wait.

    Attributes:
        heartbeat_interval: seconds between heartbeats.
        lease_timeout: the daemon declares the alloc dead after this long without a word.
        poll_timeout: the longest a poll is held open.
        retry_max: the longest backoff between retries when the daemon is unreachable.
        resources: the alloc's resources as the daemon accounts them (what tasks may use).
    """

    heartbeat_interval: float
    lease_timeout: float
    poll_timeout: float
    retry_max: float
    resources: Resources


class ResultReport(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How an attempt ended. `started` says whether its command ever ran."""

    alloc_id: str
    agent_id: str
    task_id: str
    attempt: int
    started: bool
    result: TaskResult


class RegisterRequest(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An agent announcing itself, on start and again whenever the daemon forgot it.

    `running` lists the attempts still running there and `results` those that ended while the
    daemon could not be told, so that a restarted daemon re-attaches instead of losing them.
    """

    alloc_id: str
    agent_id: str
    hostname: str
    pid: int
    resources: Resources
    running: list[AttemptRef] = []
    results: list[ResultReport] = []
    version: int = PROTOCOL_VERSION


class RegisterResponse(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The lease settings the agent must keep to."""

    lease: LeaseSettings


class HeartbeatRequest(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A lease renewal, with the attempts running now."""

    alloc_id: str
    agent_id: str
    running: list[AttemptRef] = []


class HeartbeatResponse(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`exit`: the alloc was freed, stop everything and leave. `kill`: attempts to stop."""

    exit: bool = False
    kill: list[AttemptRef] = []


class PollRequest(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A long-poll for work, held up to `timeout` seconds (capped by the daemon)."""

    alloc_id: str
    agent_id: str
    timeout: float = 30.0


class PollResponse(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Attempts to run (re-sent until reported started), attempts to stop, and whether to exit."""

    assignments: list[Task] = []
    kill: list[AttemptRef] = []
    exit: bool = False


class StartedReport(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The attempt's command is running."""

    alloc_id: str
    agent_id: str
    task_id: str
    attempt: int


class ByeRequest(_Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The agent is leaving (after an exit order, or on its own with a reason)."""

    alloc_id: str
    agent_id: str
    reason: str = ""


class AgentUnknownError(AllocationError):
    """The daemon does not know this agent (it restarted, or the agent never registered):
    register again."""


class AgentRejectedError(AllocationError):
    """The daemon will never take this agent (its alloc was freed or is unknown): exit."""


class AgentNotYetError(AllocationError):
    """The daemon is resuming and does not know this alloc yet: retry shortly."""


# -- daemon side ------------------------------------------------------------------------------


class LeaseConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Timing of agent leases. Times are seconds.

    Attributes:
        heartbeat_interval: how often agents renew their lease.
        lease_timeout: an alloc not heard from for this long is dead (default 3 intervals).
        poll_timeout: the longest a poll is held (default 10 intervals, at most 30 s).
        start_timeout: an agent that has not registered this long after its alloc was asked
            for means a failed allocation (a queued Slurm job waits this long at most).
        reattach_grace: after a restart, how long an alloc the store had waits for its agent
            to come back before it is dead (default 2 intervals plus 5 s).
        exit_wait: when freeing, how long to wait for the agent to leave before cancelling
            its job or process (short: a cancelled job's agent leaves cleanly on SIGTERM too,
            and a stopping daemon may no longer be serving the exit order).
        kill_wait: when an attempt is cancelled, how long to wait for the agent to confirm.
    """

    heartbeat_interval: float = 5.0
    lease_timeout: float | None = None
    poll_timeout: float | None = None
    start_timeout: float = 300.0
    reattach_grace: float | None = None
    exit_wait: float = 2.0
    kill_wait: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval",
            "lease_timeout",
            "poll_timeout",
            "start_timeout",
            "reattach_grace",
            "exit_wait",
            "kill_wait",
        ):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")
        if self.lease <= self.heartbeat_interval:
            raise ValueError(
                f"lease_timeout ({self.lease:g}s) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval:g}s), or every alloc dies between two heartbeats"
            )

    @property
    def lease(self) -> float:
        """The lease timeout in effect."""
        return self.lease_timeout if self.lease_timeout is not None else 3 * self.heartbeat_interval

    @property
    def poll(self) -> float:
        """The poll timeout in effect."""
        if self.poll_timeout is not None:
            return self.poll_timeout
        return min(30.0, 10 * self.heartbeat_interval)

    @property
    def grace(self) -> float:
        """The re-attach grace in effect."""
        if self.reattach_grace is not None:
            return self.reattach_grace
        return 2 * self.heartbeat_interval + 5.0


_Key = tuple[str, int]


@dataclass(eq=False, slots=True)
class _Attempt:
    """One attempt the daemon handed to (or re-attached on) an agent."""

    task: Task
    started_cb: StartedCallback | None
    delivered: bool = False
    acked: bool = False  # the agent reported it started or ended: stop re-sending it
    started: bool = False
    result: TaskResult | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


def _key(task_id: str, attempt: int) -> _Key:
    return (task_id, attempt)


def _killed_result(message: str) -> TaskResult:
    return TaskResult(output=TaskOutput(errors=[TaskError(code="killed", message=message)]))


Check = Callable[[], Awaitable[str | None]]
Teardown = Callable[[], Awaitable[None]]


class RemoteAlloc(Alloc):
    """An alloc whose tasks run in a `packsched agent` somewhere else.

    The provider (`AgentCluster` subclass) makes one per alloc before it launches the agent,
    and gives it two hooks: `check` says why the job or process is gone (or None while it
    lives), `teardown` cancels it.
    """

    def __init__(
        self,
        registry: AgentRegistry,
        id: str,
        resources: Resources,
        labels: Mapping[str, str],
        *,
        register_deadline: float,
        check: Check | None = None,
        teardown: Teardown | None = None,
    ) -> None:
        self.id = id
        self.resources = resources
        self.labels: dict[str, str] = dict(labels)  # providers add theirs before it is returned
        self._registry = registry
        self.check = check
        self.teardown = teardown
        self.register_deadline = register_deadline
        self.agent_id: str | None = None
        self.hostname: str | None = None
        self.agent_pid: int | None = None
        self.measured: Resources | None = None
        self.last_seen: float | None = None
        self.registered = anyio.Event()
        self.dead_reason: str | None = None
        self.freed = False
        self.exiting = False
        self.gone = anyio.Event()  # the agent said goodbye
        self._attempts: dict[_Key, _Attempt] = {}
        self._agent_running: set[_Key] = set()  # as of the agent's latest word
        self._results: dict[_Key, tuple[bool, TaskResult]] = {}  # ended with nobody waiting
        self._kills: set[_Key] = set()
        self._kills_unsent: set[_Key] = set()  # a poll returns at once only for these
        self._wakeup = anyio.Event()

    # -- what the scheduler calls ---------------------------------------------------------

    async def run(self, task: Task, started: StartedCallback) -> TaskResult:
        """Queue the attempt for the agent and wait for its reports.

        Cancellation tells the agent to kill the attempt and waits (shielded, bounded by
        `kill_wait`) for it to confirm before re-raising.
        """
        if self.freed:
            raise AllocationError(f"alloc {self.id} is freed and cannot run task {task.id}")
        key = _key(task.id, task.attempt)
        attempt = _Attempt(task=task, started_cb=started)
        self._attempts[key] = attempt
        self._wake()
        return await self._wait(key, attempt)

    async def attach(self, task: Task, started: StartedCallback) -> TaskResult:
        """Wait for an attempt the agent ran before the daemon restarted.

        Raises:
            LookupError: the agent did not come back in time, or does not have this attempt.
        """
        key = _key(task.id, task.attempt)
        with anyio.move_on_after(max(0.0, self.register_deadline - time.monotonic())):
            await self.registered.wait()
        if not self.registered.is_set():
            raise LookupError(
                f"the agent of alloc {self.id} did not come back within "
                f"{self._registry.config.grace:g}s of the restart"
            )
        ended = self._results.pop(key, None)
        if ended is not None:
            if ended[0]:
                started()
            return ended[1]
        if key not in self._agent_running:
            raise LookupError(
                f"the agent of alloc {self.id} came back but does not run attempt "
                f"{task.attempt} of task {task.id}"
            )
        attempt = _Attempt(task=task, started_cb=started, delivered=True, acked=True)
        self._attempts[key] = attempt
        self._mark_started(attempt)
        return await self._wait(key, attempt)

    async def _wait(self, key: _Key, attempt: _Attempt) -> TaskResult:
        try:
            await attempt.done.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._cancel_attempt(key, attempt)
            raise
        finally:
            self._attempts.pop(key, None)
        assert attempt.result is not None
        return attempt.result

    async def _cancel_attempt(self, key: _Key, attempt: _Attempt) -> None:
        """Stop an attempt whose run was cancelled: unqueue it, or have the agent kill it."""
        if attempt.done.is_set():
            return
        if not attempt.delivered:
            return  # never sent; dropping the record unqueues it
        self._order_kill(key)
        if self.dead_reason is not None or self.freed:
            return  # nobody left to confirm
        self._wake()
        with anyio.move_on_after(self._registry.config.kill_wait):
            await attempt.done.wait()

    async def keepalive(self) -> None:
        """Renew the lease: fail when the agent was not heard from in time or its job is gone."""
        if self.freed:
            raise AllocationError(f"alloc {self.id} was freed")
        if self.dead_reason is not None:
            raise AllocationError(self.dead_reason)
        now = time.monotonic()
        if self.last_seen is None:
            if now > self.register_deadline:
                self.die(f"the agent of alloc {self.id} never registered")
                raise AllocationError(self.dead_reason or "dead")
        elif now - self.last_seen > self._registry.config.lease:
            self.die(
                f"the agent of alloc {self.id} was not heard from for {now - self.last_seen:.1f}s "
                f"(lease {self._registry.config.lease:g}s)"
            )
            raise AllocationError(self.dead_reason or "dead")
        if self.check is not None:
            reason = await self.check()
            if reason:
                self.die(reason)
                raise AllocationError(reason)

    async def free(self) -> None:
        """Tell the agent to leave, wait for it a little (unless dead), then tear down the job."""
        if self.freed:
            return
        self.freed = True
        self.exiting = True
        for attempt in self._attempts.values():
            if not attempt.done.is_set():
                attempt.result = _killed_result(f"alloc {self.id} was freed")
                attempt.done.set()
        self._wake()
        with anyio.CancelScope(shield=True):
            if self.dead_reason is None and self.last_seen is not None:
                with anyio.move_on_after(self._registry.config.exit_wait):
                    await self.gone.wait()
            try:
                if self.teardown is not None:
                    await self.teardown()
            finally:
                self._registry.forget(self)
        log.info("remote alloc freed", alloc_id=self.id, dead=self.dead_reason is not None)

    # -- state changes, from the routes and the provider ----------------------------------

    def die(self, reason: str) -> None:
        """Mark the alloc dead: the next keepalive fails and no attempt is sent any more."""
        if self.dead_reason is None:
            self.dead_reason = reason
            log.warning("remote alloc dead", alloc_id=self.id, reason=reason)
        self._wake()

    def _order_kill(self, key: _Key) -> None:
        self._kills.add(key)
        self._kills_unsent.add(key)

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = anyio.Event()

    def _mark_started(self, attempt: _Attempt) -> None:
        attempt.acked = True
        if not attempt.started:
            attempt.started = True
            if attempt.started_cb is not None:
                attempt.started_cb()

    def _seen(self, running: Sequence[AttemptRef] | None = None) -> None:
        self.last_seen = time.monotonic()
        if running is not None:
            self._agent_running = {_key(r.task_id, r.attempt) for r in running}
            for key in self._agent_running:
                attempt = self._attempts.get(key)
                if attempt is not None:
                    self._mark_started(attempt)

    def on_register(self, req: RegisterRequest) -> None:
        """Bind (or re-bind, after a restart of the daemon) the agent to this alloc."""
        self.agent_id = req.agent_id
        self.hostname = req.hostname
        self.agent_pid = req.pid
        self.measured = req.resources
        self._seen(req.running)
        for report in req.results:
            self.on_result(report)
        # The agent measures its machine (cores, memory; not GPUs): less than the alloc
        # holds means the tasks may be squeezed, which an operator wants to know.
        short = [d for d in ("cpu", "mem") if self.resources.amount(d) > req.resources.amount(d)]
        if short:
            log.warning(
                "agent measured less than its alloc holds",
                alloc_id=self.id,
                short=", ".join(short),
                measured=req.resources.describe(),
                alloc=self.resources.describe(),
            )
        self.registered.set()

    def on_heartbeat(self, req: HeartbeatRequest) -> HeartbeatResponse:
        self._seen(req.running)
        if time.monotonic() > self._registry.started_at + self._registry.config.grace:
            # Past the restart grace, an attempt the agent runs that nobody here waits for
            # (its task was killed or lost meanwhile) must not go on using the alloc.
            for key in self._agent_running - self._attempts.keys() - self._kills:
                self._order_kill(key)
        return HeartbeatResponse(exit=self.exiting, kill=self._kill_refs())

    async def on_poll(self, timeout: float) -> PollResponse:
        """Wait until there is something to send (or `timeout`), then send every unacked
        assignment, the kills and the exit order."""
        self._seen()
        with anyio.move_on_after(timeout):
            while not (
                self.exiting or self._kills_unsent or self._undelivered() or self._registry.stopping
            ):
                await self._wakeup.wait()
        self._seen()
        # Every pending kill goes out again (a lost answer loses none), but only new ones
        # make a poll return early: an agent still killing would otherwise poll in a loop.
        self._kills_unsent.clear()
        if self.exiting:
            return PollResponse(exit=True, kill=self._kill_refs())
        if self.dead_reason is not None:
            return PollResponse(kill=self._kill_refs())
        out: list[Task] = []
        for attempt in self._attempts.values():
            if not attempt.acked and not attempt.done.is_set():
                attempt.delivered = True
                out.append(attempt.task)
        return PollResponse(assignments=out, kill=self._kill_refs())

    def _undelivered(self) -> bool:
        if self.dead_reason is not None:
            return False
        return any(not a.delivered and not a.done.is_set() for a in self._attempts.values())

    def _kill_refs(self) -> list[AttemptRef]:
        return [AttemptRef(task_id=t, attempt=a) for t, a in sorted(self._kills)]

    def on_started(self, req: StartedReport) -> None:
        self._seen()
        attempt = self._attempts.get(_key(req.task_id, req.attempt))
        if attempt is not None:
            self._mark_started(attempt)

    def on_result(self, req: ResultReport) -> None:
        """Record how an attempt ended (a repeated report is ignored)."""
        self._seen()
        key = _key(req.task_id, req.attempt)
        self._agent_running.discard(key)
        killed = key in self._kills
        self._kills.discard(key)
        self._kills_unsent.discard(key)
        attempt = self._attempts.get(key)
        if attempt is None:
            if killed:
                return  # the answer to a kill nobody waits for any more
            if len(self._results) >= 10_000:  # bounded: nobody claims these after a while
                self._results.pop(next(iter(self._results)))
            self._results[key] = (req.started, req.result)
            return
        if attempt.done.is_set():
            return
        if req.started:
            self._mark_started(attempt)
        attempt.acked = True
        attempt.result = req.result
        attempt.done.set()

    def on_bye(self, req: ByeRequest) -> None:
        self._seen()
        if not self.exiting:
            self.die(f"the agent of alloc {self.id} left: {req.reason or 'no reason given'}")
        self.gone.set()


class AgentRegistry:
    """Every agent-backed alloc of one cluster, by id; the routes call into it.

    Args:
        config: lease timing.
        token: the bearer token agents must send (separate from the users' token).
    """

    def __init__(self, config: LeaseConfig, token: str) -> None:
        self.config = config
        self.token = token
        self.started_at = time.monotonic()
        self._allocs: dict[str, RemoteAlloc] = {}
        self._gone: set[str] = set()
        self.stopping = False

    def release_polls(self) -> None:
        """The server is stopping: answer every held poll now, and the next ones with "retry"."""
        self.stopping = True
        for alloc in self._allocs.values():
            alloc._wake()

    def add(self, alloc: RemoteAlloc) -> None:
        """Track a new alloc; its agent may now register."""
        self._allocs[alloc.id] = alloc

    def get(self, alloc_id: str) -> RemoteAlloc | None:
        """The live alloc with this id, if any."""
        return self._allocs.get(alloc_id)

    def allocs(self) -> list[RemoteAlloc]:
        """Every alloc not yet forgotten."""
        return list(self._allocs.values())

    def forget(self, alloc: RemoteAlloc) -> None:
        """Drop a freed alloc; its agent is told to exit if it calls again."""
        if self._allocs.get(alloc.id) is alloc:
            del self._allocs[alloc.id]
        self._gone.add(alloc.id)

    def lease(self, alloc: RemoteAlloc) -> LeaseSettings:
        cfg = self.config
        return LeaseSettings(
            heartbeat_interval=cfg.heartbeat_interval,
            lease_timeout=cfg.lease,
            poll_timeout=cfg.poll,
            retry_max=cfg.heartbeat_interval,
            resources=alloc.resources,
        )

    def _find(self, alloc_id: str, agent_id: str | None) -> RemoteAlloc:
        alloc = self._allocs.get(alloc_id)
        if alloc is None:
            if alloc_id in self._gone:
                raise AgentRejectedError(f"alloc {alloc_id} was freed; exit")
            if time.monotonic() < self.started_at + self.config.grace:
                raise AgentNotYetError(
                    f"alloc {alloc_id} is not known yet (the daemon is resuming)"
                )
            raise AgentRejectedError(f"alloc {alloc_id} is unknown to this daemon; exit")
        if agent_id is not None and alloc.agent_id != agent_id:
            if alloc.exiting:
                raise AgentRejectedError(f"alloc {alloc_id} is being freed; exit")
            raise AgentUnknownError(f"agent {agent_id} is not registered for alloc {alloc_id}")
        return alloc

    # -- the protocol ----------------------------------------------------------------------

    def register(self, req: RegisterRequest) -> RegisterResponse:
        """Raises `AgentRejectedError` (exit) or `AgentNotYetError` (retry)."""
        alloc = self._find(req.alloc_id, None)
        if alloc.exiting or alloc.dead_reason is not None:
            raise AgentRejectedError(
                f"alloc {alloc.id} is {'freed' if alloc.exiting else 'dead'}; exit"
            )
        if alloc.agent_id is not None and alloc.agent_id != req.agent_id:
            # A second agent for one alloc (a requeued job, say): the first one's attempts
            # cannot be trusted to still run, so the alloc is dead and both must go.
            alloc.die(
                f"a second agent ({req.agent_id} on {req.hostname}) registered for alloc "
                f"{alloc.id}, whose agent was {alloc.agent_id}"
            )
            raise AgentRejectedError(f"alloc {alloc.id} already has an agent; exit")
        alloc.on_register(req)
        log.info(
            "agent registered",
            alloc_id=alloc.id,
            agent_id=req.agent_id,
            hostname=req.hostname,
            pid=req.pid,
            running=len(req.running),
            results=len(req.results),
        )
        return RegisterResponse(lease=self.lease(alloc))

    def heartbeat(self, req: HeartbeatRequest) -> HeartbeatResponse:
        return self._find(req.alloc_id, req.agent_id).on_heartbeat(req)

    async def poll(self, req: PollRequest) -> PollResponse:
        if self.stopping:
            raise AgentNotYetError("the daemon is stopping; poll again shortly")
        alloc = self._find(req.alloc_id, req.agent_id)
        timeout = min(max(req.timeout, 0.0), self.config.poll)
        return await alloc.on_poll(timeout)

    def started(self, req: StartedReport) -> None:
        self._find(req.alloc_id, req.agent_id).on_started(req)

    def result(self, req: ResultReport) -> None:
        self._find(req.alloc_id, req.agent_id).on_result(req)

    def bye(self, req: ByeRequest) -> None:
        with contextlib.suppress(AgentRejectedError, AgentUnknownError, AgentNotYetError):
            self._find(req.alloc_id, req.agent_id).on_bye(req)


# -- the provider-neutral cluster -------------------------------------------------------------


def new_alloc_id(prefix: str) -> str:
    """A fresh alloc id, `<prefix>-<12 hex digits>`."""
    return f"{prefix}-{secrets.token_hex(6)}"


class AgentCluster(Cluster):
    """The half of a cluster whose allocs run `packsched agent`: allocation waits for the agent
    to register, re-attach waits for it to come back. Subclasses launch, check and cancel.

    The daemon calls `start(url)` before the scheduler starts, so that agents know where to
    call, and serves `agent_app()` under `/v1/agent`.

    Args:
        lease: lease timing.
        agent_token: the token agents send; a fresh random one when None (agents launched by
            an earlier daemon then cannot come back, so the daemon passes a persistent one).
        server_url: where agents reach the daemon (else set by `start`).
    """

    provider = "agent"

    def __init__(
        self,
        *,
        lease: LeaseConfig | None = None,
        agent_token: str | None = None,
        server_url: str | None = None,
    ) -> None:
        self.lease = lease or LeaseConfig()
        self.registry = AgentRegistry(self.lease, agent_token or secrets.token_urlsafe(32))
        self.server_url = server_url

    @property
    def agent_token(self) -> str:
        """The bearer token agents of this cluster send."""
        return self.registry.token

    async def start(self, server_url: str | None = None) -> None:
        """Learn the daemon's URL (unless one was configured) and load what the provider needs."""
        if self.server_url is None:
            self.server_url = server_url
        self.registry.started_at = time.monotonic()

    def agent_app(self) -> Any:
        """The ASGI app of the agent routes, to mount under `/v1/agent`."""
        from ..api.agent_routes import agent_app

        return agent_app(self.registry)

    def agent_env(self, alloc_id: str) -> dict[str, str]:
        """What an agent needs in its environment to find the daemon."""
        if self.server_url is None:
            raise AllocationError(
                f"{type(self).__name__} does not know the daemon's URL: call start(url) first, "
                f"or set server_url"
            )
        return {
            "PACKSCHED_URL": self.server_url,
            "PACKSCHED_AGENT_TOKEN": self.registry.token,
            "PACKSCHED_ALLOC_ID": alloc_id,
        }

    @abc.abstractmethod
    def _grant(self, requirements: Requirements) -> Resources:
        """The resources to ask the provider for (at least `requirements.min`)."""

    @abc.abstractmethod
    async def _launch(self, alloc: RemoteAlloc) -> None:
        """Start the job or process that runs the agent; set the alloc's `check` and
        `teardown` hooks and its provider labels (they are stored, for `_relaunch`)."""

    async def _wait_placeable(self, requirements: Requirements) -> None:
        """Wait until the provider has room (local providers); the default waits for nothing."""

    async def allocate(self, requirements: Requirements, labels: Mapping[str, str]) -> Alloc:
        """Launch an agent for an alloc of at least `requirements.min` and return the alloc
        once the agent has registered.

        Raises:
            AllocationError: the launch failed, or the agent did not register within
                `lease.start_timeout` (the job or process is then cancelled).
        """
        await self._wait_placeable(requirements)
        grant = self._grant(requirements)
        alloc = RemoteAlloc(
            self.registry,
            new_alloc_id(self.provider),
            grant,
            {**labels, "provider": self.provider},
            register_deadline=time.monotonic() + self.lease.start_timeout,
        )
        self.registry.add(alloc)
        ok = False
        try:
            await self._launch(alloc)
            with anyio.move_on_after(self.lease.start_timeout):
                while not alloc.registered.is_set():
                    reason = await self._launch_failed(alloc)
                    if reason:
                        raise AllocationError(reason)
                    with anyio.move_on_after(0.5):
                        await alloc.registered.wait()
            if not alloc.registered.is_set():
                raise AllocationError(
                    f"the agent of alloc {alloc.id} did not register within "
                    f"{self.lease.start_timeout:g}s (lease.start_timeout); its job was cancelled"
                )
            ok = True
            return alloc
        finally:
            if not ok:
                with anyio.CancelScope(shield=True):
                    alloc.exiting = True
                    alloc.dead_reason = "allocation abandoned"
                    await alloc.free()

    async def _launch_failed(self, alloc: RemoteAlloc) -> str | None:
        """While waiting for registration: why the launch has already failed, if it has."""
        return await alloc.check() if alloc.check is not None else None

    async def reattach(
        self, alloc_id: str, resources: Resources, labels: Mapping[str, str]
    ) -> Alloc | None:
        """Take back an alloc of the previous daemon whose job or process still lives.

        It does not wait here (the routes may not be served yet): the alloc's `attach` waits
        up to `lease.reattach_grace` for the agent to come back, and its keepalive fails once
        the grace passes without it.
        """
        if labels.get("provider") != self.provider:
            return None
        alloc = RemoteAlloc(
            self.registry,
            alloc_id,
            resources,
            labels,
            register_deadline=time.monotonic() + self.lease.grace,
        )
        if not await self._relaunch(alloc):
            return None
        self.registry.add(alloc)
        log.info("waiting for a remote alloc's agent to come back", alloc_id=alloc_id)
        return alloc

    async def _relaunch(self, alloc: RemoteAlloc) -> bool:
        """Rebuild the hooks of an alloc from its labels; False if its job or process is gone."""
        return False

    async def aclose(self) -> None:
        """Free what is still tracked (normally nothing: the scheduler frees every alloc)."""
        for alloc in self.registry.allocs():
            with contextlib.suppress(Exception):
                await alloc.free()
