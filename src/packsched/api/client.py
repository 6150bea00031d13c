"""`Client` (blocking) and `AsyncClient`: the same methods over the daemon's HTTP API.

Both are thin drivers over one request layer: `_Calls` turns each method into a `_Call` (method,
path, body, how to decode the answer), and the operations that take several requests (wait,
as_completed, result, paged lists, chunked submits) are generators that yield calls and receive
their decoded answers. The sync client runs them with `httpx.Client`, the async one with
`httpx.AsyncClient`; neither hides an event loop.

Connection failures and 502/503/504 answers are retried with exponential backoff for up to
`retry_timeout` seconds. That is safe for submits because every spec carries a `key`: a repeat
returns the task the first attempt created.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar, overload

import anyio
import httpx
import msgspec

from ..config import CONFIG_ENV, DaemonConfig, load_config
from ..errors import InvalidSpecError, InvalidTransition, PackschedError, TaskNotFoundError
from ..stats.snapshot import StatsSnapshot
from ..task import Attempt, Task, TaskResult, TaskSpec, TaskState
from .models import (
    ErrorBody,
    HistoryResponse,
    RunDetail,
    RunKillResponse,
    RunList,
    RunSummary,
    SubmitResponse,
    TaskList,
    WaitResponse,
)

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "DaemonUnreachableError",
    "TaskFailed",
    "UnauthorizedError",
    "default_token",
    "default_url",
]

T = TypeVar("T")
ReturnWhen = Literal["all", "first"]

SUBMIT_CHUNK = 1000  # specs per request when a submit is larger
WAIT_SLICE = 60.0  # longest single long-poll; the server may cap it lower
FEW = 64  # as_completed: up to this many pending ids, each settled task is yielded at once
GATHER = 1.0  # as_completed: with more pending, poll this often and yield what settled


# -- errors ----------------------------------------------------------------------------------


class ApiError(PackschedError):
    """The daemon refused a request: its HTTP status, stable `code` and the JSON `path` at fault."""

    def __init__(self, status: int, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.path = path


class UnauthorizedError(ApiError):
    """The daemon wants a (different) bearer token: set PACKSCHED_TOKEN or pass `token=`."""


class DaemonUnreachableError(PackschedError):
    """The daemon could not be reached (or stayed unavailable) for the whole retry period."""


class TaskFailed(PackschedError):
    """A task `result()` waited for did not complete: its state, exit code, error codes and the
    tail of its stderr."""

    def __init__(self, task: Task) -> None:
        self.task = task
        result = task.result
        self.exit_code = result.exit_code if result else None
        self.error_codes = [e.code for e in result.output.errors] if result else []
        self.stderr_tail = result.stderr_tail if result else ""
        parts = [f"task {task.id} ({task.spec.display_name()}) ended {task.state.value}"]
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if result and result.output.errors:
            parts.append("; ".join(f"{e.code}: {e.message}" for e in result.output.errors))
        message = ", ".join(parts)
        if self.stderr_tail:
            message += "\n--- stderr (tail) ---\n" + self.stderr_tail.rstrip()
        super().__init__(message)


# -- defaults --------------------------------------------------------------------------------


def _daemon_config() -> DaemonConfig:
    """The daemon's config as a client sees it: the file `$PACKSCHED_CONFIG` names (with the
    `PACKSCHED_*` overrides the daemon would apply in this environment), else the defaults."""
    path = os.environ.get(CONFIG_ENV)
    return load_config(path) if path else DaemonConfig()


def default_url(config: Callable[[], DaemonConfig] = _daemon_config) -> str:
    """`$PACKSCHED_URL`, else the address in the config `$PACKSCHED_CONFIG` names, else the
    daemon's default address on this machine. `config` gives the daemon's config, called
    only when the variable is not set.

    Raises:
        ConfigError: `$PACKSCHED_CONFIG` names a file that is unreadable or invalid, or that
            gives no fixed port.
    """
    return os.environ.get("PACKSCHED_URL") or config().client_url()


def default_token(config: Callable[[], DaemonConfig] = _daemon_config) -> str | None:
    """`$PACKSCHED_TOKEN`, else the token of the daemon `$PACKSCHED_CONFIG` describes, else the
    token file a local daemon wrote, else None. `config` as for `default_url`.

    Raises:
        ConfigError: as `default_url`, or the config's `server.token_file` is unreadable.
    """
    token = os.environ.get("PACKSCHED_TOKEN")
    return token.strip() if token else config().client_token()


# -- the request layer -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One HTTP request and how to decode its answer."""

    method: str
    path: str
    decode: Callable[[bytes], T]
    body: bytes | None = None
    params: list[tuple[str, str]] | None = None
    wait: float = 0.0  # how long the server may hold the request (long-poll)


