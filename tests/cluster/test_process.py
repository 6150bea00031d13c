"""ProcessCluster end to end: real agent processes, a real HTTP server, the real Scheduler."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from packsched import GiB, MiB, Resources, Scheduler, SchedulerConfig, TaskSpec, TaskState
from packsched.alloc.remote import LeaseConfig
from packsched.cluster.process import ProcessCluster
from packsched.store.base import HistoryQuery

from ..conftest import hosted
from .agents import (
    count_lines,
    counting,
    free_port,
    kill_daemon_midrun_and_restart,
    serve_agents,
    wait_for,
)

LEASE = LeaseConfig(heartbeat_interval=0.2, start_timeout=30, exit_wait=5, kill_wait=10)
CONFIG = SchedulerConfig(
    keepalive_interval=0.1,
    keepalive_timeout=5,
    min_alloc=Resources(cpu=1, mem=128 * MiB),
    max_alloc_idle_time=30,
)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcessCluster]:
    cluster = ProcessCluster(
        capacity=Resources(cpu=2, mem=1 * GiB, disk=1 * GiB),
        work_root=tmp_path / "work",
        lease=LEASE,
        kill_grace=1,
    )
    async for _ in hosted(serve_agents(cluster)):
        yield cluster
    await cluster.aclose()


async def test_tasks_run_on_agent_processes(cluster: ProcessCluster) -> None:
    """Tasks run in agent processes and come back COMPLETE with output and statistics."""
    async with Scheduler(cluster, config=CONFIG) as sched:
        specs = [
            TaskSpec(command=["sh", "-c", f"echo hello {i}"], resources=Resources(cpu=0.5))
            for i in range(6)
        ]
        tasks = await sched.submit(*specs)
        done = await sched.wait_many([t.id for t in tasks], timeout=60)
        assert len(done) == 6
        for i, task in enumerate(sorted(done, key=lambda t: t.seq)):
            assert task.state is TaskState.COMPLETE, task.error
            assert task.result is not None
            assert task.result.stdout_tail.strip() == f"hello {i}"
            assert task.result.output.runtime_statistics is not None
            assert task.result.output.runtime_statistics.cpu_count > 0
        allocs = sched.stats().allocs
        assert allocs and all(a.labels["provider"] == "process" for a in allocs)


async def test_exit_status_and_kill_cross_the_agent(cluster: ProcessCluster) -> None:
    """A failing command is an ERROR with its exit status; a kill stops the remote attempt."""
    async with Scheduler(cluster, config=CONFIG) as sched:
        [bad, slow] = await sched.submit(
            TaskSpec(command=["sh", "-c", "exit 3"], resources=Resources(cpu=0.5)),
            TaskSpec(command=["sleep", "60"], resources=Resources(cpu=0.5)),
        )
        bad = await sched.wait(bad.id, timeout=60)
        assert bad.state is TaskState.ERROR
        assert bad.result is not None and bad.result.exit_code == 3
        await sched.wait(slow.id, TaskState.RUNNING, timeout=60)
        killed = await sched.kill(slow.id)
        assert killed.state is TaskState.KILLED


async def _kill_an_alloc_while_its_tasks_run(
    cluster: ProcessCluster, tmp_path: Path, sig: signal.Signals
) -> None:
    runs = tmp_path / "runs"
    async with Scheduler(cluster, config=CONFIG) as sched:
        tasks = await sched.submit(
            *[TaskSpec(command=counting(runs, 2), resources=Resources(cpu=1)) for _ in range(2)]
        )
        for task in tasks:
            await sched.wait(task.id, TaskState.RUNNING, timeout=60)
        await wait_for(lambda: len(count_lines(runs)) == 2, 30, "both tasks to start")
        first = {sched.get(t.id).alloc_id for t in tasks}
        [victim] = [a for a in cluster.registry.allocs() if a.id in first][:1]
        pid = cluster.agent_pid(victim)
        assert pid is not None
        os.kill(pid, sig)
        done = await sched.wait_many([t.id for t in tasks], timeout=90)
        assert [t.state for t in done] == [TaskState.COMPLETE] * 2
        moved = [t for t in done if t.attempt > 0]
        assert moved, "the killed alloc's tasks should have run again elsewhere"
        for task in moved:
            history = await sched.history(HistoryQuery(task_id=task.id))
            assert [a.state for a in history][:1] == [TaskState.LOST]
            assert history[0].alloc_id == victim.id
            assert task.alloc_id != victim.id
        counts = count_lines(runs)
        for task in moved:
            assert counts[task.id] == 2  # once on the dead alloc, once elsewhere
        assert sched.stats().counters.lost >= 1


async def test_sigkill_of_an_agent_loses_its_tasks_and_they_run_elsewhere(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    """SIGKILL of an agent: its alloc dies, its tasks are LOST and then COMPLETE elsewhere."""
    await _kill_an_alloc_while_its_tasks_run(cluster, tmp_path, signal.SIGKILL)


async def test_terminated_agent_loses_its_tasks_and_they_run_elsewhere(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    """SIGTERM of an agent (what a job cancellation does): same as a crash, the tasks move."""
    await _kill_an_alloc_while_its_tasks_run(cluster, tmp_path, signal.SIGTERM)


async def test_freeing_an_idle_alloc_stops_its_agent(tmp_path: Path) -> None:
    """An idle alloc is freed: its agent exits on the daemon's order and its share comes back."""
    cluster = ProcessCluster(
        capacity=Resources(cpu=2, mem=1 * GiB), work_root=tmp_path / "work", lease=LEASE
    )
    config = SchedulerConfig(
        keepalive_interval=0.1, min_alloc=Resources(cpu=1), max_alloc_idle_time=0.3
    )
    async with serve_agents(cluster), Scheduler(cluster, config=config) as sched:
        [task] = await sched.submit(TaskSpec(command=["true"], resources=Resources(cpu=1)))
        task = await sched.wait(task.id, timeout=60)
        assert task.state is TaskState.COMPLETE
        [alloc] = [a for a in sched.stats().allocs if a.id == task.alloc_id]
        await wait_for(lambda: not cluster.registry.allocs(), 30, "the idle alloc to be freed")
        assert cluster.available() == cluster.capacity
        log = cluster.agent_log(alloc.id).read_text()
        assert "the daemon freed this alloc" in log
        assert not (tmp_path / "work" / alloc.id).exists()


