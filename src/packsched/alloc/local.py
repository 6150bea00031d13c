"""The local executor: one attempt of a task as a subprocess tree on this machine.

`LocalExecutor.run` is the whole life of an attempt: a fresh work directory, the command in its
own session and process group, stdout and stderr to files, runtime statistics sampled from a
worker thread, the timeout, and an end that leaves no process behind. It knows nothing of
allocs, so the remote agent reuses it as is; `LocalAlloc` is the slice of this machine that
`LocalCluster` grants, running its tasks through an executor.

Work directories live at `<work_root>/<task id>/<attempt>`. The default policy keeps the
directories of attempts that did not complete (for their logs and files), at most
`max_kept_failed` of them (oldest removed first), and removes those of completed attempts.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import resource
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread
import msgspec
import psutil

from ..cluster.base import Alloc, StartedCallback
from ..errors import AllocationError
from ..resources import Resources, format_bytes
from ..stats.runtime import (
    TreeSampler,
    find_processes,
    own_peak_rss,
    sample_interval,
    start_statistics,
)
from ..task import RuntimeStatistics, Task, TaskError, TaskOutput, TaskResult

__all__ = [
    "STDERR_FILE",
    "STDOUT_FILE",
    "ExecutorConfig",
    "LocalAlloc",
    "LocalExecutor",
]

STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
# Every process of an attempt inherits this variable; it finds daemons that left the session.
MARKER_VAR = "PACKSCHED_ATTEMPT_TOKEN"


class ExecutorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the executor runs attempts and what it keeps afterwards.

    Attributes:
        kill_grace: seconds between SIGTERM and SIGKILL when an attempt is stopped.
        keep_work_dirs: "failed" keeps the work dirs of attempts that did not complete,
            "always" keeps every one, "never" removes every one when the attempt ends.
        max_kept_failed: under "failed", at most this many kept dirs; the oldest go first.
        tail_bytes: how much of the end of stdout and stderr a result carries.
        sample_threads: worker threads shared by all attempts' samplers.
    """

    kill_grace: float = 5.0
    keep_work_dirs: Literal["failed", "always", "never"] = "failed"
    max_kept_failed: int = 100
    tail_bytes: int = 4096
    sample_threads: int = 4

    def __post_init__(self) -> None:
        if not self.kill_grace >= 0:
            raise ValueError(f"kill_grace must be >= 0 seconds, got {self.kill_grace!r}")
        if self.max_kept_failed < 0:
            raise ValueError(f"max_kept_failed must be >= 0, got {self.max_kept_failed!r}")
        if self.tail_bytes < 0:
            raise ValueError(f"tail_bytes must be >= 0, got {self.tail_bytes!r}")
        if self.sample_threads < 1:
            raise ValueError(f"sample_threads must be >= 1, got {self.sample_threads!r}")


