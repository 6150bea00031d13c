"""Recovery benchmark: time from an alloc's death to its task running again elsewhere.

One task (cpu=1, `sleep 600`) runs on an agent-backed alloc; the alloc is killed; the clock runs
until the task's next attempt is RUNNING on another alloc (which has to be started for it).
Each kill is timed in two parts: death -> rescheduled (the scheduler noticed: keepalive failed,
the task LOST and queued as a new attempt) and death -> running again. Median over the kills.

Scenarios:
- ProcessCluster, the agent process SIGKILLed (noticed by the keepalive's process check);
- SlurmCluster, the job `scancel`led (noticed by the squeue poll or the agent's goodbye), only
  where `sinfo` is on PATH, else a "skipped" row.

Baseline, measured in the same run: a cold start on the same cluster (submit -> RUNNING with no
alloc yet), which a recovery must at least repeat; the ratio column is recovery / cold start.

Run alone: `.venv/bin/python bench/recovery.py [--kills N] [--cold R]` prints the table and writes
it as markdown to `bench/results/recovery.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import uvicorn
from _common import markdown_table, ratio, text_table, write_markdown
from starlette.applications import Starlette
from starlette.routing import Mount

from packsched import GiB, MiB, Resources, Scheduler, SchedulerConfig, TaskSpec, TaskState
from packsched.alloc.remote import AgentCluster, LeaseConfig, RemoteAlloc
from packsched.cluster.process import ProcessCluster
from packsched.cluster.slurm import SlurmCluster

# Timing as a user who cares about recovery would set it: keepalive every 0.2 s, heartbeats
# every second (a missed lease takes 3 s; a dead process or job is noticed sooner).
LEASE = LeaseConfig(heartbeat_interval=1.0, start_timeout=120, exit_wait=2, kill_wait=2)
CONFIG = SchedulerConfig(
    keepalive_interval=0.2,
    keepalive_timeout=10,
    min_alloc=Resources(cpu=1, mem=128 * MiB),
    max_alloc_idle_time=600,
    drain_timeout=0.0,
)
TASK = TaskSpec(command=["sleep", "600"], resources=Resources(cpu=1, mem=64 * MiB))


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_agents(cluster: AgentCluster) -> AsyncIterator[None]:
    """The agent routes on a loopback port, as the daemon serves them."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    app = Starlette(routes=[Mount("/v1/agent", cluster.agent_app())])
    server = _Server(uvicorn.Config(app, lifespan="off", log_config=None, log_level="error"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
            await anyio.sleep(0.01)
        await cluster.start(f"http://127.0.0.1:{sock.getsockname()[1]}")
        try:
            yield
        finally:
            server.should_exit = True
    sock.close()


async def _until(condition: Callable[[], bool], timeout: float = 180) -> float:
    """Poll (every 5 ms) until `condition`; the monotonic time it became true."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - polling is the measurement here
            await anyio.sleep(0.005)
    return time.monotonic()


async def cold_starts(cluster: AgentCluster, repeats: int) -> list[float]:
    """Submit -> RUNNING on a cluster with no alloc, `repeats` times (a fresh scheduler each)."""
    out = []
    for _ in range(repeats):
        async with Scheduler(cluster, config=CONFIG) as sched:
            t0 = time.monotonic()
            [task] = await sched.submit(TASK)
            await sched.wait(task.id, TaskState.RUNNING, timeout=180)
            out.append(time.monotonic() - t0)
            await sched.kill(task.id)
    return out


async def recoveries(
    cluster: AgentCluster, kills: int, kill: Callable[[RemoteAlloc], Awaitable[None]]
) -> tuple[list[float], list[float]]:
    """Kill the alloc under a running task `kills` times; (to rescheduled, to running) each."""
    noticed: list[float] = []
    running: list[float] = []
    async with Scheduler(cluster, config=CONFIG) as sched:
        for _ in range(kills):
            [task] = await sched.submit(TASK)
            await sched.wait(task.id, TaskState.RUNNING, timeout=180)
            alloc = cluster.registry.get(sched.get(task.id).alloc_id or "")
            assert alloc is not None
            t0 = time.monotonic()
            await kill(alloc)
            task_id = task.id
            t1 = await _until(lambda: sched.get(task_id).attempt >= 1)  # noqa: B023
            t2 = await _until(lambda: sched.get(task_id).state is TaskState.RUNNING)  # noqa: B023
            assert sched.get(task.id).alloc_id != alloc.id
            noticed.append(t1 - t0)
            running.append(t2 - t0)
            await sched.kill(task.id)
    return noticed, running


async def sigkill_agent(alloc: RemoteAlloc) -> None:
    os.kill(int(alloc.labels["agent_pid"]), signal.SIGKILL)


async def scancel_job(alloc: RemoteAlloc) -> None:
    await anyio.run_process(["scancel", alloc.labels["slurm_job_id"]])


Row = list[object]


async def scenario(
    name: str,
    cluster: AgentCluster,
    kill: Callable[[RemoteAlloc], Awaitable[None]],
    args: argparse.Namespace,
) -> Row:
    async with serve_agents(cluster):
        cold = statistics.median(await cold_starts(cluster, args.cold))
        noticed, running = await recoveries(cluster, args.kills, kill)
    await cluster.aclose()
    med_noticed = statistics.median(noticed)
    med_running = statistics.median(running)
    print(f"  {name}: done", flush=True)
    return [
        name,
        len(running),
        f"{med_noticed:.3f}",
        f"{med_running:.3f}",
        f"{max(running):.3f}",
        f"{cold:.3f}",
        ratio(med_running, cold),
    ]


async def main(args: argparse.Namespace) -> None:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="packsched-recovery-") as tmp:
        process = ProcessCluster(
            capacity=Resources(cpu=2, mem=1 * GiB, disk=1 * GiB),
            work_root=Path(tmp) / "process",
            lease=LEASE,
            kill_grace=1,
        )
        rows.append(await scenario("process: agent SIGKILL", process, sigkill_agent, args))
        if shutil.which("sinfo"):
            slurm = SlurmCluster(lease=LEASE, log_dir=Path(tmp) / "jobs", state_poll=0.2)
            rows.append(await scenario("slurm: job scancel", slurm, scancel_job, args))
        else:
            rows.append(["slurm: job scancel", 0, "skipped (no sinfo on PATH)", "-", "-", "-", "-"])
    headers = [
        "scenario",
        "kills",
        "death->rescheduled s (median)",
        "death->running again s (median)",
        "max s",
        "cold start s (median)",
        "recovery / cold start",
    ]
    print(text_table(headers, rows))
    note = (
        f"Each kill: one `sleep` task (cpu=1) running on an agent-backed alloc, the alloc killed, "
        f"timed until the task's next attempt runs on a newly started alloc. Scheduler "
        f"keepalive every {CONFIG.keepalive_interval:g} s, agent heartbeat every "
        f"{LEASE.heartbeat_interval:g} s (lease {LEASE.lease:g} s). Cold start: submit -> "
        f"RUNNING with no alloc, median of {args.cold}."
    )
    path = write_markdown(
        "recovery",
        "Recovery: an alloc's death to its task running again elsewhere",
        [("", note), ("Results", markdown_table(headers, rows))],
    )
    print(f"written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per scenario (default 20)")
    parser.add_argument("--cold", type=int, default=5, help="cold starts per scenario (default 5)")
    anyio.run(main, parser.parse_args())