@dataclass(frozen=True, slots=True)
class _Emit:
    """A value an iterating operation hands to its caller (as_completed)."""

    task: Task


Flow = Generator[_Call[Any], Any, T]
_encoder = msgspec.json.Encoder()


def _decoder(cls: type[T]) -> Callable[[bytes], T]:
    return msgspec.json.Decoder(cls).decode


_task = _decoder(Task)
_tasks = _decoder(SubmitResponse)
_page = _decoder(TaskList)
_waited = _decoder(WaitResponse)
_error_body = _decoder(ErrorBody)


def _with_key(spec: TaskSpec) -> TaskSpec:
    return spec if spec.key is not None else msgspec.structs.replace(spec, key=uuid.uuid4().hex)


def _task_filters(
    state: TaskState | str | Iterable[TaskState | str] | None,
    label: dict[str, str] | None,
    run: str | None,
    kind: str | None,
) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if state is not None:
        states = [state] if isinstance(state, str) else list(state)
        params += [("state", str(s)) for s in states]
    params += [("label", f"{k}={v}") for k, v in (label or {}).items()]
    if run is not None:
        params.append(("run", run))
    if kind is not None:
        params.append(("kind", kind))
    return params


class _Calls:
    """Every operation as `_Call`s and flows; no I/O here."""

    @staticmethod
    def submit(specs: Sequence[TaskSpec]) -> Flow[list[Task]]:
        keyed = [_with_key(s) for s in specs]
        out: list[Task] = []
        chunk = SUBMIT_CHUNK
        while len(out) < len(keyed):
            body = _encoder.encode({"tasks": keyed[len(out) : len(out) + chunk]})
            try:
                response: SubmitResponse = yield _Call("POST", "/v1/tasks", _tasks, body)
            except ApiError as exc:
                # The daemon's body or batch limit is lower than this chunk: halve and go on.
                # Nothing of a refused batch was accepted, and keys make a repeat harmless.
                if exc.status != 413 or chunk == 1:
                    raise
                chunk //= 2
                continue
            out += response.tasks
        return out

    @staticmethod
    def get(task_id: str) -> _Call[Task]:
        return _Call("GET", f"/v1/tasks/{task_id}", _task)

    @staticmethod
    def control(task_id: str, action: str) -> _Call[Task]:
        return _Call("POST", f"/v1/tasks/{task_id}/{action}", _task, b"")

    @staticmethod
    def set_priority(task_id: str, priority: int) -> _Call[Task]:
        body = _encoder.encode({"priority": priority})
        return _Call("POST", f"/v1/tasks/{task_id}/priority", _task, body)

    @staticmethod
    def page(params: list[tuple[str, str]], after: int | None, limit: int) -> _Call[TaskList]:
        extra = [("limit", str(limit))] + ([("after", str(after))] if after is not None else [])
        return _Call("GET", "/v1/tasks", _page, params=params + extra)

    @staticmethod
    def list_tasks(params: list[tuple[str, str]], limit: int | None) -> Flow[list[Task]]:
        out: list[Task] = []
        after: int | None = None
        while limit is None or len(out) < limit:
            size = 1000 if limit is None else min(1000, limit - len(out))
            page: TaskList = yield _Calls.page(params, after, size)
            out += page.tasks
            if page.next_cursor is None:
                break
            after = page.next_cursor
        return out

    @staticmethod
    def wait_once(
        ids: Sequence[str], return_when: ReturnWhen, timeout: float
    ) -> _Call[WaitResponse]:
        body = _encoder.encode({"ids": list(ids), "return_when": return_when, "timeout": timeout})
        return _Call("POST", "/v1/wait", _waited, body, wait=timeout)

    @staticmethod
    def wait(
        ids: Sequence[str], timeout: float | None, return_when: ReturnWhen
    ) -> Flow[list[Task]]:
        """Long-poll in slices until the condition holds; TimeoutError when `timeout` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(ids))
        settled: dict[str, Task] = {}
        while pending:
            left = WAIT_SLICE if deadline is None else max(0.0, deadline - time.monotonic())
            answer: WaitResponse = yield _Calls.wait_once(
                pending, return_when, min(left, WAIT_SLICE)
            )
            settled.update((t.id, t) for t in answer.tasks)
            pending = answer.pending
            if return_when == "first" and answer.tasks:
                break
            if pending and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(pending)} of {len(ids)} tasks had not settled after {timeout}s "
                    f"(first pending: {pending[0]})"
                )
        return [settled[i] for i in dict.fromkeys(ids) if i in settled]

    @staticmethod
    def as_completed(
        ids: Sequence[str], timeout: float | None
    ) -> Generator[_Call[Any] | _Emit, Any, None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(ids))
        while pending:
            left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{len(pending)} of {len(ids)} tasks had not settled after {timeout}s"
                )
            if len(pending) > FEW:
                # Many ids: one poll a second at most, each gathering everything that settled,
                # instead of a request (carrying every pending id) per settled task.
                call = _Calls.wait_once(pending, "all", min(left, GATHER))
            else:
                call = _Calls.wait_once(pending, "first", min(left, WAIT_SLICE))
            answer: WaitResponse = yield call
            pending = answer.pending
            for task in answer.tasks:
                yield _Emit(task)

    @staticmethod
    def result(task_id: str, timeout: float | None) -> Flow[TaskResult]:
        [task] = yield from _Calls.wait([task_id], timeout, "all")
        if task.state != TaskState.COMPLETE or task.result is None:
            raise TaskFailed(task)
        return task.result

    @staticmethod
    def runs() -> _Call[list[RunSummary]]:
        return _Call("GET", "/v1/runs", lambda b: _decoder(RunList)(b).runs)

    @staticmethod
    def run(name: str) -> _Call[RunDetail]:
        return _Call("GET", f"/v1/runs/{_quote(name)}", _decoder(RunDetail))

    @staticmethod
    def kill_run(name: str) -> _Call[RunKillResponse]:
        return _Call("POST", f"/v1/runs/{_quote(name)}/kill", _decoder(RunKillResponse), b"")

    @staticmethod
    def stats(include_tasks: bool) -> _Call[StatsSnapshot]:
        params = [("tasks", "true" if include_tasks else "false")]
        return _Call("GET", "/v1/stats", _decode_stats, params=params)

    @staticmethod
    def history(**query: Any) -> _Call[list[Attempt]]:
        params = [(k, str(v)) for k, v in query.items() if v is not None]
        return _Call(
            "GET", "/v1/history", lambda b: _decoder(HistoryResponse)(b).attempts, params=params
        )


def _decode_stats(content: bytes) -> StatsSnapshot:
    """JSON has no infinity: a histogram's last bound (+Inf) arrives as null and is restored."""
    raw = msgspec.json.decode(content)
    for histogram in (raw.get("counters") or {}).values():
        if isinstance(histogram, dict) and isinstance(histogram.get("bounds"), list):
            histogram["bounds"] = [math.inf if b is None else b for b in histogram["bounds"]]
    return msgspec.convert(raw, StatsSnapshot)