class _Spawned:
    """What a spawn in a worker thread hands back, even when the caller was cancelled."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.epoch = 0.0  # start time of the main process, on psutil's clock
        self.t0 = 0.0
        self.spawner_peak = 0  # our own peak RSS, which the child's ru_maxrss starts from
        self.sampler: TreeSampler | None = None


class LocalExecutor:
    """Runs attempts of tasks as local subprocess trees and measures them."""

    def __init__(self, work_root: Path | str, config: ExecutorConfig | None = None) -> None:
        self.work_root = Path(work_root).absolute()
        self.config = config or ExecutorConfig()
        self._kept: collections.deque[Path] = collections.deque()
        self._limiter: anyio.CapacityLimiter | None = None

    def work_dir(self, task: Task) -> Path:
        """Where `task`'s current attempt runs: `<work_root>/<task id>/<attempt>`."""
        return self.work_root / task.id / str(task.attempt)

    async def run(
        self,
        task: Task,
        started: StartedCallback,
        *,
        capacity: Resources | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TaskResult:
        """Run one attempt of `task` to its end and return its result.

        Calls `started()` once the command runs; a result without that call means it could
        not start (error `spawn-failed`). Cancellation stops the whole process tree (SIGTERM,
        SIGKILL after `kill_grace`), shielded, before re-raising.

        Args:
            task: the task; its spec gives command, env, cwd and timeout.
            started: called once when the command is running.
            capacity: the alloc's resources, reported as what was available at start.
            env: extra variables for the command (the spec's `env` wins over them).
        """
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.config.sample_threads)
        work_dir = self.work_dir(task)
        await anyio.to_thread.run_sync(_fresh_dir, work_dir)
        start = await anyio.to_thread.run_sync(start_statistics, work_dir, capacity)
        marker = secrets.token_hex(8)
        full_env = {
            **os.environ,
            **(env or {}),
            **task.spec.env,
            "PACKSCHED_TASK_ID": task.id,
            "PACKSCHED_ATTEMPT": str(task.attempt),
            "PACKSCHED_WORK_DIR": str(work_dir),
            MARKER_VAR: marker,
        }
        cwd = Path(task.spec.cwd) if task.spec.cwd else work_dir
        spawned = _Spawned()
        try:
            await anyio.to_thread.run_sync(
                _spawn, spawned, task.spec.command, work_dir, cwd, full_env
            )
        except OSError as exc:
            await self._finish_dir(work_dir, failed=True)
            return TaskResult(
                output=TaskOutput(
                    runtime_statistics=start,
                    errors=[TaskError(code="spawn-failed", message=_spawn_message(task, cwd, exc))],
                )
            )
        except BaseException:
            if spawned.proc is not None:  # cancelled while the spawn thread ran
                with anyio.CancelScope(shield=True):
                    await self._kill(spawned, spawned.sampler, marker, work_dir)
            raise
        proc = spawned.proc
        assert proc is not None
        return await self._supervise(task, started, spawned, proc, work_dir, start, marker)

    async def _supervise(
        self,
        task: Task,
        started: StartedCallback,
        spawned: _Spawned,
        proc: subprocess.Popen[bytes],
        work_dir: Path,
        start: RuntimeStatistics,
        marker: str,
    ) -> TaskResult:
        """Wait for the attempt's end (exit, timeout or cancellation) while sampling it."""
        sampler = spawned.sampler or TreeSampler(proc.pid, work_dir, session=proc.pid)
        exited_at = 0.0
        timed_out = False
        try:
            started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sample_loop, sampler, spawned.t0)
                with anyio.move_on_after(task.spec.timeout) as scope:
                    await _wait_exit(proc.pid)
                exited_at = time.monotonic()
                if scope.cancelled_caught:
                    timed_out = True
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        exited_at = await self._stop(spawned, sampler, marker)
                tg.cancel_scope.cancel()
        except BaseException:
            # Killed (cancelled): end the whole tree before letting the cancellation go on.
            with anyio.CancelScope(shield=True):
                await self._kill(spawned, sampler, marker, work_dir)
            raise
        return await self._conclude(
            task, spawned, proc, sampler, work_dir, start, marker, exited_at, timed_out
        )

    async def _conclude(
        self,
        task: Task,
        spawned: _Spawned,
        proc: subprocess.Popen[bytes],
        sampler: TreeSampler,
        work_dir: Path,
        start: RuntimeStatistics,
        marker: str,
        exited_at: float,
        timed_out: bool,
    ) -> TaskResult:
        """Reap the ended command, end its leftovers, and build its result.

        What is left is bounded and must happen even if a kill arrives now (the zombie reaped,
        leftovers ended, the dir handled), so it runs shielded.
        """
        with anyio.CancelScope(shield=True):
            await self._run_sync(_final_sample, sampler)  # last look: disk and lingering children
            status, rusage = _reap(proc)
            await self._end_leftovers(spawned, sampler, marker)
            stdout_tail, stderr_tail = await anyio.to_thread.run_sync(
                _tails, work_dir, self.config.tail_bytes
            )
        cpu = rusage.ru_utime + rusage.ru_stime if rusage else 0.0
        maxrss = rusage.ru_maxrss * 1024 if rusage else 0  # Linux reports KiB
        stats = sampler.finish(
            duration=exited_at - spawned.t0,
            rusage_cpu=cpu,
            rusage_maxrss=maxrss,
            spawner_peak=spawned.spawner_peak,
            start=start,
        )
        errors: list[TaskError] = []
        keep = self.config.keep_work_dirs != "never"
        if timed_out:
            errors.append(TaskError(code="timeout", message=_timeout_message(task, work_dir, keep)))
        elif status != 0:
            errors.append(
                TaskError(
                    code="exit-status", message=_exit_message(task, status, stats, work_dir, keep)
                )
            )
        with anyio.CancelScope(shield=True):
            await self._finish_dir(work_dir, failed=bool(errors))
        return TaskResult(
            exit_code=status,
            output=TaskOutput(runtime_statistics=stats, errors=errors),
            stdout_tail=stdout_tail,
            stderr_tail=stderr_tail,
        )

    async def _run_sync(self, fn: Callable[..., object], *args: object) -> None:
        await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _sample_loop(self, sampler: TreeSampler, t0: float) -> None:
        """Sample until cancelled: fast at first, slower as the attempt ages; disk every 10th."""
        while True:
            await self._run_sync(_sample, sampler)
            await anyio.sleep(sample_interval(time.monotonic() - t0))

    async def _kill(
        self, spawned: _Spawned, sampler: TreeSampler | None, marker: str, work_dir: Path
    ) -> None:
        """Stop an attempt that is being cancelled: its tree, its main process, its dir."""
        assert spawned.proc is not None
        await self._stop(spawned, sampler, marker)
        _reap(spawned.proc)
        await self._end_leftovers(spawned, sampler, marker)
        await self._finish_dir(work_dir, failed=True)

    async def _stop(self, spawned: _Spawned, sampler: TreeSampler | None, marker: str) -> float:
        """Stop a running attempt: SIGTERM to its group and every known process, SIGKILL after
        the grace; wait for the main process to exit (not reaping it) and return when it did."""
        proc = spawned.proc
        assert proc is not None
        pid = proc.pid
        _killpg(pid, signal.SIGTERM)
        victims = await anyio.to_thread.run_sync(_victims, spawned, sampler, marker)
        _signal_all(victims, signal.SIGTERM)
        exited_at: float | None = None
        with anyio.move_on_after(self.config.kill_grace):
            await _wait_exit(pid)
            exited_at = time.monotonic()
        if exited_at is None:
            _killpg(pid, signal.SIGKILL)
            _signal_all(victims, signal.SIGKILL)
            await _wait_exit(pid)
            exited_at = time.monotonic()
        return exited_at

    async def _end_leftovers(
        self, spawned: _Spawned, sampler: TreeSampler | None, marker: str
    ) -> None:
        """After the main process ended, end whatever it left running (TERM, then KILL).

        An attempt is over when its main process is; a daemon it started would hold the
        alloc's resources without anyone accounting for them.
        """
        pid = spawned.proc.pid if spawned.proc else None
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
            victims = await anyio.to_thread.run_sync(_victims, spawned, sampler, marker)
            if not victims:
                return
            if pid is not None:
                _killpg(pid, sig)
            _signal_all(victims, sig)
            grace = self.config.kill_grace if sig == signal.SIGTERM else 5.0
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                victims = await anyio.to_thread.run_sync(_still_alive, victims)
                if not victims:
                    return
                await anyio.sleep(0.02)

    async def _finish_dir(self, work_dir: Path, *, failed: bool) -> None:
        """Apply the keep policy to an attempt's work dir."""
        policy = self.config.keep_work_dirs
        if policy == "always":
            return
        if policy == "never" or not failed:
            await anyio.to_thread.run_sync(_remove_dir, work_dir)
            return
        self._kept.append(work_dir)
        while len(self._kept) > self.config.max_kept_failed:
            await anyio.to_thread.run_sync(_remove_dir, self._kept.popleft())


