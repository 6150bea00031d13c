"""The crash test: a real scheduler process on a SQLite store, SIGKILLed again and again.

Nothing accepted is lost, and nothing whose completion was recorded runs again. A task that
finished on the cluster but was killed before the store recorded COMPLETE legitimately runs
again as a new attempt (its completion was never recorded); the checks below tell the two
apart with the executions the child logs on the cluster side.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from packsched.store import HistoryQuery, SQLiteStore
from packsched.task import TaskState

CHILD = Path(__file__).with_name("crash_child.py")
TASKS = 5000
KILLS = 12
S = TaskState


Moment = Callable[["Child"], Awaitable[None]]


def after_seconds(seconds: float) -> Moment:
    """A kill moment this long after the child was spawned (start-up, resume, submits)."""

    async def moment(_: Child) -> None:
        await anyio.sleep(seconds)

    return moment


def after_executions(count: int) -> Moment:
    """A kill moment once the child has run `count` more tasks: in the thick of the work,
    however fast or slow this machine is today."""

    async def moment(child: Child) -> None:
        target = child.executed() + count
        while child.executed() < target:  # noqa: ASYNC110 - polling a file, bounded by run()
            await anyio.sleep(0.005)

    return moment


class Child:
    """One run of the child process, its output captured in a file."""

    def __init__(self, workdir: Path, run: int) -> None:
        self.store = workdir / "store.db"
        self.executions = workdir / "executions.txt"
        self.output = workdir / f"child-{run}.out"

    def executed(self) -> int:
        """Executions logged so far, by every run."""
        try:
            return self.executions.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    async def run(self, moment: Moment | None, *, timeout: float = 120) -> bool:
        """Run the child until it exits, or SIGKILL it at `moment`. True if it was killed."""
        command = [sys.executable, str(CHILD), str(self.store), str(self.executions), str(TASKS)]
        with self.output.open("wb") as out:
            process = await anyio.open_process(command, stdout=out, stderr=subprocess.STDOUT)
            async with process, anyio.create_task_group() as tg:
                tg.start_soon(self._kill_at, process, moment, timeout)
                await process.wait()
                tg.cancel_scope.cancel()
        killed = process.returncode == -signal.SIGKILL
        if moment is None or not killed:
            assert process.returncode == 0, self.output.read_text()
        return killed

    async def _kill_at(self, process: Process, moment: Moment | None, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await (moment(self) if moment is not None else anyio.sleep_forever())
        # SIGKILL: no cleanup of any kind runs in the child. It may have just exited.
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    def accepted(self) -> int:
        """How many tasks the child's submits had returned (accepted) before it died."""
        lines = self.output.read_text().splitlines()
        counts = [int(line.split()[1]) for line in lines if line.startswith("accepted ")]
        return max(counts, default=0)


async def stored_keys(path: Path) -> set[str]:
    """The keys of the tasks the store holds (opening it also proves the lock was freed)."""
    store = SQLiteStore(path)
    await store.open()
    try:
        return {t.spec.key for t in await store.load_tasks() if t.spec.key is not None}
    finally:
        await store.close()


@pytest.mark.slow
async def test_sigkill_loses_nothing_and_reruns_nothing_completed(tmp_path: Path) -> None:
    """Every task ends COMPLETE exactly once across >= 10 SIGKILLs of the scheduler process."""
    seed = int(os.environ.get("PACKSCHED_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    kills = runs = 0
    while kills < KILLS:
        runs += 1
        assert runs <= 3 * KILLS, (
            f"the child kept finishing before it could be killed (seed {seed})"
        )
        child = Child(tmp_path, runs)
        # A quarter of the kills land in start-up, resume or the submits; the rest while tasks
        # run and finish. At most 400 executions a run, so the work outlasts the kills.
        if rng.random() < 0.25:
            moment = after_seconds(rng.uniform(0.05, 0.8))
        else:
            moment = after_executions(rng.randint(1, 400))
        if await child.run(moment):
            kills += 1
        accepted = child.accepted()
        missing = {f"task-{i}" for i in range(accepted)} - await stored_keys(child.store)
        assert not missing, f"accepted tasks lost after a kill (seed {seed}): {sorted(missing)[:5]}"

    final = Child(tmp_path, runs + 1)
    assert not await final.run(None)
    assert f"finished [('complete', {TASKS})]" in final.output.read_text()

    store = SQLiteStore(final.store)
    await store.open()
    try:
        tasks = await store.load_tasks()
        history = await store.history(HistoryQuery())
    finally:
        await store.close()

    # None lost, none duplicated: one task per key, every one COMPLETE.
    assert sorted(t.spec.key or "" for t in tasks) == sorted(f"task-{i}" for i in range(TASKS))
    assert {t.state for t in tasks} == {S.COMPLETE}

    executed = [tuple(line.split()) for line in final.executions.read_text().splitlines()]
    runs_of = Counter((task_id, int(attempt)) for task_id, attempt in executed)
    assert max(runs_of.values()) == 1, "an attempt ran twice"
    attempts_of: dict[str, list[int]] = defaultdict(list)
    for task_id, attempt in runs_of:
        attempts_of[task_id].append(attempt)
    logged: dict[str, list[tuple[int, TaskState]]] = defaultdict(list)
    for a in history:
        logged[a.task_id].append((a.attempt, a.state))

    for task in tasks:
        # The attempt the store holds as COMPLETE really ran, and nothing ran after it:
        # once COMPLETE was recorded, no restart ran the task again.
        assert max(attempts_of[task.id]) == task.attempt, task.id
        # The history holds exactly one COMPLETE, the last attempt; every earlier attempt was
        # LOST (killed while staged or running, or finished before COMPLETE was recorded).
        assert logged[task.id] == [
            *((n, S.LOST) for n in range(task.attempt)),
            (task.attempt, S.COMPLETE),
        ], task.id
    # Re-runs of tasks whose COMPLETE the store never got (killed in between): allowed.
    reruns = len(executed) - TASKS
    print(f"seed {seed}: {kills} kills in {runs} runs, {reruns} legitimate re-runs")
