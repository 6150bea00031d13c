"""Agents as local processes: each alloc is a `packsched agent` subprocess holding a slice of
this machine.

It is the remote-alloc machinery (registration, leases, re-attach) with nothing remote about
it: for fault tests, for developers without Slurm, and for users who want each alloc's tasks
isolated in a process of its own that outlives a daemon restart. Slices are accounted like
`LocalCluster`'s: a request that does not fit in what is unallocated waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import psutil

from ..alloc.remote import AgentCluster, LeaseConfig, RemoteAlloc
from ..errors import AllocationError
from ..resources import AllocShape, Requirements, Resources
from ..stats.runtime import find_processes, machine_capacity
from .local import default_reserve_mem, default_work_root

__all__ = ["ProcessCluster"]


class ProcessCluster(AgentCluster):
    """This machine, with each alloc a local agent process.

    Args:
        capacity: what the allocs share (default: this machine less `reserve_mem`).
        reserve_mem: memory never granted (default as `LocalCluster`).
        work_root: agents' work dirs and logs (default `<tmp>/packsched-<uid>/process`).
        lease: lease timing; agent_token, server_url: see `AgentCluster`.
        python: the interpreter that runs `-m packsched.agent` (default: this one).
        kill_grace: seconds an agent gets between SIGTERM and SIGKILL when torn down.
    """

    provider = "process"

    def __init__(
        self,
        *,
        capacity: Resources | None = None,
        reserve_mem: int | None = None,
        work_root: Path | str | None = None,
        lease: LeaseConfig | None = None,
        agent_token: str | None = None,
        server_url: str | None = None,
        python: str | None = None,
        kill_grace: float = 5.0,
    ) -> None:
        super().__init__(lease=lease, agent_token=agent_token, server_url=server_url)
        self.work_root = (
            Path(work_root) if work_root is not None else default_work_root() / "process"
        ).absolute()
        if capacity is None:
            total = psutil.virtual_memory().total
            reserve = default_reserve_mem(total) if reserve_mem is None else reserve_mem
            self.work_root.mkdir(parents=True, exist_ok=True)
            capacity = machine_capacity(reserve_mem=reserve, disk_path=self.work_root)
        self.capacity = capacity
        self.python = python or sys.executable
        self.kill_grace = kill_grace
        self._allocated = Resources()
        self._shares: dict[str, Resources] = {}
        self._room = anyio.Event()

    def shapes(self) -> Sequence[AllocShape]:
        """The whole capacity, as the one shape on offer."""
        return [AllocShape(resources=self.capacity, name="process")]

    def available(self) -> Resources:
        """What is not allocated now."""
        return self.capacity - self._allocated

    async def _wait_placeable(self, requirements: Requirements) -> None:
        need = requirements.min
        if not need.fits_in(self.capacity):
            too_big = ", ".join(need.exceeding(self.capacity))
            raise AllocationError(
                f"this machine cannot hold {need.describe()} (too much {too_big}); "
                f"it has {self.capacity.describe()} in all"
            )
        while not need.fits_in(self.available()):
            await self._room.wait()

    def _grant(self, requirements: Requirements) -> Resources:
        return requirements.min.max(requirements.full.min(self.available()))

    def _take(self, alloc_id: str, share: Resources) -> None:
        self._shares[alloc_id] = share
        self._allocated = self._allocated + share

    def _give_back(self, alloc_id: str) -> None:
        share = self._shares.pop(alloc_id, None)
        if share is not None:
            self._allocated = self._allocated - share
            self._room.set()
            self._room = anyio.Event()

    def agent_log(self, alloc_id: str) -> Path:
        """Where an agent's output goes."""
        return self.work_root / "agents" / f"{alloc_id}.log"

    def agent_pid(self, alloc: RemoteAlloc) -> int | None:
        """The pid of an alloc's agent process (tests kill it)."""
        pid = alloc.labels.get("agent_pid")
        return int(pid) if pid else None

    async def _launch(self, alloc: RemoteAlloc) -> None:
        self._take(alloc.id, alloc.resources)
        command = [
            self.python,
            "-m",
            "packsched.agent",
            "--work-root",
            str(self.work_root / alloc.id),
            "--register-timeout",
            f"{self.lease.start_timeout + 30:g}",
        ]
        env = {**os.environ, **self.agent_env(alloc.id)}
        log_path = self.agent_log(alloc.id)

        spawned: list[subprocess.Popen[bytes]] = []

        def spawn() -> None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as out:
                # Its own session: a signal to the daemon's process group (Ctrl-C) does not
                # reach the agents, which outlive the daemon so that a restart re-attaches.
                # Recorded from the thread, so that a cancelled caller's teardown still sees it.
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
                spawned.append(proc)

        async def check() -> str | None:
            code = spawned[0].poll() if spawned else None
            if code is None:
                return None
            return (
                f"the agent process {spawned[0].pid} of alloc {alloc.id} exited with status {code}"
            )

        async def teardown() -> None:
            try:
                if spawned:
                    proc = spawned[0]
                    await self._stop(alloc, proc.pid, lambda: proc.poll() is not None)
            finally:
                self._give_back(alloc.id)

        # Hooked before the spawn: an allocation cancelled meanwhile still gives its share back.
        alloc.check = check
        alloc.teardown = teardown
        try:
            await anyio.to_thread.run_sync(spawn)
        except OSError as exc:
            raise AllocationError(f"could not start an agent process: {exc}") from None
        alloc.labels["agent_pid"] = str(spawned[0].pid)

    async def _relaunch(self, alloc: RemoteAlloc) -> bool:
        """The agent of an earlier daemon: take it back if its process still runs."""
        pid = self.agent_pid(alloc)
        if pid is None or not await anyio.to_thread.run_sync(_is_agent, pid, alloc.id):
            return False
        self._take(alloc.id, alloc.resources)

        async def check() -> str | None:
            if await anyio.to_thread.run_sync(_is_agent, pid, alloc.id):
                return None
            return f"the agent process {pid} of alloc {alloc.id} is gone"

        async def teardown() -> None:
            try:
                await self._stop(alloc, pid, lambda: not _is_agent(pid, alloc.id))
            finally:
                self._give_back(alloc.id)

        alloc.check = check
        alloc.teardown = teardown
        return True

    async def _stop(self, alloc: RemoteAlloc, pid: int, exited: Callable[[], bool]) -> None:
        """Let an agent that said goodbye finish leaving; else SIGTERM it (it kills its attempts
        and leaves), SIGKILL after the grace. Then kill whatever of its attempts outlived it (a
        SIGKILLed agent cannot clean up)."""
        steps: list[tuple[signal.Signals | None, float]] = [
            (signal.SIGTERM, self.kill_grace),
            (signal.SIGKILL, 5.0),
        ]
        if alloc.gone.is_set():
            steps.insert(0, (None, self.kill_grace))
        for sig, grace in steps:
            if exited():
                break
            if sig is not None:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
            with anyio.move_on_after(grace):
                while not exited():  # noqa: ASYNC110 - a process exit has no event here
                    await anyio.sleep(0.02)
        alloc_id = alloc.id
        await anyio.to_thread.run_sync(_kill_leftovers, alloc_id)


def _is_agent(pid: int, alloc_id: str) -> bool:
    """Whether `pid` is alive and is the agent of `alloc_id` (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return "packsched.agent" in cmdline and any(alloc_id in arg for arg in cmdline)


def _kill_leftovers(alloc_id: str) -> None:
    """SIGKILL every process the agent of `alloc_id` started (they carry its id in their
    environment) that is still alive (blocking: scans /proc)."""
    for proc in find_processes(
        session=None, marker=("PACKSCHED_ALLOC_ID", alloc_id), started_after=0.0
    ):
        with contextlib.suppress(psutil.Error):
            proc.kill()