# -- blocking helpers (run in worker threads) ---------------------------------------------


def _fresh_dir(path: Path) -> None:
    """An empty directory at `path` (a leftover of an earlier daemon's attempt is removed)."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def _remove_dir(path: Path) -> None:
    """Remove an attempt's dir, and its task's dir when no other attempt is left in it."""
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (another attempt kept) or already gone
        path.parent.rmdir()


def _spawn(
    spawned: _Spawned, command: list[str], work_dir: Path, cwd: Path, env: dict[str, str]
) -> None:
    """Start the command in its own session (so its own process group), output to files."""
    with (
        open(work_dir / STDOUT_FILE, "wb") as out,
        open(work_dir / STDERR_FILE, "wb") as err,
    ):
        spawned.epoch = time.time()  # replaced by psutil's view below
        # Before the spawn: the command's clock starts at exec, inside Popen, and its duration
        # must never come out shorter than its own wall time.
        spawned.t0 = time.monotonic()
        spawned.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        # psutil's start times carry an offset of up to a second against time.time() (boot
        # time is whole seconds), so descendants are compared with the main process's own.
        with contextlib.suppress(psutil.Error):
            spawned.epoch = psutil.Process(spawned.proc.pid).create_time()
        spawned.spawner_peak = own_peak_rss()
        # A first sample at once: a command that exits within milliseconds is seen at least here.
        spawned.sampler = TreeSampler(spawned.proc.pid, work_dir, session=spawned.proc.pid)
        spawned.sampler.sample()


def _sample(sampler: TreeSampler) -> None:
    sampler.sample(disk=sampler.samples % 10 == 0)


def _final_sample(sampler: TreeSampler) -> None:
    sampler.sample(disk=True)


def _victims(spawned: _Spawned, sampler: TreeSampler | None, marker: str) -> list[psutil.Process]:
    """Every live process of the attempt except the main one (which is reaped separately)."""
    assert spawned.proc is not None
    pid = spawned.proc.pid
    found = {p.pid: p for p in sampler.processes()} if sampler else {}
    for proc in find_processes(
        session=pid, marker=(MARKER_VAR, marker), started_after=spawned.epoch, exclude=(pid,)
    ):
        found.setdefault(proc.pid, proc)
    return list(found.values())


def _still_alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def _signal_all(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for p in procs:
        try:
            p.send_signal(sig)  # psutil checks the pid still names the same process
        except psutil.Error:
            continue


def _killpg(pgid: int, sig: signal.Signals) -> None:
    # ESRCH: the group is empty; EPERM: its pgid now names a group we may not signal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int, resource.struct_rusage | None]:
    """Reap the exited main process with `wait4`, for its status and rusage (children included)."""
    if proc.returncode is not None:
        return proc.returncode, None
    try:
        _, status, rusage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere; the status is lost
        proc.returncode = -1
        return -1, None
    proc.returncode = os.waitstatus_to_exitcode(status)  # tells Popen it is gone
    return proc.returncode, rusage


async def _wait_exit(pid: int) -> None:
    """Wait until process `pid` (our child) has exited, without reaping it."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        fd = None
    if fd is None:  # no pidfd (old kernel): poll, leaving the zombie for `wait4`
        while True:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):  # noqa: ASYNC222
                    return
            except ChildProcessError:
                return
            await anyio.sleep(0.01)
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


