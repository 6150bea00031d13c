"""The crash test: a real scheduler process on a SQLite store, SIGKILLed again and again.

Nothing accepted is lost, and nothing whose completion was recorded runs again. A task that
finished on the cluster but was killed before the store recorded COMPLETE legitimately runs
again as a new attempt (its completion was never recorded); the checks below tell the two
apart with the executions the child logs on the cluster side.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import anyio
import pytest

from packsched.store import HistoryQuery, SQLiteStore
from packsched.task import TaskState

CHILD = Path(__file__).with_name("crash_child.py")
TASKS = 5000
KILLS = 12
S = TaskState


class Child:
    """One run of the child process, its output captured in a file."""

    def __init__(self, workdir: Path, run: int) -> None:
        self.store = workdir / "store.db"
        self.executions = workdir / "executions.txt"
        self.output = workdir / f"child-{run}.out"

    async def run(self, kill_after: float | None, *, timeout: float = 60) -> bool:
        """Run the child; SIGKILL it after `kill_after` seconds. True if it was killed."""
        command = [sys.executable, str(CHILD), str(self.store), str(self.executions), str(TASKS)]
        with self.output.open("wb") as out:
            process = await anyio.open_process(command, stdout=out, stderr=subprocess.STDOUT)
            async with process:
                with anyio.move_on_after(kill_after if kill_after is not None else timeout):
                    await process.wait()
                killed = process.returncode is None
                if killed:
                    process.kill()  # SIGKILL: no cleanup of any kind runs in the child
                    await process.wait()
        if not killed:
            assert process.returncode == 0, self.output.read_text()
        return killed and kill_after is not None

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
        # From spawn: the kill lands in start-up, resume, the submits or the run, at random.
        if await child.run(kill_after=rng.uniform(0.2, 1.5)):
            kills += 1
        accepted = child.accepted()
        missing = {f"task-{i}" for i in range(accepted)} - await stored_keys(child.store)
        assert not missing, f"accepted tasks lost after a kill (seed {seed}): {sorted(missing)[:5]}"

    final = Child(tmp_path, runs + 1)
    assert not await final.run(kill_after=None)
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
    reruns = len(executed) - TASKS
    print(f"seed {seed}: {kills} kills in {runs} runs, {reruns} legitimate re-runs")
