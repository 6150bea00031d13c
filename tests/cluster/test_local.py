"""Tests of LocalCluster: this machine's shape, slicing it, and real runs through a Scheduler."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import psutil
import pytest

from packsched import Resources, Scheduler, SchedulerConfig, TaskSpec, TaskState
from packsched.alloc.local import ExecutorConfig, LocalAlloc
from packsched.cluster.local import LocalCluster, count_gpus, default_reserve_mem
from packsched.errors import AllocationError
from packsched.resources import GiB, MiB, Requirements
from packsched.task import Task, new_task_id
from packsched.testing import error_codes, wait_until

from ..conftest import hosted

FAST = SchedulerConfig(
    drain_timeout=0.01,
    keepalive_interval=0.05,
    keepalive_timeout=1.0,
    min_alloc=Resources(),
)


def processes_of(task_id: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment names the task."""
    found = []
    for p in psutil.process_iter():
        try:
            ours = p.environ().get("PACKSCHED_TASK_ID") == task_id
            if ours and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def listdir(path: Path) -> list[str]:
    """The names in a directory."""
    return os.listdir(path)


def small(tmp_path: Path) -> LocalCluster:
    """A LocalCluster that pretends the machine has 4 cores and 4 GiB."""
    return LocalCluster(work_root=tmp_path, capacity=Resources(cpu=4, mem=4 * GiB, disk=1 * GiB))


def test_shape_is_this_machine(tmp_path: Path) -> None:
    """The one shape has this machine's cores, memory less the reserve and free disk."""
    cluster = LocalCluster(work_root=tmp_path / "not-yet", reserve_mem=512 * MiB)
    [shape] = cluster.shapes()
    res = shape.resources
    assert res.cpu == len(os.sched_getaffinity(0))
    assert res.mem == psutil.virtual_memory().total - 512 * MiB
    assert res.disk > 0
    assert res.gpu >= 0
    assert cluster.max_alloc() == res


def test_default_reserve_is_bounded() -> None:
    """The default reserve is a tenth of memory, at most 2 GiB."""
    assert default_reserve_mem(8 * GiB) == 8 * GiB // 10
    assert default_reserve_mem(512 * GiB) == 2 * GiB


def test_negative_reserve_is_refused(tmp_path: Path) -> None:
    """A negative memory reserve is refused, naming the setting."""
    with pytest.raises(ValueError, match="reserve_mem"):
        LocalCluster(work_root=tmp_path, reserve_mem=-1)


def test_can_allocate_knows_the_machine(tmp_path: Path) -> None:
    """can_allocate is true up to the machine's size and false beyond it."""
    cluster = small(tmp_path)
    assert cluster.can_allocate(Resources(cpu=4, mem=4 * GiB))
    assert not cluster.can_allocate(Resources(cpu=5))
    assert not cluster.can_allocate(Resources(gpu=1))


async def test_allocate_grants_up_to_full_clipped_to_free(tmp_path: Path) -> None:
    """A grant holds at least min, up to min*(1+width), clipped to what is unallocated."""
    cluster = small(tmp_path)
    a = await cluster.allocate(Requirements(min=Resources(cpu=1, mem=1 * GiB), width=1), {"x": "y"})
    assert a.resources == Resources(cpu=2, mem=2 * GiB)
    assert a.labels == {"x": "y", "provider": "local"}
    assert a.id.startswith("local-")
    b = await cluster.allocate(Requirements(min=Resources(cpu=1, mem=1 * GiB), width=9), {})
    assert b.resources == Resources(cpu=2, mem=2 * GiB)
    assert a.id != b.id
    assert cluster.available() == Resources(disk=1 * GiB)  # nobody asked for disk
    await a.free()
    assert cluster.available() == Resources(cpu=2, mem=2 * GiB, disk=1 * GiB)