def _tails(work_dir: Path, size: int) -> tuple[str, str]:
    return _tail(work_dir / STDOUT_FILE, size), _tail(work_dir / STDERR_FILE, size)


def _tail(path: Path, size: int) -> str:
    """The last `size` bytes of a file as text (undecodable bytes replaced)."""
    if size == 0:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read(size)
    except OSError:
        return ""
    if end > size:  # cut the first, partial line so the tail starts cleanly
        newline = data.find(b"\n")
        if 0 <= newline < 200:
            data = data[newline + 1 :]
    return data.decode("utf-8", errors="replace")


# -- messages: what happened and what to do ----------------------------------------------


def _spawn_message(task: Task, cwd: Path, exc: OSError) -> str:
    program = task.spec.command[0]
    if exc.filename is not None and Path(str(exc.filename)) == cwd:
        return (
            f"could not start {program!r}: its working directory {str(cwd)!r} cannot be used "
            f"({exc.strerror}); set spec.cwd to an existing directory on this machine"
        )
    if exc.errno == errno.ENOENT:
        return (
            f"could not start {program!r}: no such program ({exc.strerror}); give its full path "
            f"or make sure it is installed and on PATH of the machine that runs it"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"could not start {program!r}: permission denied ({exc.strerror}); make the file "
            f"executable (chmod +x) or run it through its interpreter"
        )
    return (
        f"could not start {program!r}: {exc.strerror or exc} (errno {exc.errno}); check the command"
    )


