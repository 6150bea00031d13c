"""The agent protocol: routes, leases, idempotent reports, and the agent against a daemon that
forgets it, disappears or refuses it (in-process HTTP through httpx's ASGI transport)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from packsched import Resources, TaskSpec, TaskState
from packsched.agent import Agent, AgentConfig
from packsched.alloc.remote import (
    AgentRegistry,
    LeaseConfig,
    RemoteAlloc,
    ResultReport,
)
from packsched.api.agent_routes import agent_app
from packsched.errors import AllocationError
from packsched.task import Task, TaskResult, new_task_id

from .cluster.agents import wait_for

TOKEN = "agent-token"
LEASE = LeaseConfig(heartbeat_interval=0.05, lease_timeout=1.0, kill_wait=0.5, exit_wait=0.5)
BASE = "http://daemon.test/v1/agent"


class Flaky(httpx.AsyncBaseTransport):
    """An ASGI transport to a swappable app that can be made unreachable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("the daemon is down", request=request)
        return await httpx.ASGITransport(app=self.app).handle_async_request(request)


def mounted(registry: AgentRegistry) -> ASGIApp:
    """The agent routes where the daemon serves them, under /v1/agent."""
    return Starlette(routes=[Mount("/v1/agent", agent_app(registry))])


def new_registry() -> AgentRegistry:
    registry = AgentRegistry(LEASE, TOKEN)
    registry.started_at = time.monotonic() - 3600  # long past any restart grace
    return registry


def new_alloc(registry: AgentRegistry, alloc_id: str = "test-1") -> RemoteAlloc:
    alloc = RemoteAlloc(
        registry,
        alloc_id,
        Resources(cpu=1),
        {"provider": "test"},
        register_deadline=time.monotonic() + 30,
    )
    registry.add(alloc)
    return alloc


def task(command: list[str], attempt: int = 0) -> Task:
    spec = TaskSpec(command=command, resources=Resources(cpu=0.1))
    return Task(id=new_task_id(), spec=spec, state=TaskState.STAGING, attempt=attempt)


def body(**fields: object) -> bytes:
    return msgspec.json.encode(fields)


@pytest.fixture
async def http() -> AsyncIterator[tuple[AgentRegistry, httpx.AsyncClient]]:
    registry = new_registry()
    transport = httpx.ASGITransport(app=mounted(registry))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers=headers) as client:
        yield registry, client


async def register(client: httpx.AsyncClient, alloc_id: str = "test-1") -> httpx.Response:
    return await client.post(
        "/register",
        content=body(alloc_id=alloc_id, agent_id="a1", hostname="h", pid=1, resources={"cpu": 1}),
    )


async def test_wrong_token_is_refused(http: tuple[AgentRegistry, httpx.AsyncClient]) -> None:
    """The agent routes want the agent token, and say so."""
    registry, client = http
    new_alloc(registry)
    response = await client.post(
        "/register", content=b"{}", headers={"Authorization": "Bearer users-token"}
    )
    assert response.status_code == 401
    assert "agent token" in response.json()["error"]["message"]


async def test_a_malformed_body_names_its_json_path(
    http: tuple[AgentRegistry, httpx.AsyncClient],
) -> None:
    """A bad field is a 400 whose path says where."""
    _, client = http
    response = await client.post(
        "/register",
        content=body(alloc_id="x", agent_id="a", hostname="h", pid="one", resources={}),
    )
    assert response.status_code == 400
    assert response.json()["error"]["path"] == "$.pid"


async def test_unknown_and_freed_allocs_are_told_to_exit(
    http: tuple[AgentRegistry, httpx.AsyncClient],
) -> None:
    """An agent of an alloc the daemon does not hold gets 410; an unregistered one gets 404."""
    registry, client = http
    assert (await register(client, "nobody")).status_code == 410
    alloc = new_alloc(registry)
    heartbeat = body(alloc_id=alloc.id, agent_id="a1", running=[])
    assert (await client.post("/heartbeat", content=heartbeat)).status_code == 404
    assert (await register(client)).status_code == 200
    assert (await client.post("/heartbeat", content=heartbeat)).status_code == 200
    await alloc.free()
    assert (await client.post("/heartbeat", content=heartbeat)).status_code == 410


