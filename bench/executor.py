"""Local executor benchmark: what running an attempt through packsched costs, and how well it
measures.

1. Throughput of trivial commands (`true`) at 1 and 8 at a time: bare `anyio.run_process`
   (the baseline: spawn and wait, nothing else) against `LocalExecutor.run` (work dir, own
   session, output files, psutil sampling, leftover sweep, cleanup), with the daemon's own
   CPU per attempt. Median of the repeats.
2. Measurement: commands whose use is known (a 200 MiB toucher held and one that exits at
   once, a 0.5 s sleeper, a 0.5 s CPU burner) and what the executor measured.

Run alone: `.venv/bin/python bench/executor.py [--attempts N] [--repeats R]` prints the tables
and writes them as markdown to `bench/results/executor.md`.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import anyio
from _common import markdown_table, ratio, text_table, write_markdown

from packsched.alloc.local import LocalExecutor
from packsched.resources import MiB
from packsched.task import RuntimeStatistics, Task, TaskSpec, TaskState, new_task_id

PY = sys.executable


def _task(command: list[str]) -> Task:
    return Task(id=new_task_id(), spec=TaskSpec(command=command), state=TaskState.RUNNING)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _throughput(
    attempts: int, concurrency: int, one: Callable[[], Awaitable[None]]
) -> tuple[float, float]:
    """Attempts per second and daemon CPU milliseconds per attempt."""
    limiter = anyio.CapacityLimiter(concurrency)

    async def guarded() -> None:
        async with limiter:
            await one()

    cpu0, t0 = _cpu(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(attempts):
            tg.start_soon(guarded)
    elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
    return attempts / elapsed, cpu / attempts * 1000


async def throughput_rows(attempts: int, repeats: int) -> list[list[object]]:
    executor = LocalExecutor(tempfile.mkdtemp(prefix="packsched-bench-"))

    async def bare() -> None:
        await anyio.run_process(["true"])

    async def packsched() -> None:
        result = await executor.run(_task(["true"]), lambda: None)
        assert result.exit_code == 0

    rows: list[list[object]] = []
    for concurrency in (1, 8):
        runs: dict[str, list[tuple[float, float]]] = {"bare run_process": [], "LocalExecutor": []}
        for _ in range(repeats):  # interleaved, so both see the same machine
            runs["bare run_process"].append(await _throughput(attempts, concurrency, bare))
            runs["LocalExecutor"].append(await _throughput(attempts, concurrency, packsched))
        base = statistics.median(r[0] for r in runs["bare run_process"])
        for name, results in runs.items():
            rate = statistics.median(r[0] for r in results)
            cpu = statistics.median(r[1] for r in results)
            rows.append([name, concurrency, f"{rate:.0f}", f"{cpu:.2f}", ratio(rate, base)])
    return rows


MEASURED: list[tuple[str, list[str], str]] = [
    (
        "python touching 200 MiB, held 0.3 s",
        [PY, "-c", "import time; b = b'x' * (200 * 2**20); time.sleep(0.3)"],
        "memory >= 200 MiB",
    ),
    (
        "sh -> python touching 200 MiB, exits at once",
        ["sh", "-c", f'"{PY}" -c "b = b\'x\' * (200 * 2**20)"; true'],
        "memory >= 200 MiB",
    ),
    ("sleep 0.5", ["sleep", "0.5"], "duration >= 0.5 s, memory ~1-2 MiB"),
    (
        "sh -> python burning 0.5 s CPU",
        [
            "sh",
            "-c",
            f'"{PY}" -c "import time; t = time.process_time()\nwhile time.process_time() - t < 0.5: pass"',
        ],
        "cpu_time >= 0.5 s",
    ),
]


async def measurement_rows() -> list[list[object]]:
    executor = LocalExecutor(tempfile.mkdtemp(prefix="packsched-bench-"))
    rows: list[list[object]] = []
    for name, command, expected in MEASURED:
        result = await executor.run(_task(command), lambda: None)
        stats = result.output.runtime_statistics or RuntimeStatistics()
        rows.append(
            [
                name,
                expected,
                f"{stats.duration:.3f}",
                f"{stats.cpu_time:.3f}",
                f"{stats.memory / MiB:.1f}",
            ]
        )
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--attempts", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    t_headers = ["runner", "at once", "attempts/s", "daemon CPU ms/attempt", "vs bare"]
    t_rows = await throughput_rows(args.attempts, args.repeats)
    m_headers = ["command", "truth", "duration s", "cpu_time s", "memory MiB"]
    m_rows = await measurement_rows()
    print(f"Throughput of `true` ({args.attempts} attempts, median of {args.repeats})")
    print(text_table(t_headers, t_rows))
    print()
    print("Measurement")
    print(text_table(m_headers, m_rows))
    path = write_markdown(
        "executor",
        "Local executor: cost and measurement",
        [
            (
                f"Throughput of `true` ({args.attempts} attempts, median of {args.repeats})",
                markdown_table(t_headers, t_rows),
            ),
            ("Measurement", markdown_table(m_headers, m_rows)),
        ],
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    anyio.run(main)
