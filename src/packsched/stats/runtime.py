"""Runtime statistics of one attempt, measured with psutil over its whole process tree.

`TreeSampler` takes one sample of a tree per call; its methods block (they read /proc), so the
executor calls them from a worker thread and never on the event loop. Peaks are kept across
samples, and three floors make up for what sampling between two ticks can miss:

- memory: the tree's summed RSS is sampled. Two floors come from the kernel: each sampled
  process's own peak (`VmHWM`), and the peak of the main process and every descendant it
  waited for (`ru_maxrss` from `wait4`), so a child that touched 200 MiB and exited between two
  samples is still counted. `ru_maxrss` starts from the RSS of the process that forked the
  command (the daemon: the kernel carries it over `exec`), so it is used only when it exceeds
  the daemon's own peak RSS at spawn; below that it says nothing about the command;
- cpu time: user + system of the main process including its waited-for children (`cpu_times()`
  children fields while it runs, `wait4`'s rusage at the end) plus the own times of every live
  descendant, so short-lived children are not lost;
- duration: wall time from spawn to exit on the monotonic clock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import psutil

from ..resources import Resources
from ..task import RuntimeStatistics

__all__ = [
    "TreeSampler",
    "directory_size",
    "find_processes",
    "machine_capacity",
    "own_peak_rss",
    "sample_interval",
    "start_statistics",
]


def sample_interval(elapsed: float) -> float:
    """Seconds to the next sample of a tree that has run for `elapsed` seconds.

    Fast at the start, where short commands and sudden allocations live (20 ms), slowing to
    200 ms after a second and to 1 s after a minute, so that many long tasks cost little CPU.
    """
    if elapsed < 0.25:
        return 0.02
    if elapsed < 1.0:
        return 0.05
    if elapsed < 60.0:
        return 0.2
    return 1.0


def directory_size(path: Path) -> int:
    """Apparent size in bytes of the regular files under `path` (hard links counted once).

    Files that vanish while being walked are skipped; symbolic links are not followed.
    """
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
            except OSError:
                continue
    return total


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie holds no memory and cannot be killed further)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class TreeSampler:
    """Peaks of one process tree, one blocking `sample()` at a time (call it from a thread).

    Give `session` when the main process leads a session of its own (the executor starts
    every command so): its members are then found cheaply at every sample.

    Every descendant ever seen is remembered (psutil checks a pid's start time, so a reused
    pid is never taken for it), which lets `processes()` find children that left the process
    group or were re-parented when their parent exited.
    """

    def __init__(self, pid: int, work_dir: Path | None, *, session: int | None = None) -> None:
        self.pid = pid
        self.work_dir = work_dir
        self.session = session
        self.peak_memory = 0
        self.peak_cpu_time = 0.0
        self.peak_disk = 0
        self.peak_process = 0  # the largest single-process peak (VmHWM) seen
        self.samples = 0
        self._root: psutil.Process | None
        try:
            self._root = psutil.Process(pid)
        except psutil.Error:
            self._root = None
        self._known: dict[int, psutil.Process] = {}

    def sample(self, *, disk: bool = False) -> None:
        """Take one sample of the tree's summed RSS and CPU time (and, if asked, its disk)."""
        self.samples += 1
        rss = 0
        cpu = 0.0
        root = self._root
        if root is not None:
            try:
                with root.oneshot():
                    t = root.cpu_times()
                    cpu += t.user + t.system + t.children_user + t.children_system
                    rss += self._rss(root)
            except psutil.Error:
                pass  # exited (or a zombie): its descendants are still sampled below
        self._discover()
        for pid, proc in list(self._known.items()):
            try:
                with proc.oneshot():
                    if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                        del self._known[pid]
                        continue
                    t = proc.cpu_times()
                    cpu += t.user + t.system
                    rss += self._rss(proc)
            except psutil.Error:
                self._known.pop(pid, None)
        self.peak_memory = max(self.peak_memory, rss)
        self.peak_cpu_time = max(self.peak_cpu_time, cpu)
        if disk and self.work_dir is not None:
            self.peak_disk = max(self.peak_disk, directory_size(self.work_dir))

    def _discover(self) -> None:
        """Add new members of the tree to the known processes.

        Members of the attempt's session are found with one `getsid` per pid (cheap); a walk of
        the whole process table (psutil's `children`, which reads every /proc/<pid>/stat)
        runs only every 25th sample, or every sample when there is no session, to find
        descendants that started sessions of their own.
        """
        pids: list[int] = []
        if self.session is not None:
            for pid in psutil.pids():
                with contextlib.suppress(OSError):
                    if pid != self.pid and os.getsid(pid) == self.session:
                        pids.append(pid)
        if self._root is not None and (self.session is None or self.samples % 25 == 0):
            with contextlib.suppress(psutil.Error):
                pids.extend(child.pid for child in self._root.children(recursive=True))
        for pid in pids:
            if pid not in self._known:
                with contextlib.suppress(psutil.Error):
                    self._known[pid] = psutil.Process(pid)

    def _rss(self, proc: psutil.Process) -> int:
        """Current RSS of one process; its own peak (VmHWM) raises `peak_process`."""
        rss, hwm = _status_memory(proc.pid)
        if rss is None:
            rss = int(proc.memory_info().rss)
        if hwm is not None:
            self.peak_process = max(self.peak_process, hwm)
        return rss

    def processes(self) -> list[psutil.Process]:
        """Descendants seen so far that are still alive (never the main process itself)."""
        return [p for p in list(self._known.values()) if _alive(p)]  # a copy: a sample may run

    def finish(
        self,
        *,
        duration: float,
        rusage_cpu: float,
        rusage_maxrss: int,
        spawner_peak: int,
        start: RuntimeStatistics,
    ) -> RuntimeStatistics:
        """The attempt's statistics: peaks, floored by the kernel's own accounting.

        Args:
            duration: seconds from spawn to exit.
            rusage_cpu: user + system seconds from `wait4` (main process and waited children).
            rusage_maxrss: peak RSS in bytes from `wait4` (largest single process).
            spawner_peak: the spawning process's own peak RSS just after the spawn; a
                `rusage_maxrss` not above it may be the spawner's and is not used.
            start: the availability measured at start (`start_statistics`).
        """
        floor = rusage_maxrss if rusage_maxrss > spawner_peak else 0
        return RuntimeStatistics(
            duration=duration,
            cpu_time=max(self.peak_cpu_time, rusage_cpu),
            memory=max(self.peak_memory, self.peak_process, floor),
            disk_space=self.peak_disk,
            available_memory=start.available_memory,
            available_disk_space=start.available_disk_space,
            cpu_count=start.cpu_count,
        )


