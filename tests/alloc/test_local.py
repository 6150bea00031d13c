"""Tests of the local executor and LocalAlloc with real subprocesses."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import psutil
import pytest

from packsched.alloc.local import STDERR_FILE, ExecutorConfig, LocalAlloc, LocalExecutor
from packsched.errors import AllocationError
from packsched.resources import GiB, MiB, Resources
from packsched.stats.runtime import own_peak_rss
from packsched.task import Task, TaskResult, TaskSpec, TaskState, new_task_id

PY = sys.executable


def make_task(command: list[str], **spec: object) -> Task:
    """A RUNNING task snapshot with a fresh id, as the scheduler hands it to an alloc."""
    return Task(id=new_task_id(), spec=TaskSpec(command=command, **spec), state=TaskState.RUNNING)  # type: ignore[arg-type]


@pytest.fixture
def executor(tmp_path: Path) -> LocalExecutor:
    """An executor with a short kill grace under a temporary work root."""
    return LocalExecutor(tmp_path / "work", ExecutorConfig(kill_grace=0.5))


class Started:
    """A `started` callback that counts its calls and can be awaited."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = anyio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds, failing after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling the OS, which has no event to wait on
            await anyio.sleep(0.02)


def processes_of(task: Task) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment names `task`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if (
                proc.environ().get("PACKSCHED_TASK_ID") == task.id
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def same_dir(a: str | Path, b: Path) -> bool:
    """True when both paths name the same directory."""
    return os.path.realpath(a) == os.path.realpath(b)


async def run(executor: LocalExecutor, task: Task) -> tuple[TaskResult, Started]:
    started = Started()
    result = await executor.run(task, started)
    return result, started


async def test_success_has_output_statistics_and_no_errors(executor: LocalExecutor) -> None:
    """A command that exits 0 settles with no errors, its stdout tail and its statistics."""
    task = make_task(["sh", "-c", "echo hello; echo oops >&2"])
    result, started = await run(executor, task)
    assert started.calls == 1
    assert result.exit_code == 0
    assert result.output.errors == []
    assert result.stdout_tail == "hello\n"
    assert result.stderr_tail == "oops\n"
    stats = result.output.runtime_statistics
    assert stats is not None
    assert stats.duration > 0
    assert stats.available_memory > 0
    assert stats.available_disk_space > 0
    assert stats.cpu_count >= 1
    assert not executor.work_dir(task).exists()  # completed attempts leave no dir


async def test_child_touching_200_mib_is_measured(executor: LocalExecutor) -> None:
    """A child of the main process that touches 200 MiB is measured at >= 180 MiB peak."""
    code = "import time; b = b'x' * (200 * 1024 * 1024); time.sleep(0.3)"
    task = make_task(["sh", "-c", f'"{PY}" -c "{code}"; true'])
    result, _ = await run(executor, task)
    assert result.exit_code == 0, result.stderr_tail
    stats = result.output.runtime_statistics
    assert stats is not None
    assert stats.memory >= 180 * MiB


async def test_short_lived_toucher_counts_through_rusage(executor: LocalExecutor) -> None:
    """A child that touches 200 MiB and exits at once is still counted (kernel peak RSS floor)."""
    if own_peak_rss() > 150 * MiB:
        pytest.skip("this test process is too large for its ru_maxrss to tell a child's peak")
    code = "b = b'x' * (200 * 1024 * 1024)"
    task = make_task(["sh", "-c", f'"{PY}" -c "{code}"; true'])
    result, _ = await run(executor, task)
    stats = result.output.runtime_statistics
    assert stats is not None
    assert stats.memory >= 180 * MiB


BLOATED_SPAWNER = """
import anyio, sys, tempfile
from packsched.alloc.local import LocalExecutor
from packsched.task import Task, TaskSpec, TaskState, new_task_id

ballast = b"x" * (300 * 1024 * 1024)

async def main() -> None:
    task = Task(id=new_task_id(), spec=TaskSpec(command=["sleep", "0.1"]), state=TaskState.RUNNING)
    result = await LocalExecutor(tempfile.mkdtemp()).run(task, lambda: None)
    print(result.output.runtime_statistics.memory)

anyio.run(main)
"""


async def test_memory_is_not_the_spawners() -> None:
    """A small command spawned by a 300 MiB daemon is not charged the daemon's memory."""
    done = await anyio.run_process([PY, "-c", BLOATED_SPAWNER])
    assert int(done.stdout) < 50 * MiB


async def test_sleeper_duration_covers_its_wall_time(executor: LocalExecutor) -> None:
    """A 0.5 s sleeper's duration is at least 0.5 s."""
    result, _ = await run(executor, make_task(["sleep", "0.5"]))
    stats = result.output.runtime_statistics
    assert stats is not None
    assert stats.duration >= 0.5


async def test_cpu_time_includes_children(executor: LocalExecutor) -> None:
    """CPU time spent by a child process is counted."""
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass"
    result, _ = await run(executor, make_task(["sh", "-c", f'"{PY}" -c "{code}"']))
    stats = result.output.runtime_statistics
    assert stats is not None
    assert stats.cpu_time >= 0.2


async def test_disk_space_of_work_dir_is_measured(executor: LocalExecutor) -> None:
    """Bytes written into the work dir are counted as disk space."""
    task = make_task(["sh", "-c", "head -c 3000000 /dev/zero > data.bin"])
    result, _ = await run(executor, task)
    stats = result.output.runtime_statistics
    assert stats is not None
    assert stats.disk_space >= 3_000_000


async def test_exit_7_is_exit_status_error(executor: LocalExecutor) -> None:
    """A nonzero exit settles as error `exit-status` naming the status; the dir is kept."""
    task = make_task(["sh", "-c", "echo broken >&2; exit 7"], name="step")
    result, started = await run(executor, task)
    assert started.calls == 1
    assert result.exit_code == 7
    assert result.error is not None
    assert result.error.code == "exit-status"
    assert "step exited with status 7" in result.error.message
    assert result.stderr_tail == "broken\n"
    assert (executor.work_dir(task) / STDERR_FILE).read_text() == "broken\n"


async def test_killed_by_signal_names_the_signal(executor: LocalExecutor) -> None:
    """A command killed by a signal says which one."""
    result, _ = await run(executor, make_task(["sh", "-c", "kill -KILL $$"]))
    assert result.exit_code == -9
    assert result.error is not None
    assert result.error.code == "exit-status"
    assert "SIGKILL" in result.error.message
    assert "memory" in result.error.message


async def test_missing_program_is_spawn_failed(executor: LocalExecutor) -> None:
    """A program that does not exist settles as `spawn-failed` and never starts."""
    result, started = await run(executor, make_task(["/no/such/program-xyz"]))
    assert started.calls == 0
    assert result.exit_code is None
    assert result.error is not None
    assert result.error.code == "spawn-failed"
    assert "no such program" in result.error.message
    assert "No such file or directory" in result.error.message


async def test_missing_cwd_is_spawn_failed(executor: LocalExecutor, tmp_path: Path) -> None:
    """A cwd that does not exist settles as `spawn-failed` naming the directory."""
    missing = tmp_path / "nowhere"
    result, started = await run(executor, make_task(["true"], cwd=str(missing)))
    assert started.calls == 0
    assert result.error is not None
    assert result.error.code == "spawn-failed"
    assert str(missing) in result.error.message
    assert "spec.cwd" in result.error.message


async def test_not_executable_is_spawn_failed(executor: LocalExecutor, tmp_path: Path) -> None:
    """A file without execute permission settles as `spawn-failed` with permission denied."""
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    result, _ = await run(executor, make_task([str(script)]))
    assert result.error is not None
    assert result.error.code == "spawn-failed"
    assert "chmod +x" in result.error.message


async def test_timeout_settles_with_timeout(executor: LocalExecutor) -> None:
    """A command running past spec.timeout is stopped and settles as `timeout`."""
    task = make_task(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.3)
    result, started = await run(executor, task)
    assert started.calls == 1
    assert result.error is not None
    assert result.error.code == "timeout"
    assert "timed out after 0.3s" in result.error.message
    assert result.exit_code == -15
    assert processes_of(task) == []


async def test_timeout_kills_a_command_ignoring_sigterm(executor: LocalExecutor) -> None:
    """A command that ignores SIGTERM is SIGKILLed after the grace."""
    task = make_task(["sh", "-c", "trap '' TERM; sleep 30 & wait"], timeout=0.3)
    result, _ = await run(executor, task)
    assert result.error is not None
    assert result.error.code == "timeout"
    assert processes_of(task) == []


async def test_kill_ends_the_whole_tree(executor: LocalExecutor) -> None:
    """Cancelling a task whose command forked children (one in a new session) leaves nothing."""
    script = "sleep 60 & (sleep 60 &) ; setsid sleep 60 & sleep 60"
    task = make_task(["sh", "-c", script])
    started = Started()
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.run, task, started)
        await started.event.wait()
        await wait_until(lambda: len(processes_of(task)) >= 5)
        tg.cancel_scope.cancel()
    await wait_until(lambda: processes_of(task) == [])
    assert executor.work_dir(task).exists()  # killed attempts keep their dir