def _where(work_dir: Path, keep: bool) -> str:
    return f"full output in {work_dir}" if keep else "its work dir was removed"


def _timeout_message(task: Task, work_dir: Path, keep: bool) -> str:
    return (
        f"{task.spec.display_name()} timed out after {task.spec.timeout:g}s (spec.timeout) and "
        f"was stopped; raise the timeout if it needs longer, or see the stdout/stderr tails "
        f"for where it hung ({_where(work_dir, keep)})"
    )


def _exit_message(
    task: Task, status: int, stats: RuntimeStatistics, work_dir: Path, keep: bool
) -> str:
    name = task.spec.display_name()
    if status < 0:
        try:
            signame = signal.Signals(-status).name
        except ValueError:
            signame = f"signal {-status}"
        hint = ""
        if -status == signal.SIGKILL:
            hint = (
                f"; if nobody killed it, the system may have run out of memory (peak measured "
                f"{format_bytes(stats.memory)}): ask for more mem"
            )
        return (
            f"{name} was killed by {signame}{hint}; see the stderr tail ({_where(work_dir, keep)})"
        )
    return f"{name} exited with status {status}; see the stderr tail ({_where(work_dir, keep)})"


# -- the alloc -------------------------------------------------------------------------------


class LocalAlloc(Alloc):
    """A slice of this machine, granted by `LocalCluster`; it runs tasks with an executor.

    It cannot die while held, so `keepalive` only fails once it is freed. `free` releases the
    slice and stops whatever still runs on it.
    """

    def __init__(
        self,
        id: str,
        resources: Resources,
        labels: Mapping[str, str],
        executor: LocalExecutor,
        *,
        env: Mapping[str, str] | None = None,
        on_free: Callable[[LocalAlloc], None] | None = None,
        gpu_ids: list[int] | None = None,
    ) -> None:
        self.id = id
        self.resources = resources
        self.labels = dict(labels)
        self.executor = executor
        self.env = dict(env or {})
        self.gpu_ids = list(gpu_ids or [])
        self._on_free = on_free
        self._freed = False
        self._running: dict[str, anyio.CancelScope] = {}
        self._done: dict[str, anyio.Event] = {}

    @property
    def freed(self) -> bool:
        """True once `free` has been called."""
        return self._freed

    def running(self) -> list[str]:
        """Ids of the tasks running here now."""
        return list(self._running)

    async def run(self, task: Task, started: StartedCallback) -> TaskResult:
        """Run one attempt of `task` here (see `LocalExecutor.run`).

        Raises:
            AllocationError: the alloc was freed before or while the task ran.
        """
        if self._freed:
            raise AllocationError(f"alloc {self.id} is freed and cannot run task {task.id}")
        scope = anyio.CancelScope()
        done = anyio.Event()
        self._running[task.id] = scope
        self._done[task.id] = done
        result: TaskResult | None = None
        try:
            with scope:
                result = await self.executor.run(
                    task, started, capacity=self.resources, env=self.env
                )
        finally:
            del self._running[task.id]
            del self._done[task.id]
            done.set()
        if result is None:
            raise AllocationError(
                f"alloc {self.id} was freed while task {task.id} ran on it; the task was stopped"
            )
        return result

    async def keepalive(self) -> None:
        """A local slice lives until it is freed."""
        if self._freed:
            raise AllocationError(f"alloc {self.id} was freed")

    async def free(self) -> None:
        """Release the slice; stop (and wait for) every task still running on it."""
        if self._freed:
            return
        self._freed = True
        waits = list(self._done.values())
        for scope in self._running.values():
            scope.cancel()
        # Bounded: a process stuck in the kernel must not hold the scheduler's shutdown.
        with anyio.move_on_after(self.executor.config.kill_grace + 10, shield=True):
            for event in waits:
                await event.wait()
        if self._on_free is not None:
            self._on_free(self)
