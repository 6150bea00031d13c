"""An in-process API over a SimCluster scheduler, reached through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from packsched import KiB, Scheduler, SchedulerConfig, Task
from packsched.api import AsyncClient
from packsched.api.server import ApiServer
from packsched.cluster import SimCluster
from packsched.config import ServerConfig

from ..conftest import hosted

TOKEN = "test-token"
LIMITS = ServerConfig(max_body_bytes=64 * KiB, max_batch=50, max_wait=5.0)


@dataclass
class Api:
    """The pieces a test touches: the scheduler, the server, a Client and a raw HTTP client."""

    scheduler: Scheduler
    server: ApiServer
    client: AsyncClient
    http: httpx.AsyncClient


def _exit_code(task: Task) -> int:
    # A task named "bad" fails with exit code 3; everything else exits 0.
    return 3 if task.spec.name == "bad" else 0


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    cluster = SimCluster(exit_code=_exit_code)
    async for sched in hosted(Scheduler(cluster, config=SchedulerConfig(drain_timeout=0.001))):
        server = ApiServer(sched, LIMITS, token=TOKEN, metrics=None)
        transport = httpx.ASGITransport(app=server.app)
        async with (
            AsyncClient("http://api", TOKEN, transport=transport, retry_timeout=0) as client,
            httpx.AsyncClient(
                transport=transport,
                base_url="http://api",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as http,
        ):
            yield Api(sched, server, client, http)