async def test_leftover_background_processes_are_ended(executor: LocalExecutor) -> None:
    """Background processes still running when the main process exits are ended."""
    task = make_task(["sh", "-c", "sleep 60 & setsid sleep 60 & echo done"])
    result, _ = await run(executor, task)
    assert result.exit_code == 0
    assert result.stdout_tail == "done\n"
    assert processes_of(task) == []


async def test_env_and_default_cwd(executor: LocalExecutor) -> None:
    """The spec's env is merged over the environment and the default cwd is the work dir."""
    task = make_task(["sh", "-c", 'echo "$FOO $HOME"; pwd'], env={"FOO": "bar"})
    result, _ = await run(executor, task)
    lines = result.stdout_tail.splitlines()
    assert lines[0] == f"bar {os.environ.get('HOME', '')}"
    assert same_dir(lines[1], executor.work_dir(task))


async def test_spec_cwd_is_used(executor: LocalExecutor, tmp_path: Path) -> None:
    """A spec's cwd is where the command runs."""
    result, _ = await run(executor, make_task(["pwd"], cwd=str(tmp_path)))
    assert same_dir(result.stdout_tail.strip(), tmp_path)


async def test_tail_keeps_only_the_end(tmp_path: Path) -> None:
    """The stdout tail holds at most tail_bytes of the end, starting at a whole line."""
    executor = LocalExecutor(tmp_path, ExecutorConfig(tail_bytes=100))
    code = "for i in range(1000): print(f'line {i}')"
    result, _ = await run(executor, make_task([PY, "-c", code]))
    assert len(result.stdout_tail.encode()) <= 100
    assert result.stdout_tail.startswith("line ")
    assert result.stdout_tail.endswith("line 999\n")


