"""SlurmCluster on a real single-node Slurm (started by .ci/system-deps / scripts/slurm-up).

Every test here is marked `slurm` and skipped, saying why, where `sinfo` is not on PATH.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from packsched import MiB, Resources, Scheduler, SchedulerConfig, TaskSpec, TaskState
from packsched.alloc.remote import LeaseConfig, RemoteAlloc
from packsched.cluster.slurm import SlurmCluster, parse_sinfo
from packsched.resources import GiB
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

needs_slurm = pytest.mark.skipif(
    shutil.which("sinfo") is None,
    reason="Slurm is not installed here (no sinfo on PATH); .ci/system-deps installs and starts it",
)

LEASE = LeaseConfig(heartbeat_interval=0.3, start_timeout=60, exit_wait=5, kill_wait=10)
CONFIG = SchedulerConfig(
    keepalive_interval=0.2,
    keepalive_timeout=10,
    min_alloc=Resources(cpu=1, mem=256 * MiB),
    max_alloc_idle_time=30,
    max_pending_allocs=2,
)


def test_parse_sinfo_reads_node_sizes_and_gpus() -> None:
    """sinfo's node lines become one shape per distinct size, less the agent's memory."""
    text = "n1 2 4000 (null) 0\nn2 2 4000 (null) 0\ng1 8 64000 gpu:tesla:2(S:0),gpu:1 1000\n"
    shapes = parse_sinfo(text, agent_mem=100 * MiB)
    assert [s.resources for s in shapes] == [
        Resources(cpu=2, mem=3900 * MiB),
        Resources(cpu=8, mem=63900 * MiB, disk=1000 * MiB, gpu=3),
    ]


def test_sbatch_command_sizes_the_job() -> None:
    """The job asks for whole cores, the alloc's memory plus the agent's, GPUs and the options."""
    cluster = SlurmCluster(
        partition="p",
        account="a",
        time_limit="1:00:00",
        extra_args=["--qos=low"],
        agent_command=["/opt/venv/bin/packsched", "agent"],
        shapes=parse_sinfo("n 8 32000 gpu:2 0"),
        agent_mem=128 * MiB,
    )
    alloc = RemoteAlloc(
        cluster.registry,
        "slurm-1",
        Resources(cpu=3, mem=1 * GiB, gpu=1),
        {},
        register_deadline=0,
    )
    command = cluster.sbatch_command(alloc)
    assert "--cpus-per-task=3" in command
    assert "--mem=1152M" in command
    assert "--gres=gpu:1" in command
    for option in ("--partition=p", "--account=a", "--time=1:00:00", "--qos=low", "--parsable"):
        assert option in command
    assert command[-2] == "--wrap"
    assert command[-1].startswith("exec /opt/venv/bin/packsched agent --register-timeout ")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SlurmCluster]:
    cluster = SlurmCluster(lease=LEASE, log_dir=tmp_path / "jobs", state_poll=0.3)
    async for _ in hosted(serve_agents(cluster)):
        yield cluster
    await cluster.aclose()


@pytest.mark.slurm
@needs_slurm
async def test_fifty_mixed_tasks_complete_within_the_lower_bound_plus_one(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """50 tasks of mixed sizes all COMPLETE through Slurm jobs, using at most LB + 1 allocs."""
    sizes = [(0.1, 50), (0.25, 100), (0.5, 150), (1.0, 200)]
    specs = [
        TaskSpec(
            command=["sh", "-c", "sleep 0.2"],
            resources=Resources(cpu=sizes[i % 4][0], mem=sizes[i % 4][1] * MiB),
        )
        for i in range(50)
    ]
    [shape] = cluster.shapes()
    demand = Resources()
    for spec in specs:
        demand = demand + spec.resources
    lower_bound = max(
        math.ceil(demand.cpu / shape.resources.cpu), math.ceil(demand.mem / shape.resources.mem)
    )
    async with Scheduler(cluster, config=CONFIG) as sched:
        tasks = await sched.submit(*specs)
        done = await sched.wait_many([t.id for t in tasks], timeout=150)
        assert len(done) == 50
        assert all(t.state is TaskState.COMPLETE for t in done), [t.error for t in done]
        allocs = sched.stats().counters.allocs_started
        assert 1 <= allocs <= lower_bound + 1
        assert all(t.alloc_id and t.alloc_id.startswith("slurm-") for t in done)


async def _lose_a_job_while_its_tasks_run(cluster: SlurmCluster, tmp_path: Path, how: str) -> None:
    runs = tmp_path / "runs"
    async with Scheduler(cluster, config=CONFIG) as sched:
        [task] = await sched.submit(
            TaskSpec(command=counting(runs, 3), resources=Resources(cpu=1, mem=100 * MiB))
        )
        await sched.wait(task.id, TaskState.RUNNING, timeout=90)
        await wait_for(lambda: count_lines(runs).get(task.id) == 1, 30, "the task to start")
        alloc_id = sched.get(task.id).alloc_id
        victim = cluster.registry.get(alloc_id or "")
        assert victim is not None
        if how == "scancel":
            await anyio.run_process(["scancel", victim.labels["slurm_job_id"]])
        else:
            assert victim.agent_pid is not None
            os.kill(victim.agent_pid, signal.SIGKILL)
        done = await sched.wait(task.id, timeout=90)
        assert done.state is TaskState.COMPLETE, done.error
        assert done.attempt == 1 and done.alloc_id != alloc_id
        history = await sched.history(HistoryQuery(task_id=task.id))
        assert history[0].state is TaskState.LOST and history[0].alloc_id == alloc_id
        assert count_lines(runs)[task.id] == 2


@pytest.mark.slurm
@needs_slurm
async def test_scancel_of_a_job_loses_its_tasks_which_complete_elsewhere(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """scancel of an alloc's job while its task runs: LOST, then COMPLETE in another job."""
    await _lose_a_job_while_its_tasks_run(cluster, tmp_path, "scancel")


