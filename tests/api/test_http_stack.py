"""The HTTP client stack as installed: requests over a real socket cost no failed imports."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from typing import Any

import httpx
import pytest

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _OkServer:
    """A loopback HTTP/1.1 server that answers every request "ok", and closes every
    connection it accepted when it stops (so no transport is left to the garbage collector)."""

    def __init__(self) -> None:
        self.handlers: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        self.writers.append(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(_RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.handlers)
        for writer in self.writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_async_requests_make_no_failed_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpcore imports sniffio for every lock it makes; without sniffio installed each of
    those is a failed import (Python does not cache them), which took AsyncClient to ~2 ms of
    CPU per request with 16 in flight. packsched depends on sniffio for that reason."""
    failed: list[str] = []
    real_import = builtins.__import__

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return real_import(name, *args, **kwargs)
        except ImportError:
            failed.append(name)
            raise

    ok = _OkServer()
    server = await asyncio.start_server(ok.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await client.get("/")  # warm up: connection and first imports
            monkeypatch.setattr(builtins, "__import__", spy)
            replies = await asyncio.gather(*(client.get("/") for _ in range(16)))
            monkeypatch.undo()
    finally:
        server.close()
        await ok.close()
        await server.wait_closed()
    assert [r.text for r in replies] == ["ok"] * 16
    assert failed == []
