"""Run a few real commands on this machine and print what each one used."""

from __future__ import annotations

import anyio

from packsched import GiB, MiB, Resources, Scheduler, TaskSpec
from packsched.cluster import LocalCluster


async def main() -> None:
    async with Scheduler(LocalCluster()) as sched:
        tasks = await sched.submit(
            TaskSpec(command=["sleep", "0.5"], resources=Resources(cpu=0.5, mem=64 * MiB)),
            TaskSpec(
                command=["python3", "-c", "b = bytearray(100 << 20)"],
                resources=Resources(cpu=1, mem=1 * GiB),
            ),
            TaskSpec(
                command=["sh", "-c", "echo hello; exit 3"],
                resources=Resources(cpu=0.1, mem=16 * MiB),
            ),
        )
        for t in tasks:
            t = await sched.wait(t.id)
            stats = t.result.output.runtime_statistics if t.result else None
            print(
                f"{' '.join(t.spec.command):42} {t.state:9} exit={t.result.exit_code if t.result else None}",
                end=" ",
            )
            if stats:
                print(
                    f"{stats.duration:.2f}s cpu={stats.cpu_time:.2f}s peak_mem={stats.memory / MiB:.0f}MiB"
                )


if __name__ == "__main__":
    anyio.run(main)