@pytest.mark.slurm
@needs_slurm
async def test_sigkill_of_an_agent_in_a_job_loses_its_tasks(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """SIGKILL of the agent in a job: LOST, then COMPLETE in another job."""
    await _lose_a_job_while_its_tasks_run(cluster, tmp_path, "sigkill")


@pytest.mark.slurm
@needs_slurm
async def test_a_job_whose_agent_never_registers_fails_the_allocation(tmp_path: Path) -> None:
    """A job that cannot start its agent is cancelled when start_timeout passes."""
    from packsched import Requirements

    cluster = SlurmCluster(
        lease=LeaseConfig(heartbeat_interval=0.3, start_timeout=3),
        agent_command=["sh", "-c", "sleep 600", "--"],
        log_dir=tmp_path / "jobs",
        state_poll=0.3,
    )
    async for _ in hosted(serve_agents(cluster)):
        with pytest.raises(Exception, match="did not register"):
            await cluster.allocate(Requirements(min=Resources(cpu=1, mem=64 * MiB)), {})
    assert not cluster.registry.allocs()


@pytest.mark.slurm
@needs_slurm
async def test_daemon_sigkill_and_restart_reattaches_running_slurm_tasks(tmp_path: Path) -> None:
    """SIGKILL of the daemon while Slurm jobs run its tasks, then a restart: the agents come
    back, their running tasks are re-attached and finish once, never run again."""
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
kind = "slurm"
log_dir = "{tmp_path / "jobs"}"
state_poll = 0.3
[cluster.lease]
heartbeat_interval = 0.3
reattach_grace = 20
start_timeout = 60
[scheduler]
keepalive_interval = 0.2
max_alloc_idle_time = 30
[scheduler.min_alloc]
cpu = 1
mem = "256MiB"
"""
    )
    await kill_daemon_midrun_and_restart(
        config, tmp_path / "daemon.log", url, runs, seconds=5, timeout=90
    )


@pytest.mark.slurm
@needs_slurm
async def test_a_job_that_ends_before_registering_fails_the_allocation_at_once(
    tmp_path: Path,
) -> None:
    """A job whose agent command fails is noticed through squeue, long before start_timeout."""
    from packsched import Requirements

    cluster = SlurmCluster(
        lease=LeaseConfig(heartbeat_interval=0.3, start_timeout=120),
        agent_command=["false"],
        log_dir=tmp_path / "jobs",
        state_poll=0.3,
    )
    async for _ in hosted(serve_agents(cluster)):
        with anyio.fail_after(60), pytest.raises(Exception, match="ended: FAILED"):
            await cluster.allocate(Requirements(min=Resources(cpu=1, mem=64 * MiB)), {})
    assert not cluster.registry.allocs()


def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, squeue: str) -> None:
    """Put a fake `squeue` (a shell script body) and `scancel` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("squeue", squeue), ("scancel", "exit 0")):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def hooked_alloc(cluster: SlurmCluster, job_id: str) -> RemoteAlloc:
    alloc = RemoteAlloc(
        cluster.registry, "slurm-x", Resources(cpu=1), {}, register_deadline=math.inf
    )
    cluster._hook(alloc, job_id)
    return alloc


@pytest.mark.parametrize(
    ("squeue", "verdict"),
    [
        ("echo '7 RUNNING'", None),
        ("echo '7 CANCELLED'", "ended: CANCELLED"),
        ("echo '7 PREEMPTED'", "ended: PREEMPTED"),
        ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", "is gone"),
        ("echo 'Unable to contact slurm controller' >&2; exit 1", None),
    ],
)
async def test_job_state_decides_the_keepalive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, squeue: str, verdict: str | None
) -> None:
    """squeue's word on the job: ended or gone kills the alloc; no answer leaves it to the lease."""
    fake_slurm(tmp_path, monkeypatch, squeue)
    cluster = SlurmCluster(shapes=parse_sinfo("n 2 4000 (null) 0"), state_poll=0)
    alloc = hooked_alloc(cluster, "7")
    assert alloc.check is not None
    reason = await alloc.check()
    if verdict is None:
        assert reason is None
    else:
        assert reason is not None and verdict in reason


async def test_reattach_takes_back_a_job_still_running_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart, a job squeue says is running comes back (to wait for its agent); an
    ended one does not."""
    fake_slurm(tmp_path, monkeypatch, "echo '7 RUNNING'; echo '8 TIMEOUT'")
    cluster = SlurmCluster(shapes=parse_sinfo("n 2 4000 (null) 0"), state_poll=0)
    labels = {"provider": "slurm", "slurm_job_id": "7"}
    alloc = await cluster.reattach("slurm-a", Resources(cpu=1), labels)
    assert isinstance(alloc, RemoteAlloc) and cluster.registry.get("slurm-a") is alloc
    ended = {"provider": "slurm", "slurm_job_id": "8"}
    assert await cluster.reattach("slurm-b", Resources(cpu=1), ended) is None
    assert await cluster.reattach("slurm-c", Resources(cpu=1), {"provider": "slurm"}) is None