def _quote(segment: str) -> str:
    from urllib.parse import quote

    return quote(segment, safe="")


def _raise_for(status: int, content: bytes) -> None:
    """Turn an error answer into the matching packsched exception."""
    try:
        error = _error_body(content).error
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise ApiError(status, "http", f"HTTP {status}: {content[:200]!r}") from None
    if status == 404 and error.task_id:
        raise TaskNotFoundError(error.task_id)
    if status == 409 and error.task_id and error.current and error.target and error.action:
        raise InvalidTransition(error.task_id, error.current, error.target, error.action)
    if status == 401:
        raise UnauthorizedError(status, error.code, error.message)
    if status == 400 and error.path:
        raise InvalidSpecError(error.message, path=error.path)
    raise ApiError(status, error.code, error.message, error.path)


_RETRY_STATUS = frozenset({502, 503, 504})
_RETRY_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
)


class _Base:
    """What both clients share: address, token, retry policy, answer decoding."""

    def __init__(
        self, url: str | None, token: str | None, timeout: float, retry_timeout: float
    ) -> None:
        config = functools.cache(_daemon_config)  # read at most once, and only when needed
        self.url = (url or default_url(config)).rstrip("/")
        token = token if token is not None else default_token(config)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self.retry_timeout = retry_timeout

    def _timeout_for(self, call: _Call[Any]) -> httpx.Timeout:
        return httpx.Timeout(self._timeout, read=self._timeout + call.wait)

    @staticmethod
    def _answer(call: _Call[T], response: httpx.Response) -> T:
        if response.status_code >= 400:
            _raise_for(response.status_code, response.content)
        return call.decode(response.content)

    def _backoff(self, attempt: int, started: float, why: str) -> float:
        """Seconds to sleep before the next try, or raise when the retry period is used up."""
        if time.monotonic() - started >= self.retry_timeout:
            raise DaemonUnreachableError(
                f"cannot reach the packsched daemon at {self.url} ({why}); is `packsched serve` "
                f"running? (set PACKSCHED_URL for another address)"
            )
        return min(2.0, 0.05 * 2.0**attempt) * (0.5 + random.random() / 2)


