"""The child process of the crash test: a Scheduler on a SQLite store with SimCluster.

Usage: python crash_child.py STORE EXECUTIONS COUNT

It submits COUNT tasks by key (so submitting again after a restart returns the tasks the
store already holds) and waits for all of them. Each simulated execution appends the line
"task_id attempt" to EXECUTIONS with one `write` before the scheduler learns of the result:
the count on the cluster's side, which survives a SIGKILL at any moment because a single
`write` to an O_APPEND file either happened or did not.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import anyio

from packsched import GiB, Resources, Scheduler, SchedulerConfig, TaskSpec
from packsched.cluster import SimCluster
from packsched.store import SQLiteStore
from packsched.task import Task

# Submitted in chunks, so that a kill can land between two submits as well as inside one.
CHUNK = 250


def spec(i: int) -> TaskSpec:
    """Task number `i`: 1 cpu for 50 to 110 ms; never failed for being lost (the test kills
    the scheduler often, and a lost task goes back to the head of the queue)."""
    return TaskSpec(
        command=["sim", str(i)],
        resources=Resources(cpu=1, mem=1 * GiB),
        name="crash",
        key=f"task-{i}",
        expected_duration=0.05 + (i % 7) * 0.01,
        max_lost=1_000_000,
    )


async def main(store_path: str, executions_path: str, count: int) -> None:
    """Run (or resume) the whole workload and report the final states."""
    fd = os.open(executions_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def executed(task: Task) -> None:
        os.write(fd, f"{task.id} {task.attempt}\n".encode())

    # Two 64-cpu allocs at most: 128 tasks at a time, so the work spans many kill moments.
    cluster = SimCluster(max_allocs=2, on_execute=executed)
    config = SchedulerConfig(drain_timeout=0.01, min_alloc=Resources())
    async with Scheduler(cluster, config=config, store=SQLiteStore(store_path)) as sched:
        print("ready", flush=True)
        ids: list[str] = []
        for start in range(0, count, CHUNK):
            tasks = await sched.submit(*(spec(i) for i in range(start, min(count, start + CHUNK))))
            ids += [t.id for t in tasks]
            # Accepted: from here on, these tasks must survive any crash.
            print(f"accepted {len(ids)}", flush=True)
        print("submitted", flush=True)
        done = await sched.wait_many(ids)
        states = Counter(t.state.value for t in done)
        print(f"finished {sorted(states.items())}", flush=True)
    os.close(fd)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