async def test_keep_policy_bounds_failed_dirs(tmp_path: Path) -> None:
    """Under the default policy only the newest max_kept_failed failed dirs stay."""
    executor = LocalExecutor(tmp_path, ExecutorConfig(max_kept_failed=2))
    tasks = [make_task(["false"]) for _ in range(3)]
    for task in tasks:
        await run(executor, task)
    assert [executor.work_dir(t).exists() for t in tasks] == [False, True, True]
    assert not (tmp_path / tasks[0].id).exists()


@pytest.mark.parametrize(("policy", "kept"), [("always", True), ("never", False)])
async def test_keep_policy_always_and_never(tmp_path: Path, policy: str, kept: bool) -> None:
    """`always` keeps completed attempts' dirs; `never` removes failed ones too."""
    executor = LocalExecutor(tmp_path, ExecutorConfig(keep_work_dirs=policy))  # type: ignore[arg-type]
    ok, bad = make_task(["true"]), make_task(["false"])
    await run(executor, ok)
    result, _ = await run(executor, bad)
    assert executor.work_dir(ok).exists() is kept
    assert executor.work_dir(bad).exists() is kept
    assert result.error is not None
    assert ("work dir was removed" in result.error.message) is not kept


def test_config_is_validated() -> None:
    """Bad executor settings are refused with the field's name."""
    with pytest.raises(ValueError, match="kill_grace"):
        ExecutorConfig(kill_grace=-1)
    with pytest.raises(ValueError, match="sample_threads"):
        ExecutorConfig(sample_threads=0)


# -- LocalAlloc ----------------------------------------------------------------------------


def make_alloc(executor: LocalExecutor, freed: list[str] | None = None) -> LocalAlloc:
    return LocalAlloc(
        "local-test",
        Resources(cpu=1, mem=1 * GiB),
        {"zone": "here"},
        executor,
        env={"ALLOC_VAR": "1"},
        on_free=(lambda a: freed.append(a.id)) if freed is not None else None,
    )


async def test_alloc_runs_a_task_with_its_env(executor: LocalExecutor) -> None:
    """A LocalAlloc runs a task through its executor, with the alloc's env and capacity."""
    alloc = make_alloc(executor)
    started = Started()
    result = await alloc.run(make_task(["sh", "-c", "echo $ALLOC_VAR"]), started)
    assert result.stdout_tail == "1\n"
    stats = result.output.runtime_statistics
    assert stats is not None
    assert stats.cpu_count == 1
    assert stats.available_memory <= 1 * GiB
    await alloc.keepalive()
    assert alloc.running() == []


async def test_free_stops_running_tasks_and_releases(executor: LocalExecutor) -> None:
    """Freeing an alloc stops its running task (run raises) and releases the slice once."""
    freed: list[str] = []
    alloc = make_alloc(executor, freed)
    task = make_task(["sh", "-c", "sleep 60 & sleep 60"])
    started = Started()
    errors: list[BaseException] = []

    async def runner() -> None:
        try:
            await alloc.run(task, started)
        except AllocationError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner)
        await started.event.wait()
        assert alloc.running() == [task.id]
        await alloc.free()
        await alloc.free()
    assert freed == ["local-test"]
    assert len(errors) == 1
    assert "freed while task" in str(errors[0])
    assert processes_of(task) == []
    with pytest.raises(AllocationError, match="freed"):
        await alloc.keepalive()
    with pytest.raises(AllocationError, match="is freed"):
        await alloc.run(make_task(["true"]), Started())
