"""`packsched agent`: the process inside a remote alloc (a Slurm job, a pod, a local process).

It registers its alloc with the daemon, renews the lease with heartbeats, long-polls for
assignments, runs each with the local executor (runtime statistics included) and reports when
it started and how it ended. Reports wait in an outbox until the daemon acknowledges them, so
while the daemon is unreachable the agent keeps its attempts running, retries with backoff, and
on its return registers again with what runs and what ended meanwhile. Each (task id, attempt)
runs at most once here, however often it is sent. On an exit order it kills what runs, reports,
says goodbye and removes its work directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import httpx
import msgspec

from .alloc.local import ExecutorConfig, LocalExecutor
from .alloc.remote import (
    AgentNotYetError,
    AgentRejectedError,
    AgentUnknownError,
    AttemptRef,
    ByeRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseSettings,
    PollRequest,
    PollResponse,
    RegisterRequest,
    RegisterResponse,
    ResultReport,
    StartedReport,
)
from .log import configure_logging, get_logger
from .resources import Resources
from .stats.runtime import machine_capacity
from .task import Task, TaskError, TaskOutput, TaskResult

__all__ = ["Agent", "AgentConfig", "main", "run_agent"]

log = get_logger("packsched.agent")

_T = TypeVar("_T")
_Key = tuple[str, int]
_encoder = msgspec.json.Encoder()

# A failed attempt's result waits this long before it is reported: when the job is cancelled
# (scancel, pod deletion) its tasks get the same SIGTERM as the agent, and may die of it just
# before the agent learns that it is leaving; such an attempt is lost with its alloc, not failed.
FAILURE_HOLD = 1.0

# Before the daemon has said how often to call: first retry after this, doubling.
_RETRY_INITIAL = 0.2
_RETRY_MAX_DEFAULT = 5.0


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What an agent needs: the daemon's URL, the agent token, its alloc id.

    Attributes:
        server: the daemon's base URL (`PACKSCHED_URL`).
        token: the agent token (`PACKSCHED_AGENT_TOKEN`); not the users' token.
        alloc_id: the alloc this agent serves (`PACKSCHED_ALLOC_ID`).
        work_root: where attempts' work dirs go; removed on exit when the agent made it.
        executor: how attempts run (kill grace, what is kept).
        register_timeout: an agent that cannot register for the first time within this many
            seconds leaves (its allocation was given up; None waits forever). Once registered,
            it waits for an unreachable daemon up to `orphan_timeout`.
        orphan_timeout: a daemon unreachable (or not answering) this long is taken for gone
            for good: the agent stops its attempts and leaves, so that a job does not hold its
            node forever (None: wait forever).
    """

    server: str
    token: str
    alloc_id: str
    work_root: str | None = None
    executor: ExecutorConfig = ExecutorConfig()
    register_timeout: float | None = None
    orphan_timeout: float | None = 3600.0


class _Transient(Exception):
    """The daemon could not be reached or answered with a server error: retry later."""


