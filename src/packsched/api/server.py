"""The HTTP API (ASGI, Starlette): `/v1` routes over a running Scheduler, probes, `/metrics`.

Every request body is decoded with msgspec into a wire type, so a fault comes back as a 4xx
whose JSON names its path (`$.tasks[3].resources.mem`); nothing is accepted from a batch
that has a fault anywhere. The scheduler knows nothing of HTTP: this module only translates.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import ServerConfig
from ..errors import InvalidSpecError, InvalidTransition, PackschedError, TaskNotFoundError
from ..log import get_logger
from ..scheduler import SchedulerClosedError
from ..store.base import HistoryQuery
from ..task import TRANSITIONS, Task, TaskState, is_task_id
from .models import (
    ErrorBody,
    ErrorDetail,
    HistoryResponse,
    PriorityRequest,
    RunDetail,
    RunKillResponse,
    RunList,
    SubmitRequest,
    SubmitResponse,
    TaskList,
    WaitRequest,
    WaitResponse,
    decode_error,
    split_path,
    summarize_run,
)
from .openapi import openapi_document

if TYPE_CHECKING:
    from ..scheduler import Scheduler

__all__ = ["ApiError", "ApiServer"]

log = get_logger("packsched.api")

_encoder = msgspec.json.Encoder()
_submit_decoder = msgspec.json.Decoder(SubmitRequest)
_wait_decoder = msgspec.json.Decoder(WaitRequest)
_priority_decoder = msgspec.json.Decoder(PriorityRequest)
_T = TypeVar("_T")

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_HISTORY = 10_000
_CONTROLS = ("hold", "release", "kill", "retry")


class ApiError(PackschedError):
    """A request the API refuses, with its HTTP status, stable code and (where known) path."""

    def __init__(self, status: int, code: str, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.path = path


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj), status, headers, media_type="application/json")


def _error(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> Response:
    return _json(ErrorBody(error=detail), status, headers)


def _error_response(exc: Exception) -> Response:
    """The one place where exceptions become HTTP errors."""
    if isinstance(exc, ApiError):
        headers = {"Retry-After": "2"} if exc.status == 503 else None
        return _error(
            exc.status, ErrorDetail(code=exc.code, message=str(exc), path=exc.path), headers
        )
    if isinstance(exc, TaskNotFoundError):
        return _error(404, ErrorDetail(code="not-found", message=str(exc), task_id=exc.task_id))
    if isinstance(exc, InvalidTransition):
        return _error(
            409,
            ErrorDetail(
                code="invalid-transition",
                message=str(exc),
                task_id=exc.task_id,
                current=exc.current,
                target=exc.target,
                action=exc.action,
            ),
        )
    if isinstance(exc, InvalidSpecError):
        return _error(400, ErrorDetail(code="invalid", message=str(exc), path=exc.path))
    log.exception("request failed", exc_info=exc)
    return _error(500, ErrorDetail(code="internal", message="internal error; see the daemon's log"))


Endpoint = Callable[[Request], Awaitable[Response]]


def _endpoint(fn: Endpoint) -> Endpoint:
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except Exception as exc:  # every failure becomes a JSON error body
            return _error_response(exc)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class _Asgi:
    """Wraps a plain ASGI function so that Starlette's Route calls it as an app, not as a
    request handler (Route tells them apart by whether the endpoint is a function)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class _BearerAuth:
    """ASGI middleware: every HTTP request outside `open_paths` must carry the bearer token."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        open_paths: frozenset[str],
        own_guard: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.open_paths = open_paths
        self.own_guard = own_guard  # path prefixes whose app checks its own token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] not in self.open_paths
            and not scope["path"].startswith(self.own_guard)
        ):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                detail = ErrorDetail(
                    code="unauthorized",
                    message="missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                    "(the CLI and clients read PACKSCHED_TOKEN or <state_dir>/token)",
                )
                response = _error(401, detail, {"WWW-Authenticate": 'Bearer realm="packsched"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiServer:
    """The API over one running Scheduler.

    Args:
        scheduler: a started Scheduler.
        config: limits (`max_body_bytes`, `max_batch`, `max_wait`) and whether `/metrics`
            needs the token.
        token: the bearer token; None turns authentication off (tests and embedding only).
        metrics: an ASGI app served at exactly `/metrics`.
        agent: an ASGI app for remote allocs, mounted under `/v1/agent`.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        config: ServerConfig,
        *,
        token: str | None,
        metrics: ASGIApp | None = None,
        agent: ASGIApp | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self._draining = False
        self._stopping = anyio.Event()
        routes: list[BaseRoute] = [
            Route("/livez", self.livez, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/v1/tasks", _endpoint(self.submit), methods=["POST"]),
            Route("/v1/tasks", _endpoint(self.list_tasks), methods=["GET"]),
            Route("/v1/tasks/{task_id}", _endpoint(self.get_task), methods=["GET"]),
            Route("/v1/tasks/{task_id}/priority", _endpoint(self.set_priority), methods=["POST"]),
            Route("/v1/tasks/{task_id}/{action}", _endpoint(self.control), methods=["POST"]),
            Route("/v1/wait", _endpoint(self.wait), methods=["POST"]),
            Route("/v1/runs", _endpoint(self.list_runs), methods=["GET"]),
            Route("/v1/runs/{run}", _endpoint(self.get_run), methods=["GET"]),
            Route("/v1/runs/{run}/kill", _endpoint(self.kill_run), methods=["POST"]),
            Route("/v1/stats", _endpoint(self.stats), methods=["GET"]),
            Route("/v1/history", _endpoint(self.history), methods=["GET"]),
        ]
        if metrics is not None:
            # A Route, not a Mount: a Mount would redirect /metrics to /metrics/.
            routes.append(Route("/metrics", _Asgi(metrics)))
        if agent is not None:
            routes.append(Mount("/v1/agent", agent))
        app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})
        # Exact paths only: no 307 from /metrics/ to /metrics (scrapers and clients see 404).
        app.router.redirect_slashes = False
        open_paths = {"/livez", "/readyz"} | (set() if config.metrics_auth else {"/metrics"})
        # The agent routes check the agent token themselves: agents never hold the users' token.
        own_guard = ("/v1/agent/",) if agent is not None else ()
        self.app: ASGIApp = (
            _BearerAuth(app, token, frozenset(open_paths), own_guard) if token else app
        )

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once `start_draining` was called: submits get 503 and `/readyz` fails."""
        return self._draining

    def start_draining(self) -> None:
        """Stop accepting work; everything else keeps being served."""
        self._draining = True

    def stop(self) -> None:
        """Release the long-polls now (they answer with what they have) so the server can stop."""
        self._draining = True
        self._stopping.set()

    # -- probes ----------------------------------------------------------------------------

    async def livez(self, request: Request) -> Response:
        """The process is up."""
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready for work; 503 while draining."""
        if self._draining:
            return _json({"status": "draining"}, 503)
        return _json({"status": "ready"})

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI 3 document of this API."""
        return _json(openapi_document())

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(
            exc.status_code, ErrorDetail(code=code, message=message), dict(exc.headers or {})
        )

    # -- helpers ---------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The request body, refusing (413) one larger than `max_body_bytes` before reading it all."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(
                    400, "invalid", "Content-Length must be a number", path="header.content-length"
                )
            if int(declared) > limit:
                raise ApiError(
                    413,
                    "too-large",
                    f"request body of {declared} bytes exceeds the limit of {limit}",
                )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too-large", f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _decode(self, request: Request, decoder: msgspec.json.Decoder[_T]) -> _T:
        body = await self._body(request)
        try:
            return decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise decode_error(exc) from None

    def _task_id(self, request: Request) -> str:
        task_id: str = request.path_params["task_id"]
        if not is_task_id(task_id):
            raise TaskNotFoundError(task_id)
        return task_id

    # -- tasks -----------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        """Submit a batch of specs, all or nothing; a repeated `key` returns the existing task."""
        if self._draining:
            raise ApiError(503, "draining", "the daemon is shutting down; submit again shortly")
        body = await self._decode(request, _submit_decoder)
        if len(body.tasks) > self.config.max_batch:
            raise ApiError(
                413,
                "too-large",
                f"$.tasks: a batch holds at most {self.config.max_batch} tasks, got {len(body.tasks)}",
                path="$.tasks",
            )
        specs = [wire.to_spec(f"$.tasks[{i}]") for i, wire in enumerate(body.tasks)]
        try:
            tasks = await self.scheduler.submit(*specs)
        except InvalidSpecError as exc:
            path = _batch_path(exc.path)
            raise InvalidSpecError(f"{path}: {split_path(str(exc))[0]}", path=path) from None
        except SchedulerClosedError:
            raise ApiError(
                503, "draining", "the daemon is shutting down; submit again shortly"
            ) from None
        if tasks:
            log.info(
                "submitted", count=len(tasks), first_task_id=tasks[0].id, last_task_id=tasks[-1].id
            )
        return _json(SubmitResponse(tasks=tasks))

    async def get_task(self, request: Request) -> Response:
        """One task's snapshot."""
        return _json(self.scheduler.get(self._task_id(request)))

    async def control(self, request: Request) -> Response:
        """hold / release / kill / retry one task; 409 names both states when not allowed."""
        action = request.path_params["action"]
        if action not in _CONTROLS:
            raise ApiError(
                404,
                "not-found",
                f"no such action {action!r}; use one of {', '.join(_CONTROLS)}, priority",
            )
        task_id = self._task_id(request)
        task: Task = await getattr(self.scheduler, action)(task_id)
        log.info(f"task {action}", task_id=task_id, state=task.state.value)
        return _json(task)

    async def set_priority(self, request: Request) -> Response:
        """Change a task's priority (lower runs first)."""
        task_id = self._task_id(request)
        body = await self._decode(request, _priority_decoder)
        task = await self.scheduler.set_priority(task_id, body.priority)
        log.info("task priority", task_id=task_id, priority=body.priority)
        return _json(task)

    async def list_tasks(self, request: Request) -> Response:
        """A page of tasks in submission order, filtered by state, label, run and kind."""
        query = request.query_params
        states = _states(query.getlist("state"))
        labels = _labels(query.getlist("label"))
        after = _int_param(query.get("after"), "after", 0, None)
        limit = _int_param(query.get("limit"), "limit", 1, MAX_PAGE) or DEFAULT_PAGE
        tasks = self.scheduler.list_tasks(
            states=states,
            labels=labels,
            run=query.get("run"),
            kind=query.get("kind"),
            after_seq=after,
            limit=limit + 1,
        )
        more = len(tasks) > limit
        tasks = tasks[:limit]
        return _json(TaskList(tasks=tasks, next_cursor=tasks[-1].seq if more else None))

    async def wait(self, request: Request) -> Response:
        """Long-poll until all (or the first) of the ids settle, or the capped timeout passes."""
        body = await self._decode(request, _wait_decoder)
        body.check()
        ids = list(dict.fromkeys(body.ids))
        for i, task_id in enumerate(body.ids):
            try:
                self.scheduler.get(task_id)
            except TaskNotFoundError:
                raise ApiError(
                    404, "not-found", f"no task has id {task_id!r}", path=f"$.ids[{i}]"
                ) from None
        cap = self.config.max_wait
        timeout = cap if body.timeout is None else min(body.timeout, cap)
        if ids and not self._stopping.is_set():
            async with anyio.create_task_group() as tg:

                async def release_on_stop() -> None:
                    await self._stopping.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(release_on_stop)
                # wait_many returns what settled when its time runs out; the answer is
                # built from fresh snapshots below either way.
                await self.scheduler.wait_many(ids, return_when=body.return_when, timeout=timeout)
                tg.cancel_scope.cancel()
        snapshots = [self.scheduler.get(task_id) for task_id in ids]
        settled = [t for t in snapshots if t.settled]
        pending = [t.id for t in snapshots if not t.settled]
        met = not pending if body.return_when == "all" else bool(settled) or not ids
        return _json(WaitResponse(tasks=settled, pending=pending, timed_out=not met))

    # -- runs ------------------------------------------------------------------------------

    async def list_runs(self, request: Request) -> Response:
        """Every run with its derived state, oldest first."""
        by_run: dict[str, list[Task]] = {}
        for task in self.scheduler.list_tasks():
            if task.spec.run is not None:
                by_run.setdefault(task.spec.run, []).append(task)
        return _json(RunList(runs=[summarize_run(run, tasks) for run, tasks in by_run.items()]))

    def _run_tasks(self, request: Request) -> tuple[str, list[Task]]:
        run: str = request.path_params["run"]
        tasks = self.scheduler.list_tasks(run=run)
        if not tasks:
            raise ApiError(404, "not-found", f"no task belongs to run {run!r}", path="path.run")
        return run, tasks

    async def get_run(self, request: Request) -> Response:
        """One run: its derived state and its tasks."""
        run, tasks = self._run_tasks(request)
        return _json(RunDetail(summary=summarize_run(run, tasks), tasks=tasks))

    async def kill_run(self, request: Request) -> Response:
        """Kill every task of a run that can still be killed.

        The kills run concurrently, so that their state changes share store commits.
        """
        run, tasks = self._run_tasks(request)
        killed: list[str] = []

        async def kill(task_id: str) -> None:
            try:
                await self.scheduler.kill(task_id)
            except InvalidTransition:
                return  # it settled meanwhile
            killed.append(task_id)

        async with anyio.create_task_group() as tg:
            for task in tasks:
                if TaskState.KILLED in TRANSITIONS[task.state]:
                    tg.start_soon(kill, task.id)
        log.info("run killed", run=run, killed=len(killed))
        order = {task.id: i for i, task in enumerate(tasks)}
        killed.sort(key=order.__getitem__)
        tasks = self.scheduler.list_tasks(run=run)
        return _json(RunKillResponse(summary=summarize_run(run, tasks), killed=killed))

    # -- stats and history -----------------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        """The scheduler's statistics snapshot; `?tasks=false` leaves out the per-task rows."""
        value = request.query_params.get("tasks", "true").lower()
        if value not in ("true", "false", "1", "0"):
            raise ApiError(
                400,
                "invalid",
                f"query.tasks: expected true or false, got {value!r}",
                path="query.tasks",
            )
        return _json(self.scheduler.stats(include_tasks=value in ("true", "1")))

    async def history(self, request: Request) -> Response:
        """Finished attempts, filtered by task, kind, run, state and time."""
        query = request.query_params
        states = _states(query.getlist("state"))
        if states is not None and len(states) > 1:
            raise ApiError(
                400, "invalid", "query.state: give at most one state", path="query.state"
            )
        task_id = query.get("task_id")
        if task_id is not None and not is_task_id(task_id):
            raise ApiError(
                400, "invalid", f"query.task_id: not a task id: {task_id!r}", path="query.task_id"
            )
        limit = _int_param(query.get("limit"), "limit", 1, MAX_HISTORY) or MAX_HISTORY
        q = HistoryQuery(
            task_id=task_id,
            kind=query.get("kind"),
            run=query.get("run"),
            state=states[0] if states else None,
            since=_float_param(query.get("since"), "since"),
            until=_float_param(query.get("until"), "until"),
            limit=limit,
        )
        return _json(HistoryResponse(attempts=await self.scheduler.history(q)))


