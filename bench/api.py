"""Tasks per second through the daemon's HTTP API, against the in-process Scheduler.

Run alone: `.venv/bin/python bench/api.py` starts a real `packsched serve` (SimCluster with
zero-duration tasks, SQLite store in a temporary directory) and measures, for batches of 1,000
and of 1, how fast tasks are submitted and how fast they complete (submit plus wait for all)
through `Client`. The baseline is the in-process Scheduler on the same cluster and store kind,
measured in the same run. Each figure is the median of `REPEATS` runs; the table is also
written to `bench/results/api.md`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
from _common import machine, markdown_table, ratio, text_table, write_markdown

from packsched import Resources, Scheduler, SchedulerConfig, TaskSpec, TaskState
from packsched.api import AsyncClient, Client
from packsched.cluster import SimCluster
from packsched.log import configure_logging
from packsched.store.sqlite import SQLiteStore

REPEATS = 3
TOKEN = "bench-token"
CONFIG = SchedulerConfig(drain_timeout=0.002)


def specs(n: int) -> list[TaskSpec]:
    return [TaskSpec(command=["true"], resources=Resources(cpu=0.1)) for _ in range(n)]


@contextmanager
def daemon(state: Path) -> Iterator[str]:
    """A `packsched serve` subprocess on a free port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = state / "packsched.toml"
    config.write_text(
        f'state_dir = "{state}"\n'
        f'[server]\nport = {port}\ntoken = "{TOKEN}"\nmax_batch = 1000\n'
        f'[store]\npath = "{state / "packsched.db"}"\n'
        '[cluster]\nkind = "sim"\n'
        f"[scheduler]\ndrain_timeout = {CONFIG.drain_timeout}\n"
        '[log]\nlevel = "warning"\nformat = "json"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSCHED_")}
    with (state / "daemon.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "packsched", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((state / "daemon.log").read_text()) from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


# -- one measurement: (seconds to submit all, seconds to submit and see all complete) --------

Measure = Callable[[int], tuple[float, float]]


def through_client(url: str, batch: int) -> Measure:
    def run(n: int) -> tuple[float, float]:
        with Client(url, TOKEN) as client:
            start = time.perf_counter()
            if batch == 1:
                ids = [client.submit(s).id for s in specs(n)]
            else:
                ids = [t.id for t in client.submit(specs(n))]
            submitted = time.perf_counter()
            done = client.wait(ids, timeout=600)
            finished = time.perf_counter()
        assert all(t.state is TaskState.COMPLETE for t in done)
        return submitted - start, finished - start

    return run


def through_async_clients(url: str, concurrency: int) -> Measure:
    """Batches of 1 from `concurrency` concurrent submitters on one AsyncClient."""

    def run(n: int) -> tuple[float, float]:
        async def main() -> tuple[float, float]:
            ids: list[str] = []
            async with AsyncClient(url, TOKEN) as client:
                todo = iter(specs(n))
                start = time.perf_counter()

                async def submitter() -> None:
                    for spec in todo:
                        ids.append((await client.submit(spec)).id)

                async with anyio.create_task_group() as tg:
                    for _ in range(concurrency):
                        tg.start_soon(submitter)
                submitted = time.perf_counter()
                await client.wait(ids, timeout=600)
                return submitted - start, time.perf_counter() - start

        return anyio.run(main)

    return run


def in_process(state: Path, batch: int, n: int) -> list[tuple[float, float]]:
    """REPEATS runs on one in-process Scheduler (fresh, like each scenario's daemon)."""

    async def main() -> list[tuple[float, float]]:
        path = Path(tempfile.mkdtemp(dir=state)) / "inproc.db"
        runs = []
        async with Scheduler(SimCluster(), config=CONFIG, store=SQLiteStore(path)) as sched:
            for _ in range(REPEATS):
                start = time.perf_counter()
                all_specs = specs(n)
                ids: list[str] = []
                for i in range(0, n, batch):
                    ids += [t.id for t in await sched.submit(*all_specs[i : i + batch])]
                submitted = time.perf_counter()
                await sched.wait_many(ids)
                runs.append((submitted - start, time.perf_counter() - start))
        return runs

    return anyio.run(main)


def through_daemon(
    state: Path, measure: Callable[[str], Measure], n: int
) -> list[tuple[float, float]]:
    """REPEATS runs against one fresh daemon."""
    where = Path(tempfile.mkdtemp(dir=state))
    with daemon(where) as url:
        return [measure(url)(n) for _ in range(REPEATS)]


def rates(runs: list[tuple[float, float]], n: int) -> tuple[float, float]:
    """Median submit rate and median end-to-end rate (tasks/s)."""
    return (
        n / statistics.median(r[0] for r in runs),
        n / statistics.median(r[1] for r in runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per batched run")
    parser.add_argument("--single", type=int, default=1_000, help="tasks per batch-of-1 run")
    args = parser.parse_args()
    configure_logging("warning", "json")  # the in-process runs would log every alloc
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        # Every scenario starts from an empty scheduler and keeps its tasks across its repeats,
        # in process and through the daemon alike.
        base_batched = rates(in_process(state, 1000, args.tasks), args.tasks)
        base_single = rates(in_process(state, 1, args.single), args.single)
        batched = rates(
            through_daemon(state, lambda url: through_client(url, 1000), args.tasks), args.tasks
        )
        single = rates(
            through_daemon(state, lambda url: through_client(url, 1), args.single), args.single
        )
        concurrent = rates(
            through_daemon(state, lambda url: through_async_clients(url, 16), args.single),
            args.single,
        )
    for name, n, (sub, done), base in [
        ("in-process Scheduler, batches of 1000", args.tasks, base_batched, base_batched),
        ("daemon + Client, batches of 1000", args.tasks, batched, base_batched),
        ("in-process Scheduler, batches of 1", args.single, base_single, base_single),
        ("daemon + Client, batches of 1", args.single, single, base_single),
        ("daemon + AsyncClient, batches of 1, 16 concurrent", args.single, concurrent, base_single),
    ]:
        rows.append([name, n, f"{sub:,.0f}", f"{done:,.0f}", ratio(done, base[1])])
    headers = ["path", "tasks", "submitted/s", "completed/s", "completed vs in-process"]
    table = text_table(headers, rows)
    print(
        f"Machine: {machine()}. Zero-duration SimCluster tasks, SQLite store, medians of {REPEATS}."
    )
    print(table)
    print(f"\nbatched through the daemon: {batched[1]:,.0f} tasks/s completed (target >= 5,000)")
    write_markdown(
        "api",
        "Tasks per second through the daemon",
        [
            ("", f"Zero-duration SimCluster tasks, SQLite store, medians of {REPEATS}."),
            ("", markdown_table(headers, rows)),
        ],
    )


if __name__ == "__main__":
    main()