async def test_daemon_sigkill_and_restart_reattaches_running_tasks(tmp_path: Path) -> None:
    """SIGKILL of the daemon while agents run, then a restart: running tasks are re-attached
    and finish once, never run again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runs = tmp_path / "runs"
    config = tmp_path / "packsched.toml"
    config.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
[server]
port = {port}
token = "user-token"
[cluster]
kind = "process"
cpu = 2
mem = "1GiB"
disk = "1GiB"
work_root = "{tmp_path / "work"}"
kill_grace = 1
[cluster.lease]
heartbeat_interval = 0.2
reattach_grace = 15
[scheduler]
keepalive_interval = 0.1
max_alloc_idle_time = 30
[scheduler.min_alloc]
cpu = 1
mem = "128MiB"
"""
    )

    async def tokens_are_separate() -> None:
        # Agents and users hold different tokens, and neither opens the other's routes.
        agent_token = (tmp_path / "state" / "agent-token").read_text().strip()
        async with httpx.AsyncClient(base_url=url) as raw:
            as_agent = {"Authorization": f"Bearer {agent_token}"}
            as_user = {"Authorization": "Bearer user-token"}
            assert (await raw.get("/v1/tasks", headers=as_agent)).status_code == 401
            assert (await raw.post("/v1/agent/heartbeat", headers=as_user)).status_code == 401

    await kill_daemon_midrun_and_restart(
        config,
        tmp_path / "daemon.log",
        url,
        runs,
        seconds=4,
        timeout=60,
        before_submit=tokens_are_separate,
    )


async def test_reattach_takes_back_only_a_live_agent_of_this_provider(tmp_path: Path) -> None:
    """After a restart, an alloc whose agent process is gone (or another provider's) is not
    taken back; its tasks are then LOST by the scheduler."""
    cluster = ProcessCluster(capacity=Resources(cpu=2), work_root=tmp_path / "work", lease=LEASE)
    gone = {"provider": "process", "agent_pid": str(2**22 + 12345)}
    assert await cluster.reattach("process-1", Resources(cpu=1), gone) is None
    mine = {"provider": "process", "agent_pid": str(os.getpid())}  # alive, but not an agent
    assert await cluster.reattach("process-2", Resources(cpu=1), mine) is None
    assert await cluster.reattach("slurm-3", Resources(cpu=1), {"provider": "slurm"}) is None
    assert cluster.available() == cluster.capacity