def _status_memory(pid: int | str) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in bytes from /proc/<pid>/status; None where not readable."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def own_peak_rss() -> int:
    """This process's peak RSS in bytes (0 where /proc is not available)."""
    return _status_memory("self")[1] or 0


def start_statistics(work_dir: Path, capacity: Resources | None) -> RuntimeStatistics:
    """What the attempt had available at start: memory, disk and cores (blocking).

    Each is the machine's free amount, clipped to the alloc's `capacity` when one is given.
    """
    memory = psutil.virtual_memory().available
    disk = shutil.disk_usage(work_dir).free
    cores = float(psutil.cpu_count() or 1)
    if capacity is not None:
        memory = min(memory, capacity.mem) if capacity.mem else memory
        disk = min(disk, capacity.disk) if capacity.disk else disk
        cores = capacity.cpu or cores
    return RuntimeStatistics(available_memory=memory, available_disk_space=disk, cpu_count=cores)


def find_processes(
    *,
    session: int | None,
    marker: tuple[str, str] | None,
    started_after: float,
    exclude: Iterable[int] = (),
) -> list[psutil.Process]:
    """Processes of one attempt that may have escaped its tree (blocking: scans /proc).

    A process belongs to the attempt if it is still in the attempt's session, or if its
    environment carries the attempt's `marker` (name, value) - which catches daemons that
    started a new session. Only processes created after `started_after` (epoch seconds) count,
    so a reused pid is never taken for one of ours; pass a time from psutil's `create_time`,
    whose clock may be offset from `time.time()`.
    """
    skip = {os.getpid(), *exclude}
    needle = f"{marker[0]}={marker[1]}".encode() if marker else None
    found: list[psutil.Process] = []
    for pid in psutil.pids():
        if pid in skip:
            continue
        ours = False
        if session is not None:
            try:
                ours = os.getsid(pid) == session
            except OSError:
                continue
        if not ours and needle is not None:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    ours = needle in f.read().split(b"\0")
            except OSError:
                continue
        if not ours:
            continue
        try:
            proc = psutil.Process(pid)
            if proc.create_time() >= started_after and _alive(proc):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def machine_capacity(*, reserve_mem: int, disk_path: Path) -> Resources:
    """This machine's cores, memory minus `reserve_mem` and free disk at `disk_path` (blocking)."""
    cores = float(psutil.cpu_count() or 1)
    with contextlib.suppress(AttributeError, OSError):  # affinity is Linux-only
        cores = float(len(os.sched_getaffinity(0))) or cores
    mem = max(0, psutil.virtual_memory().total - reserve_mem)
    probe = disk_path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    disk = shutil.disk_usage(probe).free
    return Resources(cpu=cores, mem=mem, disk=disk)
