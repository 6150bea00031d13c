"""The agent routes, mounted under `/v1/agent`: what `packsched agent` calls.

They are guarded by the agent token, not the users' token, so that a job on a shared cluster
holds no credential that could submit or kill work. Bodies are msgspec JSON; a malformed one
gets a 400 naming its JSON path. The protocol's answers map onto statuses the agent acts on:
404 `unknown-agent` (register again), 410 `exit` (leave), 503 `retry` (the daemon is resuming).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..alloc.remote import (
    AgentNotYetError,
    AgentRegistry,
    AgentRejectedError,
    AgentUnknownError,
    ByeRequest,
    HeartbeatRequest,
    PollRequest,
    RegisterRequest,
    ResultReport,
    StartedReport,
)

__all__ = ["MAX_BODY", "agent_app"]

MAX_BODY = 64 * 1024 * 1024  # a register carries every unreported result: allow a lot

_T = TypeVar("_T")
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[object]] = {}


class AgentErrorDetail(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What went wrong with an agent's call: a stable code, a message, and the JSON path."""

    code: str
    message: str
    path: str | None = None


class AgentErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """Every error body of the agent routes: `{"error": {...}}`."""

    error: AgentErrorDetail


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.path = path


def _json(obj: object, status: int = 200) -> Response:
    return Response(_encoder.encode(obj), status, media_type="application/json")


def _error(status: int, code: str, message: str, path: str | None = None) -> Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    body = AgentErrorBody(error=AgentErrorDetail(code=code, message=message, path=path))
    return Response(_encoder.encode(body), status, headers, media_type="application/json")


async def _decode(request: Request, kind: type[_T]) -> _T:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise _BadRequest(413, "too-large", f"request body exceeds {MAX_BODY} bytes")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise _BadRequest(413, "too-large", f"request body exceeds {MAX_BODY} bytes")
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `")
        path = at.rstrip("`") or "$"
        raise _BadRequest(400, "invalid", f"{path}: {message.replace('`', '')}", path) from None
    except msgspec.DecodeError as exc:
        raise _BadRequest(400, "invalid", f"malformed JSON: {exc}", "$") from None
    assert isinstance(value, kind)
    return value


Handler = Callable[[Request], Awaitable[Response]]


def agent_app(registry: AgentRegistry) -> Starlette:
    """The ASGI app of the agent protocol over `registry`, to mount under `/v1/agent`."""
    expected = f"Bearer {registry.token}".encode()

    def guarded(fn: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(
                    401,
                    "unauthorized",
                    "missing or wrong agent token: the agent sends PACKSCHED_AGENT_TOKEN as "
                    "'Authorization: Bearer <token>'",
                )
            try:
                return await fn(request)
            except _BadRequest as exc:
                return _error(exc.status, exc.code, str(exc), exc.path)
            except AgentUnknownError as exc:
                return _error(404, "unknown-agent", str(exc))
            except AgentRejectedError as exc:
                return _error(410, "exit", str(exc))
            except AgentNotYetError as exc:
                return _error(503, "retry", str(exc))

        endpoint.__name__ = fn.__name__
        return endpoint

    async def register(request: Request) -> Response:
        """An agent announces itself (again); answered with its lease settings."""
        return _json(registry.register(await _decode(request, RegisterRequest)))

    async def heartbeat(request: Request) -> Response:
        """Renew the lease; answered with attempts to kill and whether to exit."""
        return _json(registry.heartbeat(await _decode(request, HeartbeatRequest)))

    async def poll(request: Request) -> Response:
        """Long-poll for assignments."""
        return _json(await registry.poll(await _decode(request, PollRequest)))

    async def started(request: Request) -> Response:
        """An attempt's command is running (idempotent)."""
        registry.started(await _decode(request, StartedReport))
        return _json({"ok": True})

    async def result(request: Request) -> Response:
        """An attempt ended (idempotent)."""
        registry.result(await _decode(request, ResultReport))
        return _json({"ok": True})

    async def bye(request: Request) -> Response:
        """The agent is leaving."""
        registry.bye(await _decode(request, ByeRequest))
        return _json({"ok": True})

    routes = [
        Route(f"/{fn.__name__}", guarded(fn), methods=["POST"])
        for fn in (register, heartbeat, poll, started, result, bye)
    ]
    return Starlette(routes=routes)
