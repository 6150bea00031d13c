"""This machine as a cluster: the embedded default.

The machine is one alloc shape: its cores, its memory less a reserve for the system and the
daemon, the free disk under the work root, and its GPUs. Allocs are slices of it; a request
that does not fit in what is unallocated right now waits until enough is freed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import psutil

from ..alloc.local import ExecutorConfig, LocalAlloc, LocalExecutor
from ..errors import AllocationError
from ..resources import AllocShape, GiB, Requirements, Resources
from ..stats.runtime import machine_capacity
from .base import Alloc, Cluster

__all__ = ["LocalCluster", "count_gpus", "default_reserve_mem", "default_work_root"]


def default_work_root() -> Path:
    """`$TMPDIR/packsched-<uid>`: private to the user, on the machine's scratch disk."""
    return Path(tempfile.gettempdir()) / f"packsched-{os.getuid()}"


def default_reserve_mem(total: int) -> int:
    """Memory kept back for the system and the daemon: 10% of the machine, at most 2 GiB."""
    return min(2 * GiB, total // 10)


def count_gpus() -> int:
    """NVIDIA GPUs on this machine: NVML when `pynvml` imports, else `nvidia-smi -L`, else 0.

    Blocking (it may run `nvidia-smi`, bounded to 5 s); called once per LocalCluster.
    """
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        try:
            pynvml.nvmlInit()
            try:
                return int(pynvml.nvmlDeviceGetCount())
            finally:
                pynvml.nvmlShutdown()
        except Exception:
            pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


class LocalCluster(Cluster):
    """This machine as a cluster; each alloc is a slice of it that runs commands locally.

    Args:
        reserve_mem: bytes of memory never granted (default `default_reserve_mem`).
        work_root: where attempts' work dirs go (default `default_work_root()`).
        capacity: use this instead of measuring the machine (tests, or a share of a machine).
        executor: how attempts run and what they leave behind (`ExecutorConfig`).
    """

    def __init__(
        self,
        *,
        reserve_mem: int | None = None,
        work_root: Path | str | None = None,
        capacity: Resources | None = None,
        executor: ExecutorConfig | None = None,
    ) -> None:
        self.work_root = Path(work_root) if work_root is not None else default_work_root()
        if capacity is None:
            total = psutil.virtual_memory().total
            reserve = default_reserve_mem(total) if reserve_mem is None else reserve_mem
            if reserve < 0:
                raise ValueError(f"reserve_mem must be >= 0 bytes, got {reserve_mem!r}")
            measured = machine_capacity(reserve_mem=reserve, disk_path=self.work_root)
            capacity = Resources(
                cpu=measured.cpu, mem=measured.mem, disk=measured.disk, gpu=count_gpus()
            )
        self.capacity = capacity
        self.executor = LocalExecutor(self.work_root, executor)
        self._shape = AllocShape(resources=capacity, name="local")
        self._allocated = Resources()
        self._free_gpus = list(range(capacity.gpu))
        self._allocs: dict[str, LocalAlloc] = {}
        self._freed: anyio.Event | None = None
        self._waiting = 0

    def shapes(self) -> Sequence[AllocShape]:
        """The whole machine, as the one shape on offer."""
        return [self._shape]

    def available(self) -> Resources:
        """What is not allocated now."""
        return self.capacity - self._allocated

    def can_grow(self) -> bool:
        """False while a request waits for room on this machine."""
        return self._waiting == 0

    def waiting(self) -> int:
        """How many allocate calls are waiting for room now."""
        return self._waiting

    def allocs(self) -> list[LocalAlloc]:
        """The allocs granted and not yet freed."""
        return list(self._allocs.values())

    async def allocate(self, requirements: Requirements, labels: Mapping[str, str]) -> Alloc:
        """A slice of at least `requirements.min`, up to `requirements.full` as far as is free.

        Waits until enough is unallocated; cancellation abandons the wait.

        Raises:
            AllocationError: the request is larger than the whole machine.
        """
        need = requirements.min
        if not need.fits_in(self.capacity):
            too_big = ", ".join(need.exceeding(self.capacity))
            raise AllocationError(
                f"this machine cannot hold {need.describe()} (too much {too_big}); it has "
                f"{self.capacity.describe()} in all"
            )
        while not need.fits_in(self.available()):
            if self._freed is None:
                self._freed = anyio.Event()
            self._waiting += 1
            try:
                await self._freed.wait()
            finally:
                self._waiting -= 1
        grant = need.max(requirements.full.min(self.available()))
        gpus, self._free_gpus = self._free_gpus[: grant.gpu], self._free_gpus[grant.gpu :]
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if self.capacity.gpu else {}
        alloc = LocalAlloc(
            f"local-{secrets.token_hex(6)}",
            grant,
            {**labels, "provider": "local"},
            self.executor,
            env=env,
            on_free=self._release,
            gpu_ids=gpus,
        )
        self._allocated = self._allocated + grant
        self._allocs[alloc.id] = alloc
        return alloc

    def _release(self, alloc: LocalAlloc) -> None:
        """Give a freed alloc's slice back and wake the requests waiting for room."""
        if self._allocs.pop(alloc.id, None) is None:
            return
        self._allocated = self._allocated - alloc.resources
        self._free_gpus = sorted(self._free_gpus + alloc.gpu_ids)
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    async def aclose(self) -> None:
        """Free any alloc still held (the scheduler normally frees them all first)."""
        for alloc in list(self._allocs.values()):
            with contextlib.suppress(Exception):
                await alloc.free()