# -- query parameters ------------------------------------------------------------------------


def _batch_path(path: str) -> str:
    """A scheduler path for the n-th spec (`$[3].after[0]`) as a path in the request body."""
    if path.startswith("$["):
        return "$.tasks" + path[1:]
    return path


def _states(values: Sequence[str]) -> list[TaskState] | None:
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not names:
        return None
    try:
        return [TaskState(name.lower()) for name in names]
    except ValueError:
        bad = next(n for n in names if n.lower() not in TaskState.__members__.values())
        allowed = ", ".join(s.value for s in TaskState)
        raise ApiError(
            400, "invalid", f"query.state: unknown state {bad!r}; use {allowed}", path="query.state"
        ) from None


def _labels(values: Sequence[str]) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ApiError(
                400,
                "invalid",
                f"query.label: expected key=value, got {value!r}",
                path="query.label",
            )
        labels[key] = val
    return labels or None


def _int_param(value: str | None, name: str, low: int, high: int | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low or (high is not None and number > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ApiError(
            400,
            "invalid",
            f"query.{name}: expected an integer {bound}, got {value!r}",
            path=f"query.{name}",
        )
    return number


def _float_param(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ApiError(
            400, "invalid", f"query.{name}: expected a number, got {value!r}", path=f"query.{name}"
        )
    return number