class Client(_Base):
    """A blocking client for the daemon (httpx.Client underneath).

    Args:
        url: the daemon's address; default `$PACKSCHED_URL`, else the address in the config
            file `$PACKSCHED_CONFIG` names, else http://127.0.0.1:8742.
        token: the bearer token; default `$PACKSCHED_TOKEN`, else the token of the daemon
            `$PACKSCHED_CONFIG` describes, else `<state_dir>/token`.
        timeout: seconds for connecting and for each answer (long-polls get their wait on top).
        retry_timeout: how long connection failures and 502/503/504 are retried.
        transport: an httpx transport (for tests).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry_timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retry_timeout)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _execute(self, call: _Call[T]) -> T:
        started, attempt = time.monotonic(), 0
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    content=call.body,
                    params=tuple(call.params or ()),
                    timeout=self._timeout_for(call),
                )
            except _RETRY_ERRORS as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in _RETRY_STATUS:
                    return self._answer(call, response)
                why = f"HTTP {response.status_code}"
                if time.monotonic() - started >= self.retry_timeout:
                    return self._answer(call, response)
            time.sleep(self._backoff(attempt, started, why))
            attempt += 1

    def _drive(self, flow: Flow[T]) -> T:
        """Run a flow: execute each call it yields, send back the answer or throw the error."""
        try:
            call = next(flow)
            while True:
                try:
                    answer = self._execute(call)
                except PackschedError as exc:
                    call = flow.throw(exc)
                else:
                    call = flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    # -- the API ---------------------------------------------------------------------------

    @overload
    def submit(self, specs: TaskSpec) -> Task: ...
    @overload
    def submit(self, specs: Sequence[TaskSpec]) -> list[Task]: ...
    def submit(self, specs: TaskSpec | Sequence[TaskSpec]) -> Task | list[Task]:
        """Submit one spec (returns its Task) or many (returns their Tasks, in order).

        Specs without a `key` get one, so a retried request never submits twice.
        """
        if isinstance(specs, TaskSpec):
            return self._drive(_Calls.submit([specs]))[0]
        return self._drive(_Calls.submit(specs))

    @overload
    def wait(  # type: ignore[overload-overlap]
        self, ids: str, *, timeout: float | None = None, return_when: ReturnWhen = "all"
    ) -> Task: ...
    @overload
    def wait(
        self, ids: Sequence[str], *, timeout: float | None = None, return_when: ReturnWhen = "all"
    ) -> list[Task]: ...
    def wait(
        self,
        ids: str | Sequence[str],
        *,
        timeout: float | None = None,
        return_when: ReturnWhen = "all",
    ) -> Task | list[Task]:
        """Wait until the task(s) settle: all of them, or the first; return the settled ones.

        Raises:
            TimeoutError: `timeout` seconds passed first.
        """
        if isinstance(ids, str):
            return self._drive(_Calls.wait([ids], timeout, "all"))[0]
        return self._drive(_Calls.wait(ids, timeout, return_when))

    def as_completed(self, ids: Sequence[str], *, timeout: float | None = None) -> Iterator[Task]:
        """Yield each task as it settles."""
        flow = _Calls.as_completed(ids, timeout)
        answer: Any = None
        while True:
            try:
                item = flow.send(answer)
            except StopIteration:
                return
            if isinstance(item, _Emit):
                answer = None
                yield item.task
            else:
                answer = self._execute(item)

    def result(self, task_id: str, *, timeout: float | None = None) -> TaskResult:
        """Wait for the task and return its result; raise `TaskFailed` unless it completed."""
        return self._drive(_Calls.result(task_id, timeout))

    def get(self, task_id: str) -> Task:
        """One task (raises `TaskNotFoundError`)."""
        return self._execute(_Calls.get(task_id))

    def hold(self, task_id: str) -> Task:
        """Keep a waiting task from starting until released."""
        return self._execute(_Calls.control(task_id, "hold"))

    def release(self, task_id: str) -> Task:
        """Let a held task be scheduled again."""
        return self._execute(_Calls.control(task_id, "release"))

    def kill(self, task_id: str) -> Task:
        """Kill a task wherever it is."""
        return self._execute(_Calls.control(task_id, "kill"))

    def retry(self, task_id: str) -> Task:
        """Run a task in ERROR again as a new attempt."""
        return self._execute(_Calls.control(task_id, "retry"))

    def set_priority(self, task_id: str, priority: int) -> Task:
        """Change a task's priority (lower runs first)."""
        return self._execute(_Calls.set_priority(task_id, priority))

    def list_tasks(
        self,
        *,
        state: TaskState | str | Iterable[TaskState | str] | None = None,
        label: dict[str, str] | None = None,
        run: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[Task]:
        """Tasks in submission order, filtered; all of them unless `limit` is given."""
        return self._drive(_Calls.list_tasks(_task_filters(state, label, run, kind), limit))

    def runs(self) -> list[RunSummary]:
        """Every run with its derived state."""
        return self._execute(_Calls.runs())

    def run(self, name: str) -> RunDetail:
        """One run and its tasks."""
        return self._execute(_Calls.run(name))

    def kill_run(self, name: str) -> RunKillResponse:
        """Kill every task of a run that can still be killed."""
        return self._execute(_Calls.kill_run(name))

    def stats(self, *, include_tasks: bool = True) -> StatsSnapshot:
        """The daemon's statistics snapshot (`include_tasks=False`: without per-task rows)."""
        return self._execute(_Calls.stats(include_tasks))

    def history(self, **query: Any) -> list[Attempt]:
        """Finished attempts: filter by task_id, kind, run, state, since, until, limit."""
        return self._execute(_Calls.history(**query))


class AsyncClient(_Base):
    """The async twin of `Client` (httpx.AsyncClient underneath); same arguments and methods."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retry_timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retry_timeout)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _execute(self, call: _Call[T]) -> T:
        started, attempt = time.monotonic(), 0
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    content=call.body,
                    params=tuple(call.params or ()),
                    timeout=self._timeout_for(call),
                )
            except _RETRY_ERRORS as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in _RETRY_STATUS:
                    return self._answer(call, response)
                why = f"HTTP {response.status_code}"
                if time.monotonic() - started >= self.retry_timeout:
                    return self._answer(call, response)
            await anyio.sleep(self._backoff(attempt, started, why))
            attempt += 1

    async def _drive(self, flow: Flow[T]) -> T:
        """See `Client._drive`."""
        try:
            call = next(flow)
            while True:
                try:
                    answer = await self._execute(call)
                except PackschedError as exc:
                    call = flow.throw(exc)
                else:
                    call = flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    @overload
    async def submit(self, specs: TaskSpec) -> Task: ...
    @overload
    async def submit(self, specs: Sequence[TaskSpec]) -> list[Task]: ...
    async def submit(self, specs: TaskSpec | Sequence[TaskSpec]) -> Task | list[Task]:
        """See `Client.submit`."""
        if isinstance(specs, TaskSpec):
            return (await self._drive(_Calls.submit([specs])))[0]
        return await self._drive(_Calls.submit(specs))

    @overload
    async def wait(  # type: ignore[overload-overlap]
        self, ids: str, *, timeout: float | None = None, return_when: ReturnWhen = "all"
    ) -> Task: ...
    @overload
    async def wait(
        self, ids: Sequence[str], *, timeout: float | None = None, return_when: ReturnWhen = "all"
    ) -> list[Task]: ...
    async def wait(
        self,
        ids: str | Sequence[str],
        *,
        timeout: float | None = None,
        return_when: ReturnWhen = "all",
    ) -> Task | list[Task]:
        """See `Client.wait`."""
        if isinstance(ids, str):
            return (await self._drive(_Calls.wait([ids], timeout, "all")))[0]
        return await self._drive(_Calls.wait(ids, timeout, return_when))

    async def as_completed(
        self, ids: Sequence[str], *, timeout: float | None = None
    ) -> AsyncIterator[Task]:
        """See `Client.as_completed`."""
        flow = _Calls.as_completed(ids, timeout)
        answer: Any = None
        while True:
            try:
                item = flow.send(answer)
            except StopIteration:
                return
            if isinstance(item, _Emit):
                answer = None
                yield item.task
            else:
                answer = await self._execute(item)

    async def result(self, task_id: str, *, timeout: float | None = None) -> TaskResult:
        """See `Client.result`."""
        return await self._drive(_Calls.result(task_id, timeout))

    async def get(self, task_id: str) -> Task:
        """See `Client.get`."""
        return await self._execute(_Calls.get(task_id))

    async def hold(self, task_id: str) -> Task:
        """See `Client.hold`."""
        return await self._execute(_Calls.control(task_id, "hold"))

    async def release(self, task_id: str) -> Task:
        """See `Client.release`."""
        return await self._execute(_Calls.control(task_id, "release"))

    async def kill(self, task_id: str) -> Task:
        """See `Client.kill`."""
        return await self._execute(_Calls.control(task_id, "kill"))

    async def retry(self, task_id: str) -> Task:
        """See `Client.retry`."""
        return await self._execute(_Calls.control(task_id, "retry"))

    async def set_priority(self, task_id: str, priority: int) -> Task:
        """See `Client.set_priority`."""
        return await self._execute(_Calls.set_priority(task_id, priority))

    async def list_tasks(
        self,
        *,
        state: TaskState | str | Iterable[TaskState | str] | None = None,
        label: dict[str, str] | None = None,
        run: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[Task]:
        """See `Client.list_tasks`."""
        return await self._drive(_Calls.list_tasks(_task_filters(state, label, run, kind), limit))

    async def runs(self) -> list[RunSummary]:
        """See `Client.runs`."""
        return await self._execute(_Calls.runs())

    async def run(self, name: str) -> RunDetail:
        """See `Client.run`."""
        return await self._execute(_Calls.run(name))

    async def kill_run(self, name: str) -> RunKillResponse:
        """See `Client.kill_run`."""
        return await self._execute(_Calls.kill_run(name))

    async def stats(self, *, include_tasks: bool = True) -> StatsSnapshot:
        """See `Client.stats`."""
        return await self._execute(_Calls.stats(include_tasks))

    async def history(self, **query: Any) -> list[Attempt]:
        """See `Client.history`."""
        return await self._execute(_Calls.history(**query))
