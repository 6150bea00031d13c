"""Test helpers for agent-backed clusters: serve the agent routes on a real loopback port."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from packsched.alloc.remote import AgentCluster


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the test owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_agents(cluster: AgentCluster) -> AsyncIterator[str]:
    """Serve `cluster`'s agent routes under /v1/agent on 127.0.0.1, start the cluster with
    that URL, and yield it."""
    app = Starlette(routes=[Mount("/v1/agent", cluster.agent_app())])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = _Server(
        uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, log_level="warning")
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            await wait_for(lambda: server.started, 10, "the test server to start")
            await cluster.start(url)
            try:
                yield url
            finally:
                server.should_exit = True
    finally:
        sock.close()


async def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until it is true, failing the test after `timeout` seconds."""
    with anyio.move_on_after(timeout):
        while not condition():  # noqa: ASYNC110 - the deadline helper polls by design
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def count_lines(path: Path) -> dict[str, int]:
    """How many times each line occurs in a file (tasks append their name to count runs)."""
    counts: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            counts[line] = counts.get(line, 0) + 1
    return counts
