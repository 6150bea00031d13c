"""Test helpers for agent-backed clusters: serve the agent routes on a real loopback port."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from packsched import MiB, Resources, TaskSpec
from packsched.alloc.remote import AgentCluster
from packsched.api.client import AsyncClient
from packsched.task import Task, TaskState


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


DAEMON = (
    "import anyio, sys\n"
    "from packsched.api.daemon import serve\n"
    "from packsched.config import load_config\n"
    "anyio.run(serve, load_config(sys.argv[1]))\n"
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a restarted daemon must listen where agents call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", DAEMON, str(config)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


async def start_daemon(config: Path, log: Path, url: str) -> subprocess.Popen[bytes]:
    """Start the real daemon (`packsched.api.daemon.serve`) on `config`; return once ready."""
    proc = await anyio.to_thread.run_sync(_spawn_daemon, config, log)

    async def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}; see {log}")
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{url}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    with anyio.move_on_after(30):
        while not await ready():  # noqa: ASYNC110 - the deadline helper polls by design
            await anyio.sleep(0.05)
        return proc
    proc.kill()
    raise AssertionError(f"the daemon did not become ready; see {log}")


async def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon (it drains and frees its allocs), SIGKILL if it takes too long."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    with anyio.move_on_after(60):
        while proc.poll() is None:  # noqa: ASYNC110 - a process exit has no event here
            await anyio.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        await anyio.to_thread.run_sync(proc.wait)


async def wait_running(client: AsyncClient, task_id: str) -> None:
    """Poll the daemon until the task is RUNNING there (durable: the store says so)."""
    with anyio.fail_after(30):
        while (await client.get(task_id)).state is not TaskState.RUNNING:  # noqa: ASYNC110
            await anyio.sleep(0.05)


def counting(runs: Path, seconds: float) -> list[str]:
    """A command that appends its task id to `runs` when it starts, then sleeps."""
    return ["sh", "-c", f'echo "$PACKSCHED_TASK_ID" >> {runs}; sleep {seconds}']


async def kill_daemon_midrun_and_restart(
    config: Path,
    log: Path,
    url: str,
    runs: Path,
    *,
    seconds: float,
    timeout: float,
    before_submit: Callable[[], Awaitable[None]] | None = None,
    before_kill: Callable[[], object] | None = None,
) -> list[Task]:
    """The re-attach scenario every agent-backed cluster must pass: start the real daemon, run
    two tasks, SIGKILL the daemon while both run, restart it, and check that both COMPLETE at
    attempt 0, never lost, each run exactly once. Returns the two settled tasks; the daemon is
    stopped at the end, and its log printed if anything failed."""
    daemon = await start_daemon(config, log, url)
    try:
        if before_submit is not None:
            await before_submit()
        async with AsyncClient(url, "user-token") as client:
            tasks = await client.submit(
                [
                    TaskSpec(
                        command=counting(runs, seconds), resources=Resources(cpu=1, mem=64 * MiB)
                    )
                    for _ in range(2)
                ]
            )
            ids = [t.id for t in tasks]
            await wait_for(lambda: len(count_lines(runs)) == 2, timeout, "both tasks to start")
            for task_id in ids:
                await wait_running(client, task_id)
        if before_kill is not None:
            before_kill()
        daemon.kill()
        await anyio.to_thread.run_sync(daemon.wait)
        daemon = await start_daemon(config, log, url)
        async with AsyncClient(url, "user-token") as client:
            done = [await client.wait(task_id, timeout=timeout) for task_id in ids]
        assert [t.state for t in done] == [TaskState.COMPLETE] * 2, [t.error for t in done]
        assert [(t.attempt, t.lost_count) for t in done] == [(0, 0), (0, 0)]
        assert count_lines(runs) == dict.fromkeys(ids, 1)
        return done
    except BaseException:
        # The daemon's side of the story, in pytest's report.
        print((await anyio.Path(log).read_text())[-20000:])
        raise
    finally:
        await stop_daemon(daemon)