async def test_reports_are_idempotent_and_assignments_resent_until_acked(
    http: tuple[AgentRegistry, httpx.AsyncClient],
) -> None:
    """An assignment is re-sent until reported started; repeated reports change nothing."""
    registry, client = http
    alloc = new_alloc(registry)
    assert (await register(client)).status_code == 200
    t = task(["true"])
    started: list[int] = []
    results: list[TaskResult] = []

    async def run() -> None:
        results.append(await alloc.run(t, lambda: started.append(1)))

    poll = body(alloc_id=alloc.id, agent_id="a1", timeout=5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        first = (await client.post("/poll", content=poll)).json()
        second = (
            await client.post("/poll", content=body(alloc_id=alloc.id, agent_id="a1", timeout=0))
        ).json()
        assert [a["id"] for a in first["assignments"]] == [t.id]
        assert [a["id"] for a in second["assignments"]] == [t.id]  # not acked yet: again
        ref = {"alloc_id": alloc.id, "agent_id": "a1", "task_id": t.id, "attempt": 0}
        for _ in range(2):
            assert (await client.post("/started", content=body(**ref))).status_code == 200
        third = (
            await client.post("/poll", content=body(alloc_id=alloc.id, agent_id="a1", timeout=0))
        ).json()
        assert third["assignments"] == []
        result = {"exit_code": 0}
        for _ in range(2):
            response = await client.post(
                "/result", content=body(**ref, started=True, result=result)
            )
            assert response.status_code == 200
    assert started == [1]
    assert [r.exit_code for r in results] == [0]


async def test_keepalive_fails_once_the_lease_runs_out() -> None:
    """No word from the agent for longer than the lease: the keepalive fails, for good."""
    registry = new_registry()
    alloc = new_alloc(registry)
    alloc.last_seen = time.monotonic()
    await alloc.keepalive()
    alloc.last_seen = time.monotonic() - LEASE.lease - 1
    with pytest.raises(AllocationError, match="not heard from"):
        await alloc.keepalive()
    alloc.last_seen = time.monotonic()
    with pytest.raises(AllocationError):
        await alloc.keepalive()


async def test_an_agent_that_never_registers_fails_the_keepalive() -> None:
    """Past the registration deadline without an agent, the alloc is dead."""
    registry = new_registry()
    alloc = new_alloc(registry)
    alloc.register_deadline = time.monotonic() - 1
    with pytest.raises(AllocationError, match="never registered"):
        await alloc.keepalive()


def test_lease_config_refuses_a_lease_shorter_than_a_heartbeat() -> None:
    """A lease that would expire between two heartbeats is a config error."""
    with pytest.raises(ValueError, match="heartbeat_interval"):
        LeaseConfig(heartbeat_interval=5, lease_timeout=2)


# -- the agent itself ------------------------------------------------------------------------


def agent_for(
    alloc: RemoteAlloc, transport: Flaky, tmp_path: Path, **options: float | None
) -> Agent:
    config = AgentConfig(
        server="http://daemon.test",
        token=TOKEN,
        alloc_id=alloc.id,
        work_root=str(tmp_path / "w"),
        **options,  # type: ignore[arg-type]
    )
    return Agent(config, transport=transport)


async def test_agent_runs_an_assignment_once_and_leaves_when_freed(tmp_path: Path) -> None:
    """The agent runs what it is given once (a re-sent assignment is ignored) and leaves on free."""
    registry = new_registry()
    alloc = new_alloc(registry)
    transport = Flaky(mounted(registry))
    agent = agent_for(alloc, transport, tmp_path)
    marker = tmp_path / "ran"
    t = task(["sh", "-c", f"echo x >> {marker}"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        await alloc.registered.wait()
        agent._start(t)  # as if the first poll's answer had been lost and the task re-sent
        started: list[int] = []
        result = await alloc.run(t, lambda: started.append(1))
        assert result.exit_code == 0 and started == [1]
        await alloc.free()
    assert marker.read_text() == "x\n"
    assert alloc.gone.is_set()
    assert not (tmp_path / "w").exists()


async def test_agent_keeps_running_while_the_daemon_is_unreachable(tmp_path: Path) -> None:
    """With the daemon unreachable the attempt goes on; its result is reported once it is back."""
    registry = new_registry()
    alloc = new_alloc(registry)
    transport = Flaky(mounted(registry))
    agent = agent_for(alloc, transport, tmp_path)
    gate = tmp_path / "gate"
    t = task(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done; echo done"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        started = anyio.Event()
        results: list[TaskResult] = []

        async def run() -> None:
            results.append(await alloc.run(t, started.set))

        tg.start_soon(run)
        await started.wait()
        transport.down = True
        gate.touch()
        await wait_for(lambda: not agent._running, 10, "the attempt to end while cut off")
        assert not results
        transport.down = False
        await wait_for(lambda: bool(results), 10, "the result to arrive after the outage")
        assert results[0].stdout_tail == "done\n"
        await alloc.free()


async def test_agent_registers_again_with_a_restarted_daemon_which_reattaches(
    tmp_path: Path,
) -> None:
    """A new daemon (new registry) does not know the agent: it registers again with what runs,
    and the re-attached attempt's result reaches the new daemon."""
    registry = new_registry()
    alloc = new_alloc(registry)
    transport = Flaky(mounted(registry))
    agent = agent_for(alloc, transport, tmp_path)
    gate = tmp_path / "gate"
    t = task(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done; echo after"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        started = anyio.Event()

        async def first_daemon() -> None:
            await alloc.run(t, started.set)

        tg.start_soon(first_daemon)
        await started.wait()
        # The daemon restarts: a new registry whose alloc comes from the store.
        tg2_registry = AgentRegistry(LEASE, TOKEN)
        back = new_alloc(tg2_registry, alloc.id)
        transport.app = mounted(tg2_registry)
        reattached: list[int] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as inner:

                async def release() -> None:
                    await back.registered.wait()
                    gate.touch()

                inner.start_soon(release)
                result = await back.attach(t, lambda: reattached.append(1))
        assert result.stdout_tail == "after\n"
        assert reattached == [1]
        await back.free()
        tg.cancel_scope.cancel()  # the first daemon's run never ends: it is gone


async def test_a_refused_agent_stops_its_attempts_and_exits(tmp_path: Path) -> None:
    """An agent the daemon no longer knows is told to exit: it kills what runs and leaves."""
    registry = new_registry()
    alloc = new_alloc(registry)
    transport = Flaky(mounted(registry))
    agent = agent_for(alloc, transport, tmp_path)
    t = task(["sleep", "60"])
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.run)
            started = anyio.Event()

            async def run() -> None:
                await alloc.run(t, started.set)

            tg.start_soon(run)
            await started.wait()
            transport.app = mounted(new_registry())  # a daemon that never held this alloc
            await wait_for(lambda: agent._exit.is_set(), 10, "the agent to be refused")
            await wait_for(lambda: not agent._running, 10, "the attempt to be stopped")
            tg.cancel_scope.cancel()


async def test_results_of_attempts_ended_while_away_travel_with_the_registration() -> None:
    """A result held while the daemon was away is accepted at registration (attach finds it)."""
    registry = new_registry()
    alloc = new_alloc(registry)
    t = task(["true"])
    report = ResultReport(
        alloc_id=alloc.id,
        agent_id="a1",
        task_id=t.id,
        attempt=0,
        started=True,
        result=TaskResult(exit_code=0),
    )
    from packsched.alloc.remote import RegisterRequest

    registry.register(
        RegisterRequest(
            alloc_id=alloc.id,
            agent_id="a1",
            hostname="h",
            pid=1,
            resources=Resources(cpu=1),
            results=[report],
        )
    )
    started: list[int] = []
    result = await alloc.attach(t, lambda: started.append(1))
    assert result.exit_code == 0 and started == [1]
    with pytest.raises(LookupError, match="does not run"):
        await alloc.attach(task(["true"]), lambda: None)


async def test_a_failure_as_the_agent_leaves_on_its_own_is_a_loss_not_a_result(
    tmp_path: Path,
) -> None:
    """A task dying just as its job is cancelled (both get SIGTERM) is not reported as failed:
    the agent leaves without its result, so the daemon counts the attempt lost."""
    registry = new_registry()
    alloc = new_alloc(registry)
    transport = Flaky(mounted(registry))
    agent = agent_for(alloc, transport, tmp_path)
    t = task(["sh", "-c", "exit 3"])
    results: list[TaskResult] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.run)

            async def run() -> None:
                results.append(await alloc.run(t, lambda: None))

            tg.start_soon(run)
            await wait_for(lambda: (t.id, 0) in agent._seen, 10, "the attempt to arrive")
            await wait_for(lambda: not agent._running, 10, "the attempt to fail")
            agent._leave("received SIGTERM")  # within the hold: as if the job were cancelled
            await alloc.gone.wait()
            assert alloc.dead_reason is not None and "SIGTERM" in alloc.dead_reason
            assert not results
            tg.cancel_scope.cancel()


async def test_an_agent_whose_daemon_is_gone_for_good_leaves(tmp_path: Path) -> None:
    """Past orphan_timeout without reaching the daemon, the agent stops its work and leaves."""
    registry = new_registry()
    alloc = new_alloc(registry)
    transport = Flaky(mounted(registry))
    agent = agent_for(alloc, transport, tmp_path, orphan_timeout=0.5)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.run)
            await alloc.registered.wait()
            transport.down = True
            await wait_for(lambda: agent._exit.is_set(), 10, "the agent to give up")
        assert "unreachable" in agent._exit_reason


async def test_an_agent_that_cannot_register_in_time_leaves(tmp_path: Path) -> None:
    """An agent whose allocation was abandoned (it never gets to register) leaves by itself."""
    registry = new_registry()
    alloc = new_alloc(registry)
    transport = Flaky(mounted(registry))
    transport.down = True
    agent = agent_for(alloc, transport, tmp_path, register_timeout=0.5)
    with anyio.fail_after(20):
        await agent.run()
    assert "could not register" in agent._exit_reason
