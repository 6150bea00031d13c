"""Run a few real commands on this machine and print what each one used."""

from __future__ import annotations

import anyio

from packsched import GiB, MiB, Resources, Scheduler, TaskSpec
from packsched.cluster import LocalCluster


async def main() -> None:
    async with Scheduler(LocalCluster()) as sched:  # durable: store=SQLiteStore("packsched.db")
        tasks = await sched.submit(
            TaskSpec(command=["sleep", "0.5"], resources=Resources(cpu=0.5, mem=64 * MiB)),
            TaskSpec(
                command=["python3", "-c", "b = bytearray(100 << 20)"],
                resources=Resources(cpu=1, mem=1 * GiB),
            ),
            TaskSpec(command=["sh", "-c", "echo hi; exit 3"], resources=Resources(cpu=0.1)),
        )
        for t in tasks:
            t = await sched.wait(t.id)  # settled: complete, error, failed, killed, skipped
            assert t.result is not None
            s = t.result.output.runtime_statistics
            used = (
                f"{s.duration:.2f}s cpu={s.cpu_time:.2f}s peak={s.memory / MiB:.0f}MiB" if s else ""
            )
            print(f"{' '.join(t.spec.command):36} {t.state:8} exit={t.result.exit_code} {used}")


if __name__ == "__main__":
    anyio.run(main)