async def test_allocate_waits_for_room_and_cancel_abandons(tmp_path: Path) -> None:
    """A request that does not fit waits until an alloc is freed; a cancelled wait takes nothing."""
    cluster = small(tmp_path)
    first = await cluster.allocate(Requirements(min=Resources(cpu=3)), {})
    with anyio.move_on_after(0.05) as scope:
        await cluster.allocate(Requirements(min=Resources(cpu=2)), {})
    assert scope.cancelled_caught
    assert len(cluster.allocs()) == 1

    granted: list[LocalAlloc] = []

    async def request() -> None:
        alloc = await cluster.allocate(Requirements(min=Resources(cpu=2)), {})
        assert isinstance(alloc, LocalAlloc)
        granted.append(alloc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(request)
        await wait_until(lambda: cluster.waiting() == 1)
        assert granted == []
        await first.free()
    assert granted[0].resources.cpu == 2


async def test_too_large_a_request_is_refused(tmp_path: Path) -> None:
    """A request larger than the machine fails at once, naming what is too much."""
    cluster = small(tmp_path)
    with pytest.raises(AllocationError, match=r"too much mem"):
        await cluster.allocate(Requirements(min=Resources(mem=8 * GiB)), {})


async def test_aclose_frees_what_is_left(tmp_path: Path) -> None:
    """aclose frees allocs the scheduler did not."""
    cluster = small(tmp_path)
    await cluster.allocate(Requirements(min=Resources(cpu=1)), {})
    await cluster.aclose()
    assert cluster.allocs() == []
    assert cluster.available().cpu == 4


# -- end to end through the Scheduler ------------------------------------------------------


async def test_200_short_commands_all_complete(tmp_path: Path) -> None:
    """200 short real commands on LocalCluster all COMPLETE with statistics."""
    cluster = LocalCluster(work_root=tmp_path, executor=ExecutorConfig(kill_grace=0.5))
    specs = [
        TaskSpec(command=["sh", "-c", f"echo {i}"], resources=Resources(cpu=0.1, mem=16 * MiB))
        for i in range(200)
    ]
    async for sched in hosted(Scheduler(cluster, config=FAST)):
        tasks = await sched.submit(*specs)
        done = await sched.wait_many([t.id for t in tasks], timeout=120)
        assert [t.state for t in done] == [TaskState.COMPLETE] * 200
        for i, t in enumerate(sorted(done, key=lambda t: int(t.spec.command[2].split()[1]))):
            assert t.result is not None
            assert t.result.stdout_tail == f"{i}\n"
            assert t.result.output.runtime_statistics is not None
            assert t.result.output.runtime_statistics.duration > 0
    assert listdir(tmp_path) == []  # completed attempts leave no work dirs


async def test_task_larger_than_this_machine_is_unschedulable(tmp_path: Path) -> None:
    """A task needing more than this machine settles as ERROR unschedulable."""
    cluster = LocalCluster(work_root=tmp_path)
    too_big = Resources(cpu=cluster.capacity.cpu + 1)
    async for sched in hosted(Scheduler(cluster, config=FAST)):
        [t] = await sched.submit(TaskSpec(command=["true"], resources=too_big))
        t = await sched.wait(t.id, timeout=10)
        assert t.state is TaskState.ERROR
        assert error_codes(t) == ["unschedulable"]


async def test_failures_and_kill_through_the_scheduler(tmp_path: Path) -> None:
    """Exit 7, a missing program and a timeout settle with their codes; a kill ends the tree."""
    cluster = LocalCluster(work_root=tmp_path, executor=ExecutorConfig(kill_grace=0.5))
    res = Resources(cpu=0.5, mem=64 * MiB)
    async for sched in hosted(Scheduler(cluster, config=FAST)):
        exit7, missing, slow, victim = await sched.submit(
            TaskSpec(command=["sh", "-c", "exit 7"], resources=res),
            TaskSpec(command=["/no/such/program"], resources=res),
            TaskSpec(command=["sleep", "30"], resources=res, timeout=0.3),
            TaskSpec(command=["sh", "-c", "sleep 60 & sleep 60"], resources=res),
        )
        for task, code in ((exit7, "exit-status"), (missing, "spawn-failed"), (slow, "timeout")):
            settled = await sched.wait(task.id, timeout=30)
            assert settled.state is TaskState.ERROR
            assert error_codes(settled) == [code]
        await kill_and_check(sched, victim.id)


async def kill_and_check(sched: Scheduler, task_id: str) -> None:
    """Kill a running task whose tree has 3 processes, and see that none is left."""
    await sched.wait(task_id, TaskState.RUNNING, timeout=30)
    await wait_until(lambda: len(processes_of(task_id)) >= 3)
    await sched.kill(task_id)
    killed = await sched.wait(task_id, timeout=30)
    assert killed.state is TaskState.KILLED
    assert error_codes(killed) == ["killed"]
    await wait_until(lambda: processes_of(task_id) == [])


def test_gpus_are_counted_with_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NVML, `nvidia-smi -L` lines are counted; a failing nvidia-smi means none."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\n[ "$1" = -L ] || exit 2\n'
        "echo 'GPU 0: Tesla T4 (UUID: GPU-1)'\necho 'GPU 1: Tesla T4 (UUID: GPU-2)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert count_gpus() == 2
    smi.write_text("#!/bin/sh\nexit 9\n")
    assert count_gpus() == 0


async def test_gpu_allocs_get_their_own_devices(tmp_path: Path) -> None:
    """Each alloc gets distinct GPU ids, visible to its tasks as CUDA_VISIBLE_DEVICES."""
    cluster = LocalCluster(work_root=tmp_path, capacity=Resources(cpu=4, mem=4 * GiB, gpu=3))
    a = await cluster.allocate(Requirements(min=Resources(cpu=1, gpu=2)), {})
    b = await cluster.allocate(Requirements(min=Resources(cpu=1, gpu=1)), {})
    assert isinstance(a, LocalAlloc) and isinstance(b, LocalAlloc)
    assert (a.gpu_ids, b.gpu_ids) == ([0, 1], [2])
    task = Task(
        id=new_task_id(),
        spec=TaskSpec(command=["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]),
        state=TaskState.RUNNING,
    )
    result = await a.run(task, lambda: None)
    assert result.stdout_tail == "0,1\n"
    await a.free()
    c = await cluster.allocate(Requirements(min=Resources(gpu=2)), {})
    assert isinstance(c, LocalAlloc)
    assert c.gpu_ids == [0, 1]