class Agent:
    """One agent: its registration, its loops and the attempts it runs.

    Args:
        config: where to call and as what.
        transport: an httpx transport (tests); the network by default.
    """

    def __init__(
        self, config: AgentConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self.agent_id = secrets.token_hex(8)
        root = config.work_root or os.path.join(
            tempfile.gettempdir(), f"packsched-agent-{config.alloc_id}"
        )
        self.work_root = Path(root).absolute()
        self._made_root = not self.work_root.exists()
        self.executor = LocalExecutor(self.work_root, config.executor)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._lease: LeaseSettings | None = None
        self._registered = False
        self._register_lock = anyio.Lock()
        self._measured = Resources()
        self._running: dict[_Key, anyio.CancelScope] = {}
        self._seen: set[_Key] = set()  # every attempt accepted here: none runs twice
        self._kill_ordered: set[_Key] = set()
        self._outbox: dict[_Key, StartedReport | ResultReport] = {}
        self._outbox_changed = anyio.Event()
        self._attempt_ended = anyio.Event()
        self._exit = anyio.Event()
        self._exit_reason = ""
        self._ordered_out = False
        self._unreachable_since: float | None = (
            None  # the daemon freed the alloc (as opposed to leaving on our own)
        )
        self._attempts_tg: anyio.abc.TaskGroup | None = None

    # -- the life of an agent -------------------------------------------------------------

    async def run(self) -> None:
        """Serve the alloc until the daemon frees it (or refuses it); then clean up."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        self._measured = await anyio.to_thread.run_sync(
            lambda: machine_capacity(reserve_mem=0, disk_path=self.work_root)
        )
        timeout = httpx.Timeout(10.0, read=None)
        async with httpx.AsyncClient(
            base_url=self.config.server.rstrip("/") + "/v1/agent",
            headers={"Authorization": f"Bearer {self.config.token}"},
            timeout=timeout,
            transport=self._transport,
        ) as client:
            self._client = client
            log.info(
                "agent starting",
                alloc_id=self.config.alloc_id,
                agent_id=self.agent_id,
                server=self.config.server,
                measured=self._measured.describe(),
            )
            async with anyio.create_task_group() as attempts:
                self._attempts_tg = attempts
                async with anyio.create_task_group() as loops:
                    loops.start_soon(self._main, loops.cancel_scope)
                # Leaving: stop what runs; each attempt puts its result in the outbox.
                for scope in list(self._running.values()):
                    scope.cancel()
            with anyio.move_on_after(10.0):
                await self._flush_outbox()
            with anyio.move_on_after(5.0), contextlib.suppress(Exception):
                await self._call(
                    "bye",
                    ByeRequest(
                        alloc_id=self.config.alloc_id,
                        agent_id=self.agent_id,
                        reason=self._exit_reason,
                    ),
                    None,
                )
        if self._made_root:
            await anyio.to_thread.run_sync(
                lambda: shutil.rmtree(self.work_root, ignore_errors=True)
            )
        log.info("agent stopped", alloc_id=self.config.alloc_id, reason=self._exit_reason)

    async def _main(self, loops: anyio.CancelScope) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._on_signal)
            tg.start_soon(self._watch_orphaned)
            await self._serve()
            tg.cancel_scope.cancel()
        loops.cancel()

    async def _watch_orphaned(self) -> None:
        """Leave once the daemon has been unreachable for `orphan_timeout` seconds."""
        limit = self.config.orphan_timeout
        if limit is None:
            return
        while True:
            await anyio.sleep(min(1.0, limit))
            since = self._unreachable_since
            if since is not None and time.monotonic() - since > limit:
                self._leave(f"the daemon was unreachable for more than {limit:g}s")
                return

    async def _on_signal(self) -> None:
        """SIGTERM (scancel, pod deletion, a provider's teardown) or SIGINT: leave cleanly."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                self._leave(f"received {signal.Signals(received).name}")

    async def _serve(self) -> None:
        try:
            with anyio.fail_after(self.config.register_timeout):
                await self._ensure_registered()
        except AgentRejectedError as exc:
            self._leave(str(exc))
        except TimeoutError:
            self._leave(
                f"could not register within {self.config.register_timeout:g}s "
                f"(--register-timeout); the daemon gave up on this alloc"
            )
        if not self._exit.is_set():
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._poll_loop)
                tg.start_soon(self._report_loop)
                await self._exit.wait()
                tg.cancel_scope.cancel()

    def _leave(self, reason: str) -> None:
        if not self._exit.is_set():
            log.info("agent leaving", alloc_id=self.config.alloc_id, reason=reason)
            self._exit_reason = reason
            self._exit.set()

    # -- calls ------------------------------------------------------------------------------

    async def _call(self, path: str, body: msgspec.Struct, kind: type[_T] | None) -> _T | None:
        """POST one message. Raises AgentUnknownError / AgentRejectedError / AgentNotYetError per the
        protocol, `_Transient` for anything worth retrying."""
        assert self._client is not None
        try:
            response = await self._client.post(
                f"/{path}",
                content=_encoder.encode(body),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
            raise _Transient(f"{path}: {type(exc).__name__}: {exc}") from None
        self._unreachable_since = None
        status = response.status_code
        if status == 404:
            raise AgentUnknownError(response.text)
        if status == 410:
            raise AgentRejectedError(_message(response))
        if status == 503:
            raise AgentNotYetError(_message(response))
        if status in (401, 400, 413):
            # A misconfigured agent (wrong token) or a protocol fault: retrying may help after
            # an operator fixes it, and killing running work would not.
            log.error(
                "the daemon refused a call", path=path, status=status, error=_message(response)
            )
            raise _Transient(f"{path}: HTTP {status}")
        if status >= 300:
            raise _Transient(f"{path}: HTTP {status}")
        if kind is None:
            return None
        try:
            return msgspec.json.decode(response.content, type=kind)
        except msgspec.DecodeError as exc:
            raise _Transient(f"{path}: bad answer: {exc}") from None

    def _retry_max(self) -> float:
        return self._lease.retry_max if self._lease is not None else _RETRY_MAX_DEFAULT

    async def _ensure_registered(self) -> None:
        """Register (again), retrying with backoff until the daemon answers.

        Raises:
            AgentRejectedError: the daemon will never take this alloc.
        """
        async with self._register_lock:
            delay = _RETRY_INITIAL
            while not self._registered:
                results = [r for r in self._outbox.values() if isinstance(r, ResultReport)]
                request = RegisterRequest(
                    alloc_id=self.config.alloc_id,
                    agent_id=self.agent_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    resources=self._measured,
                    running=self._running_refs(),
                    results=results,
                )
                try:
                    answer = await self._call("register", request, RegisterResponse)
                except (_Transient, AgentNotYetError, AgentUnknownError) as exc:
                    log.info("cannot register yet; retrying", error=str(exc), retry_in=delay)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self._retry_max())
                    continue
                assert answer is not None
                self._lease = answer.lease
                self._registered = True
                for report in results:
                    self._ack(report)
                log.info(
                    "registered",
                    alloc_id=self.config.alloc_id,
                    running=len(request.running),
                    results=len(results),
                )

    async def _protocol_call(
        self, path: str, body: msgspec.Struct, kind: type[_T] | None
    ) -> _T | None:
        """A call made while registered: re-register when the daemon forgot us, leave when it
        refuses us. Raises `_Transient` for the caller to back off."""
        while True:
            await self._ensure_registered()
            try:
                return await self._call(path, body, kind)
            except AgentUnknownError:
                log.info("the daemon forgot this agent; registering again")
                self._registered = False
            except AgentNotYetError as exc:
                raise _Transient(str(exc)) from None

    # -- loops ------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        delay = _RETRY_INITIAL
        while True:
            request = HeartbeatRequest(
                alloc_id=self.config.alloc_id, agent_id=self.agent_id, running=self._running_refs()
            )
            try:
                answer = await self._protocol_call("heartbeat", request, HeartbeatResponse)
            except AgentRejectedError as exc:
                self._leave(str(exc))
                return
            except _Transient as exc:
                log.warning("heartbeat failed; retrying", error=str(exc), retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._retry_max())
                continue
            delay = _RETRY_INITIAL
            assert answer is not None and self._lease is not None
            self._kill(answer.kill)
            if answer.exit:
                self._ordered_out = True
                self._leave("the daemon freed this alloc")
                return
            await anyio.sleep(self._lease.heartbeat_interval)

    async def _poll_loop(self) -> None:
        delay = _RETRY_INITIAL
        while True:
            assert self._lease is not None
            request = PollRequest(
                alloc_id=self.config.alloc_id,
                agent_id=self.agent_id,
                timeout=self._lease.poll_timeout,
            )
            try:
                answer = await self._protocol_call("poll", request, PollResponse)
            except AgentRejectedError as exc:
                self._leave(str(exc))
                return
            except _Transient as exc:
                log.warning("poll failed; retrying", error=str(exc), retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._retry_max())
                continue
            delay = _RETRY_INITIAL
            assert answer is not None
            self._kill(answer.kill)
            for task in answer.assignments:
                self._start(task)
            if answer.exit:
                self._ordered_out = True
                self._leave("the daemon freed this alloc")
                return

    async def _report_loop(self) -> None:
        delay = _RETRY_INITIAL
        while True:
            if not self._outbox:
                await self._outbox_changed.wait()
                continue
            try:
                await self._send_outbox()
            except AgentRejectedError as exc:
                self._leave(str(exc))
                return
            except _Transient as exc:
                log.warning("report failed; retrying", error=str(exc), retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._retry_max())
                continue
            delay = _RETRY_INITIAL

    async def _send_outbox(self) -> None:
        for report in list(self._outbox.values()):
            path = "result" if isinstance(report, ResultReport) else "started"
            await self._protocol_call(path, report, None)
            self._ack(report)

    async def _flush_outbox(self) -> None:
        """Send what is left once, on the way out (best effort)."""
        with contextlib.suppress(Exception):
            for report in list(self._outbox.values()):
                path = "result" if isinstance(report, ResultReport) else "started"
                await self._call(path, report, None)
                self._ack(report)

    def _ack(self, report: StartedReport | ResultReport) -> None:
        key = (report.task_id, report.attempt)
        if self._outbox.get(key) is report:
            del self._outbox[key]

    def _post(self, report: StartedReport | ResultReport) -> None:
        # A result replaces an unsent started report: it says the attempt started anyway.
        self._outbox[(report.task_id, report.attempt)] = report
        self._outbox_changed.set()
        self._outbox_changed = anyio.Event()

    # -- attempts ---------------------------------------------------------------------------

    def _running_refs(self) -> list[AttemptRef]:
        return [AttemptRef(task_id=t, attempt=a) for t, a in self._running]

    def _start(self, task: Task) -> None:
        key = (task.id, task.attempt)
        if key in self._seen or self._exit.is_set():
            return  # a re-sent assignment: it runs (or ran) here already
        self._seen.add(key)
        scope = anyio.CancelScope()
        self._running[key] = scope
        assert self._attempts_tg is not None
        self._attempts_tg.start_soon(self._run_attempt, task, scope)

    def _kill(self, refs: Sequence[AttemptRef]) -> None:
        for ref in refs:
            key = (ref.task_id, ref.attempt)
            scope = self._running.get(key)
            if scope is not None:
                log.info("killing an attempt", task_id=ref.task_id, attempt=ref.attempt)
                self._kill_ordered.add(key)
                scope.cancel()
            elif key not in self._seen:
                # Killed before it arrived: never run it, and say so, which clears the order.
                self._seen.add(key)
                self._post(self._report(ref.task_id, ref.attempt, False, _killed()))

    def _report(
        self, task_id: str, attempt: int, started: bool, result: TaskResult
    ) -> ResultReport:
        return ResultReport(
            alloc_id=self.config.alloc_id,
            agent_id=self.agent_id,
            task_id=task_id,
            attempt=attempt,
            started=started,
            result=result,
        )

    async def _run_attempt(self, task: Task, scope: anyio.CancelScope) -> None:
        key = (task.id, task.attempt)
        started = False

        def on_started() -> None:
            nonlocal started
            started = True
            self._post(
                StartedReport(
                    alloc_id=self.config.alloc_id,
                    agent_id=self.agent_id,
                    task_id=task.id,
                    attempt=task.attempt,
                )
            )

        result: TaskResult | None = None
        capacity = self._lease.resources if self._lease is not None else None
        env = {"PACKSCHED_ALLOC_ID": self.config.alloc_id}
        log.info("running an attempt", task_id=task.id, attempt=task.attempt)
        try:
            with scope:
                result = await self.executor.run(task, on_started, capacity=capacity, env=env)
        except Exception as exc:  # the executor failed, not the command: say so, do not crash
            log.exception("executor failed", task_id=task.id)
            result = TaskResult(
                output=TaskOutput(
                    errors=[
                        TaskError(
                            code="spawn-failed",
                            message=f"the agent could not run the attempt: {exc!r}",
                        )
                    ]
                )
            )
        finally:
            del self._running[key]
        if result is None:
            if key not in self._kill_ordered:
                # Stopped because the agent leaves on its own (a signal, a refusal): no result,
                # so the daemon counts the attempt lost with the alloc and runs it elsewhere.
                log.info("attempt abandoned", task_id=task.id, attempt=task.attempt)
                return
            result = _killed()
        elif result.output.errors and key not in self._kill_ordered:
            with anyio.move_on_after(FAILURE_HOLD):
                await self._exit.wait()
            if self._exit.is_set() and not self._ordered_out:
                log.info("attempt lost with the alloc", task_id=task.id, attempt=task.attempt)
                return
        log.info("attempt ended", task_id=task.id, attempt=task.attempt, exit_code=result.exit_code)
        self._post(self._report(task.id, task.attempt, started, result))


def _killed() -> TaskResult:
    return TaskResult(
        output=TaskOutput(errors=[TaskError(code="killed", message="killed on the daemon's order")])
    )


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except Exception:
        return response.text[:500]


async def run_agent(config: AgentConfig) -> None:
    """Run one agent to its end."""
    await Agent(config).run()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `packsched agent` options (added to `parser` when given, for the main CLI)."""
    parser = parser or argparse.ArgumentParser(
        prog="packsched agent", description="Run tasks of one remote alloc for a packsched daemon."
    )
    parser.add_argument("--server", help="the daemon's URL (default: $PACKSCHED_URL)")
    parser.add_argument(
        "--token", help="the agent token (default: $PACKSCHED_AGENT_TOKEN; prefer the variable)"
    )
    parser.add_argument("--alloc-id", help="the alloc this agent serves ($PACKSCHED_ALLOC_ID)")
    parser.add_argument("--work-root", help="where attempts run (default: a temporary dir)")
    parser.add_argument(
        "--kill-grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL on a kill"
    )
    parser.add_argument(
        "--orphan-timeout",
        type=float,
        default=3600.0,
        help="leave when the daemon has been unreachable this long (default 3600 s)",
    )
    parser.add_argument(
        "--register-timeout",
        type=float,
        default=None,
        help="leave if the first registration does not succeed within this many seconds",
    )
    return parser


def config_from_args(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> AgentConfig:
    """Flags first, then the environment.

    Raises:
        SystemExit: (via the message) a required value is missing.
    """
    env = os.environ if environ is None else environ
    server = args.server or env.get("PACKSCHED_URL")
    token = args.token or env.get("PACKSCHED_AGENT_TOKEN")
    alloc_id = args.alloc_id or env.get("PACKSCHED_ALLOC_ID")
    missing = [
        name
        for name, value in (
            ("--server / PACKSCHED_URL", server),
            ("--token / PACKSCHED_AGENT_TOKEN", token),
            ("--alloc-id / PACKSCHED_ALLOC_ID", alloc_id),
        )
        if not value
    ]
    if missing:
        raise SystemExit(f"packsched agent: missing {', '.join(missing)}")
    assert server and token and alloc_id
    return AgentConfig(
        server=server,
        token=token,
        alloc_id=alloc_id,
        work_root=args.work_root,
        executor=ExecutorConfig(kill_grace=args.kill_grace),
        register_timeout=args.register_timeout,
        orphan_timeout=args.orphan_timeout,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run an agent from parsed options; the token leaves the environment before any task runs."""
    config = config_from_args(args)
    # The tasks inherit the environment: they must not hold the agent's credential.
    os.environ.pop("PACKSCHED_AGENT_TOKEN", None)
    # An agent is a process of its own: its log (JSON lines off a terminal) goes to stderr,
    # which the provider keeps (a Slurm job's output, a pod's log, ProcessCluster's file).
    level = os.environ.get("PACKSCHED_LOG_LEVEL", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise SystemExit(
            f"packsched agent: PACKSCHED_LOG_LEVEL must be debug, info, warning or error, "
            f"got {level!r}"
        )
    configure_logging(level, "auto")
    anyio.run(run_agent, config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m packsched.agent`: the same as `packsched agent`."""
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
