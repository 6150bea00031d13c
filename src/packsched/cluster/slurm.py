"""Allocs from Slurm: each alloc is a batch job running `packsched agent`.

allocate = `sbatch --parsable` a job sized to the request that runs the agent; the alloc is live
once the agent registers (a job that does not get there within `lease.start_timeout` is
cancelled and the allocation fails). free = tell the agent to leave, then `scancel`. The shapes
on offer are the node sizes `sinfo` reports. Job states are polled with `squeue` (one call for
every job, at most every `state_poll` seconds), so that a cancelled, preempted or timed-out job
is noticed at the next keepalive instead of when the lease runs out.

Every Slurm command runs as a subprocess through `anyio.run_process`, never blocking the loop;
pyslurm is not used because it does not match the Slurm that distributions ship.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

from ..alloc.remote import AgentCluster, LeaseConfig, RemoteAlloc
from ..errors import AllocationError
from ..log import get_logger
from ..resources import AllocShape, MiB, Requirements, Resources

__all__ = ["SlurmCluster", "parse_sinfo"]

log = get_logger("packsched.slurm")

# squeue states after which the job will never run the agent again.
_ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)


def parse_sinfo(text: str, *, agent_mem: int = 0, disk: int | None = None) -> list[AllocShape]:
    """Alloc shapes from `sinfo -h -N -o '%N %c %m %G %d'` (node, cpus, MiB, gres, tmp MiB).

    Each distinct node size is one shape; memory less what the agent itself needs. GPUs come
    from `gpu[:type]:N` entries of the gres column.
    """
    seen: dict[str, Resources] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        node, cpus, mem, gres, tmp = parts[:5]
        try:
            size = Resources(
                cpu=float(cpus.rstrip("+")),
                mem=max(0, int(mem.rstrip("+")) * MiB - agent_mem),
                disk=disk if disk is not None else int(tmp.rstrip("+")) * MiB,
                gpu=_gpus(gres),
            )
        except ValueError:
            continue
        seen[node] = size
    sizes = sorted({_freeze(r) for r in seen.values()})
    return [
        AllocShape(resources=Resources(cpu=c, mem=m, disk=d, gpu=g), name=f"slurm-{c:g}cpu")
        for c, m, d, g in sizes
    ]


def _freeze(r: Resources) -> tuple[float, int, int, int]:
    return (r.cpu, r.mem, r.disk, r.gpu)


def _gpus(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        item = item.split("(", 1)[0]
        fields = item.split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


class SlurmCluster(AgentCluster):
    """Allocs as Slurm batch jobs that run `packsched agent`.

    Args:
        partition, account: passed to sbatch when set.
        time_limit: sbatch `--time` (e.g. "4:00:00"); None leaves the partition's default.
        extra_args: more sbatch arguments, as given.
        agent_command: how a job starts the agent (default: this Python, `-m packsched.agent`);
            the nodes must see the same install, as on a shared file system.
        agent_mem: memory asked for the agent itself on top of what tasks may use.
        work_root: where agents put attempts' work dirs on the nodes (default: their tmp).
        log_dir: where job output goes (default: `slurm-<job>.out` in the daemon's cwd).
        disk: disk each shape offers (default: the nodes' TmpDisk); `--tmp` is asked for.
        state_poll: the longest a job state from squeue is trusted, in seconds.
        shapes: use these instead of asking sinfo (tests).
        lease, agent_token, server_url: see `AgentCluster`.
    """

    provider = "slurm"

    def __init__(
        self,
        *,
        partition: str | None = None,
        account: str | None = None,
        time_limit: str | None = None,
        extra_args: Sequence[str] = (),
        agent_command: Sequence[str] | None = None,
        agent_mem: int = 128 * MiB,
        work_root: str | None = None,
        log_dir: Path | str | None = None,
        disk: int | None = None,
        state_poll: float = 1.0,
        shapes: Sequence[AllocShape] | None = None,
        lease: LeaseConfig | None = None,
        agent_token: str | None = None,
        server_url: str | None = None,
    ) -> None:
        super().__init__(lease=lease, agent_token=agent_token, server_url=server_url)
        self.partition = partition
        self.account = account
        self.time_limit = time_limit
        self.extra_args = list(extra_args)
        self.agent_command = list(agent_command or [sys.executable, "-m", "packsched.agent"])
        self.agent_mem = agent_mem
        self.work_root = work_root
        self.log_dir = Path(log_dir).absolute() if log_dir is not None else None
        self.disk = disk
        self.state_poll = state_poll
        self._shapes: list[AllocShape] | None = list(shapes) if shapes is not None else None
        self._states: dict[str, str] = {}
        self._states_at = -math.inf
        self._states_lock = anyio.Lock()
        self._jobs: dict[str, str] = {}  # alloc id -> job id

    # -- shapes ---------------------------------------------------------------------------

    def _sinfo_command(self) -> list[str]:
        command = ["sinfo", "-h", "-N", "-o", "%N %c %m %G %d"]
        if self.partition:
            command += ["-p", self.partition]
        return command

    def _set_shapes(self, text: str) -> None:
        shapes = parse_sinfo(text, agent_mem=self.agent_mem, disk=self.disk)
        if not shapes:
            where = f"partition {self.partition}" if self.partition else "the default partitions"
            raise AllocationError(f"sinfo reports no nodes in {where}; is Slurm up?")
        self._shapes = shapes

    async def refresh_shapes(self) -> None:
        """Ask sinfo for the node sizes again."""
        self._set_shapes(await _run(self._sinfo_command()))

    async def start(self, server_url: str | None = None) -> None:
        """Learn the daemon's URL and the node sizes."""
        await super().start(server_url)
        if self._shapes is None:
            await self.refresh_shapes()

    def shapes(self) -> Sequence[AllocShape]:
        """The node sizes on offer (less the agent's memory).

        Loaded by `start`; before it, sinfo runs here once, blocking briefly.
        """
        if self._shapes is None:
            try:
                out = subprocess.run(
                    self._sinfo_command(), capture_output=True, text=True, timeout=30, check=True
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise AllocationError(f"cannot ask Slurm for its nodes (sinfo): {exc}") from None
            self._set_shapes(out.stdout)
        assert self._shapes is not None
        return self._shapes

    # -- allocation -------------------------------------------------------------------------

    def _grant(self, requirements: Requirements) -> Resources:
        need = requirements.min
        fitting = [s.resources for s in self.shapes() if need.fits_in(s.resources)]
        if not fitting:
            raise AllocationError(
                f"no Slurm node can hold {need.describe()}; the largest offers "
                f"{self.max_alloc().describe()}"
            )
        # The largest fitting node lets the request grow the most towards its full size.
        node = max(fitting, key=lambda r: (r.cpu, r.mem, r.gpu))
        grant = need.max(requirements.full.min(node))
        # Slurm hands out whole cores.
        cores = min(node.cpu, max(1.0, math.ceil(grant.cpu - 1e-9)))
        return Resources(cpu=cores, mem=grant.mem, disk=grant.disk, gpu=grant.gpu)

    def sbatch_command(self, alloc: RemoteAlloc) -> list[str]:
        """The sbatch command line that starts `alloc`'s agent."""
        r = alloc.resources
        mem_mib = math.ceil((r.mem + self.agent_mem) / MiB)
        command = [
            "sbatch",
            "--parsable",
            f"--job-name=packsched-{alloc.id}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={int(r.cpu)}",
            f"--mem={mem_mib}M",
            "--no-requeue",
        ]
        if r.gpu:
            command.append(f"--gres=gpu:{r.gpu}")
        if r.disk:
            command.append(f"--tmp={math.ceil(r.disk / MiB)}M")
        if self.partition:
            command.append(f"--partition={self.partition}")
        if self.account:
            command.append(f"--account={self.account}")
        if self.time_limit:
            command.append(f"--time={self.time_limit}")
        if self.log_dir is not None:
            command.append(f"--output={self.log_dir / alloc.id}.log")
        command += self.extra_args
        agent = list(self.agent_command)
        # An agent that cannot register by the time the allocation gives up on it leaves.
        agent += ["--register-timeout", f"{self.lease.start_timeout + 30:g}"]
        if self.work_root:
            agent += ["--work-root", f"{self.work_root.rstrip('/')}/{alloc.id}"]
        command += ["--wrap", "exec " + shlex.join(agent)]
        return command

    async def _launch(self, alloc: RemoteAlloc) -> None:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        # The agent's settings travel in the environment sbatch exports to the job, so that
        # the token is on no command line.
        env = {**os.environ, **self.agent_env(alloc.id)}
        # Shielded (and bounded): a submission cut short could leave a job we never learn
        # the id of, holding its node with an agent nobody will free.
        with anyio.CancelScope(shield=True), anyio.fail_after(60):
            out = await _run(self.sbatch_command(alloc), env=env)
        job_id = out.strip().split(";", 1)[0]
        if not job_id.isdigit():
            raise AllocationError(f"sbatch answered {out.strip()!r}, not a job id")
        log.info("slurm job submitted", alloc_id=alloc.id, job_id=job_id)
        self._hook(alloc, job_id)

    def _hook(self, alloc: RemoteAlloc, job_id: str) -> None:
        alloc.labels["slurm_job_id"] = job_id
        self._jobs[alloc.id] = job_id

        async def check() -> str | None:
            try:
                state = await self.job_state(job_id)
            except (AllocationError, TimeoutError) as exc:
                # The controller did not answer: that says nothing about the job. The agent's
                # lease still guards it, so a flaky slurmctld does not kill every alloc.
                log.warning("squeue failed; relying on the lease", job_id=job_id, error=str(exc))
                return None
            if state is None:
                return f"slurm job {job_id} of alloc {alloc.id} is gone"
            if state in _ENDED:
                return f"slurm job {job_id} of alloc {alloc.id} ended: {state}"
            return None

        async def teardown() -> None:
            self._jobs.pop(alloc.id, None)
            try:
                await _run(["scancel", job_id])
            except AllocationError as exc:
                log.warning("scancel failed", job_id=job_id, error=str(exc))

        alloc.check = check
        alloc.teardown = teardown

    async def _relaunch(self, alloc: RemoteAlloc) -> bool:
        job_id = alloc.labels.get("slurm_job_id", "")
        if not job_id.isdigit():
            return False
        self._jobs[alloc.id] = job_id
        try:
            state: str | None = await self.job_state(job_id, fresh=True)
        except (AllocationError, TimeoutError) as exc:
            # No answer is no news: take it back, and let the re-attach grace decide.
            log.warning("squeue failed during re-attach", job_id=job_id, error=str(exc))
            state = "UNKNOWN"
        if state is None or state in _ENDED:
            self._jobs.pop(alloc.id, None)
            return False
        self._hook(alloc, job_id)
        return True

    # -- job states -------------------------------------------------------------------------

    async def job_state(self, job_id: str, *, fresh: bool = False) -> str | None:
        """The job's state as squeue last reported it (None: squeue no longer knows it).

        One squeue call serves every job of this cluster, at most every `state_poll` seconds.
        """
        async with self._states_lock:
            if fresh or time.monotonic() - self._states_at > self.state_poll:
                jobs = sorted(set(self._jobs.values()) | {job_id})
                command = ["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(jobs)]
                try:
                    with anyio.fail_after(max(5.0, self.state_poll * 5)):
                        out = await _run(command)
                except AllocationError as exc:
                    # squeue refuses a list in which every job has aged out.
                    if "Invalid job id" not in str(exc):
                        raise
                    out = ""
                states: dict[str, str] = {}
                for line in out.splitlines():
                    parts = line.split()
                    if len(parts) == 2:
                        states[parts[0]] = parts[1]
                self._states = states
                self._states_at = time.monotonic()
            return self._states.get(job_id)


async def _run(command: list[str], *, env: Mapping[str, str] | None = None) -> str:
    """Run a Slurm command; its stdout, or AllocationError with its stderr."""
    try:
        done = await anyio.run_process(command, check=False, env=dict(env) if env else None)
    except OSError as exc:
        raise AllocationError(f"cannot run {command[0]}: {exc}; is Slurm installed?") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise AllocationError(f"{shlex.join(command[:2])} failed ({done.returncode}): {err}")
    return done.stdout.decode(errors="replace")
