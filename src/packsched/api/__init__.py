"""The daemon's HTTP face: the ASGI server (`packsched.api.server`) and the clients."""

from __future__ import annotations

from .client import ApiError as ApiError
from .client import AsyncClient as AsyncClient
from .client import Client as Client
from .client import DaemonUnreachableError as DaemonUnreachableError
from .client import TaskFailed as TaskFailed
from .client import UnauthorizedError as UnauthorizedError

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "DaemonUnreachableError",
    "TaskFailed",
    "UnauthorizedError",
]
