"""The scheduler end to end against ManualCluster: the test plays the cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import pytest

from packsched import (
    AllocShape,
    GiB,
    InvalidSpecError,
    InvalidTransition,
    Resources,
    Scheduler,
    SchedulerConfig,
    TaskNotFoundError,
    TaskSpec,
    TaskState,
    packing,
)
from packsched.cluster import SimCluster
from packsched.testing import ManualCluster, error_codes, wait_until

from .conftest import hosted

S = TaskState
FAST = SchedulerConfig(
    drain_timeout=0.01,
    keepalive_interval=0.02,
    keepalive_timeout=0.5,
    alloc_retry_initial=0.01,
    alloc_retry_max=0.05,
    min_alloc=Resources(),
)


def spec(cpu: float = 1, mem: int = 1 * GiB, **kw: object) -> TaskSpec:
    return TaskSpec(command=["true"], resources=Resources(cpu=cpu, mem=mem), **kw)  # type: ignore[arg-type]


@pytest.fixture
def cluster() -> ManualCluster:
    return ManualCluster(max_alloc=Resources(cpu=64, mem=256 * GiB, disk=1024 * GiB, gpu=8))


@pytest.fixture
async def sched(cluster: ManualCluster) -> AsyncIterator[Scheduler]:
    async for s in hosted(Scheduler(cluster, config=FAST)):
        yield s


async def test_one_task_end_to_end(cluster: ManualCluster, sched: Scheduler) -> None:
    """One task: a request, a grant, a run, a completion, with stats before and after."""
    [t] = await sched.submit(spec(cpu=2, mem=4 * GiB))
    assert t.state is S.WAITING and t.attempt == 0
    req = await cluster.next_request()
    assert Resources(cpu=2, mem=4 * GiB).fits_in(req.requirements.min)
    before = sched.stats()
    assert before.total_allocs == 0 and before.pending_alloc_requests == 1
    assert before.tasks_by_state[S.WAITING] == 1
    alloc = req.grant(Resources(cpu=2, mem=4 * GiB))
    t = await sched.wait(t.id, S.RUNNING)
    assert t.state is S.RUNNING and t.alloc_id == alloc.id
    during = sched.stats()
    assert during.total_allocs == 1
    [a] = during.live_allocs()
    assert a.task_ids == [t.id] and a.available == Resources()
    alloc.complete(t.id, exit_code=0)
    t = await sched.wait(t.id)
    assert t.state is S.COMPLETE and t.result is not None and t.result.exit_code == 0
    after = sched.stats()
    assert after.tasks_by_state[S.COMPLETE] == 1 and after.live_allocs()[0].task_ids == []
    assert t.started_at is not None and t.finished_at is not None


async def test_mixed_priorities_share_one_alloc(cluster: ManualCluster, sched: Scheduler) -> None:
    """Four tasks on one {30 cpu, 30 GiB} alloc: priority 0 first, never oversubscribed, room used."""
    low = await sched.submit(spec(cpu=20, mem=20 * GiB, priority=5))
    high = await sched.submit(spec(cpu=20, mem=20 * GiB, priority=0))
    small = await sched.submit(
        spec(cpu=5, mem=5 * GiB, priority=3), spec(cpu=5, mem=5 * GiB, priority=9)
    )
    req = await cluster.next_request()
    alloc = req.grant(Resources(cpu=30, mem=30 * GiB))
    running = await alloc.wait_running(3)
    assert high[0].id in running and low[0].id not in running
    assert {t.id for t in small} <= set(running)
    [a] = sched.stats().live_allocs()
    assert a.available == Resources()  # 20 + 5 + 5 fills it exactly
    for task_id in running:
        alloc.complete(task_id)
    await wait_until(lambda: low[0].id in alloc.task_ids)
    alloc.complete(low[0].id)
    for t in [*low, *high, *small]:
        assert (await sched.wait(t.id)).state is S.COMPLETE


async def test_task_larger_than_any_alloc_is_unschedulable(
    cluster: ManualCluster, sched: Scheduler
) -> None:
    """A task no alloc can hold settles at once as ERROR unschedulable, naming the resource."""
    [t] = await sched.submit(spec(cpu=128))
    t = await sched.wait(t.id)
    assert t.state is S.ERROR and error_codes(t) == ["unschedulable"]
    assert t.error is not None and "cpu=128" in t.error.message and "cpu=64" in t.error.message
    assert cluster.requests == []


async def test_failed_keepalive_reschedules_on_new_alloc(
    cluster: ManualCluster, sched: Scheduler
) -> None:
    """A failed keepalive: its task is attempt 1 on a new alloc; tasks elsewhere are untouched."""
    [a_task] = await sched.submit(spec(cpu=40, mem=1 * GiB))
    first = (await cluster.next_request()).grant(Resources(cpu=40, mem=1 * GiB))
    await first.wait_running(1)
    [b_task] = await sched.submit(spec(cpu=40, mem=1 * GiB))
    second = (await cluster.next_request()).grant(Resources(cpu=40, mem=1 * GiB))
    await second.wait_running(1)
    first.fail()
    third = (await cluster.next_request()).grant(Resources(cpu=40, mem=1 * GiB))
    await third.wait_running(1)
    moved = sched.get(a_task.id)
    assert moved.attempt == 1 and moved.alloc_id == third.id and moved.lost_count == 1
    assert sched.get(b_task.id).state is S.RUNNING and sched.get(b_task.id).attempt == 0
    assert first.freed
    dead = [a for a in sched.stats().allocs if a.id == first.id]
    assert dead and dead[0].dead
    third.complete(a_task.id)
    second.complete(b_task.id)
    assert (await sched.wait(a_task.id)).state is S.COMPLETE


async def test_repeated_loss_fails_after_max_lost(cluster: ManualCluster, sched: Scheduler) -> None:
    """The max_lost-th loss makes the task FAILED with code lost."""
    [t] = await sched.submit(spec(max_lost=2))
    for _ in range(2):
        alloc = (await cluster.next_request()).grant()
        await alloc.wait_running(1)
        alloc.fail()
    t = await sched.wait(t.id)
    assert t.state is S.FAILED and error_codes(t) == ["lost"] and t.lost_count == 2
    assert t.error is not None and "max_lost" in t.error.message


async def test_batch_gets_one_request(cluster: ManualCluster, sched: Scheduler) -> None:
    """Four tasks submitted together: one request sized for all, and no second while it pends."""
    four = await sched.submit(*[spec(cpu=2, mem=2 * GiB) for _ in range(4)])
    req = await cluster.next_request()
    assert Resources(cpu=8, mem=8 * GiB).fits_in(req.requirements.min)
    # Events while the request pends, each followed by a placement pass.
    [held] = await sched.submit(spec(hold=True))
    await sched.set_priority(four[0].id, -1)
    await sched.kill(held.id)
    with pytest.raises(TimeoutError):
        await cluster.next_request(timeout=0.2)
    alloc = req.grant(Resources(cpu=8, mem=8 * GiB))
    await alloc.wait_running(4)


async def test_mixed_shapes_both_run(sched: Scheduler, cluster: ManualCluster) -> None:
    """A 64-cpu/1-GiB task and a 1-cpu/256-GiB task on a 64/256 cluster both run."""
    wide = await sched.submit(spec(cpu=64, mem=1 * GiB))
    tall = await sched.submit(spec(cpu=1, mem=256 * GiB))
    granted = []
    for _ in range(2):
        req = await cluster.next_request()
        assert req.requirements.min.fits_in(
            Resources(cpu=64, mem=256 * GiB, disk=1024 * GiB, gpu=8)
        )
        granted.append(req.grant())
    for alloc in granted:
        [task_id] = await alloc.wait_running(1)
        alloc.complete(task_id)
    assert (await sched.wait(wide[0].id)).state is S.COMPLETE
    assert (await sched.wait(tall[0].id)).state is S.COMPLETE


async def test_hold_release_kill_and_illegal_control(
    cluster: ManualCluster, sched: Scheduler
) -> None:
    """hold keeps a task back, release lets it run, kill ends it, an illegal control names both states."""
    [t] = await sched.submit(spec(hold=True))
    assert t.state is S.HOLD
    with pytest.raises(TimeoutError):
        await cluster.next_request(timeout=0.1)
    t = await sched.release(t.id)
    assert t.state is S.WAITING
    alloc = (await cluster.next_request()).grant()
    await alloc.wait_running(1)
    with pytest.raises(InvalidTransition) as info:
        await sched.hold(t.id)
    assert "running" in str(info.value) and "hold" in str(info.value)
    t = await sched.kill(t.id)
    assert t.state is S.KILLED and error_codes(t) == ["killed"]
    assert alloc.task_ids == []
    with pytest.raises(InvalidTransition, match="killed -> waiting"):
        await sched.retry(t.id)
    [w] = await sched.submit(spec(hold=True))
    assert (await sched.kill(w.id)).state is S.KILLED


async def test_nonzero_exit_then_retry_completes(cluster: ManualCluster, sched: Scheduler) -> None:
    """Exit 3 settles ERROR exit-status; retry runs attempt 1, which completes."""
    [t] = await sched.submit(spec())
    alloc = (await cluster.next_request()).grant()
    await alloc.wait_running(1)
    alloc.complete(t.id, exit_code=3)
    t = await sched.wait(t.id)
    assert t.state is S.ERROR and error_codes(t) == ["exit-status"] and t.result is not None
    assert t.result.exit_code == 3
    t = await sched.retry(t.id)
    assert t.state is S.WAITING and t.attempt == 1
    await wait_until(lambda: t.id in alloc.task_ids)
    alloc.complete(t.id)
    t = await sched.wait(t.id)
    assert t.state is S.COMPLETE and t.attempt == 1


async def test_auto_retry_uses_retries(cluster: ManualCluster, sched: Scheduler) -> None:
    """retries=1: the first failure is retried automatically, the second one settles ERROR."""
    [t] = await sched.submit(spec(retries=1))
    alloc = (await cluster.next_request()).grant()
    for attempt in range(2):
        await wait_until(
            lambda n=attempt: t.id in alloc.task_ids and sched.get(t.id).attempt == n  # type: ignore[misc]
        )
        alloc.complete(t.id, exit_code=1)
    t = await sched.wait(t.id)
    assert t.state is S.ERROR and t.attempt == 1 and t.retries_used == 1


async def test_killed_dependency_skips_dependent(cluster: ManualCluster, sched: Scheduler) -> None:
    """A dependency killed makes its dependents SKIPPED with a reason naming it."""
    [first] = await sched.submit(spec(hold=True))
    [second] = await sched.submit(spec(after=[first.id]))
    [third] = await sched.submit(spec(after=[second.id]))
    await sched.kill(first.id)
    second = await sched.wait(second.id)
    assert second.state is S.SKIPPED and second.result is not None
    assert (
        second.result.output.skip_reason is not None
        and first.id in second.result.output.skip_reason
    )
    assert (await sched.wait(third.id)).state is S.SKIPPED
    assert error_codes(second) == ["dependency-failed"]


async def test_dependency_waits_for_completion(cluster: ManualCluster, sched: Scheduler) -> None:
    """A task with `after` is not placed until its dependency COMPLETEs."""
    [first] = await sched.submit(spec(cpu=1))
    [second] = await sched.submit(spec(cpu=1, after=[first.id]))
    alloc = (await cluster.next_request()).grant(Resources(cpu=2, mem=2 * GiB))
    await alloc.wait_running(1)
    assert alloc.task_ids == [first.id] and sched.get(second.id).state is S.WAITING
    alloc.complete(first.id)
    await wait_until(lambda: alloc.task_ids == [second.id])


async def test_unknown_dependency_is_rejected(sched: Scheduler) -> None:
    """An `after` id that does not exist rejects the whole batch, naming the path."""
    with pytest.raises(InvalidSpecError) as info:
        await sched.submit(spec(), spec(after=["0123456789abcdef"]))
    assert info.value.path == "$[1].after[0]"
    assert sched.stats().total_tasks == 0


async def test_idle_alloc_is_freed_and_shown_dead(cluster: ManualCluster) -> None:
    """An alloc idle for max_alloc_idle_time is freed and the stats show it dead."""
    config = SchedulerConfig(
        drain_timeout=0.01, keepalive_interval=0.02, max_alloc_idle_time=0.1, min_alloc=Resources()
    )
    async with Scheduler(cluster, config=config) as sched:
        [t] = await sched.submit(spec())
        alloc = (await cluster.next_request()).grant()
        await alloc.wait_running(1)
        alloc.complete(t.id)
        await sched.wait(t.id)
        await wait_until(lambda: alloc.freed)
        snapshot = sched.stats()
        assert snapshot.total_allocs == 0
        assert [a.dead for a in snapshot.allocs if a.id == alloc.id] == [True]


async def test_refused_allocation_is_retried_with_backoff(
    cluster: ManualCluster, sched: Scheduler
) -> None:
    """A refused request is retried, after a backoff, and the task then runs."""
    [t] = await sched.submit(spec())
    (await cluster.next_request()).refuse("no capacity")
    alloc = (await cluster.next_request()).grant()
    await alloc.wait_running(1)
    assert sched.stats().counters.alloc_requests_failed == 1
    alloc.complete(t.id)
    assert (await sched.wait(t.id)).state is S.COMPLETE


async def test_idempotent_submit_by_key(cluster: ManualCluster, sched: Scheduler) -> None:
    """Submitting the same key twice returns the first task."""
    [a] = await sched.submit(spec(key="job-1", hold=True))
    [b, c] = await sched.submit(spec(key="job-1"), spec(key="job-1"))
    assert a.id == b.id == c.id
    assert sched.stats().total_tasks == 1


async def test_set_priority_reorders_waiting(cluster: ManualCluster, sched: Scheduler) -> None:
    """Raising a waiting task's priority lets it run before one submitted earlier."""
    [blocker] = await sched.submit(spec(cpu=2))
    req = await cluster.next_request()
    [early] = await sched.submit(spec(cpu=2, priority=5))
    [late] = await sched.submit(spec(cpu=2, priority=5))
    await sched.set_priority(late.id, 1)
    alloc = req.grant(Resources(cpu=2, mem=2 * GiB))
    await alloc.wait_running(1)
    alloc.complete(blocker.id)
    await wait_until(lambda: alloc.task_ids == [late.id])
    assert sched.get(early.id).state is S.WAITING


async def test_wait_for_stage_and_timeout(cluster: ManualCluster, sched: Scheduler) -> None:
    """wait(id, STAGING) returns once staging or later; wait with a timeout raises TimeoutError."""
    [t] = await sched.submit(spec())
    with pytest.raises(TimeoutError):
        await sched.wait(t.id, timeout=0.05)
    alloc = (await cluster.next_request()).grant()
    got = await sched.wait(t.id, S.STAGING)
    assert got.state in (S.STAGING, S.RUNNING)
    alloc.complete((await alloc.wait_running(1))[0])
    done = await sched.wait_many([t.id])
    assert [d.state for d in done] == [S.COMPLETE]


async def test_leaving_kills_running_and_frees_allocs(cluster: ManualCluster) -> None:
    """Leaving `async with` kills what runs and frees every alloc."""
    async with Scheduler(cluster, config=FAST) as sched:
        [t] = await sched.submit(spec())
        alloc = (await cluster.next_request()).grant()
        await alloc.wait_running(1)
    assert alloc.freed and alloc.task_ids == []
    assert sched.get(t.id).state is S.WAITING and sched.get(t.id).lost_count == 0


async def test_error_left_alone_ages_out_to_failed(cluster: ManualCluster) -> None:
    """An ERROR task nobody retries becomes FAILED after error_max_age, keeping its error code."""
    config = msgspec.structs.replace(FAST, error_max_age=0.05)
    async with Scheduler(cluster, config=config) as sched:
        [t] = await sched.submit(spec())
        alloc = (await cluster.next_request()).grant()
        await alloc.wait_running(1)
        alloc.complete(t.id, exit_code=2)
        assert (await sched.wait(t.id)).state is S.ERROR
        await wait_until(lambda: sched.get(t.id).state is S.FAILED)
        failed = sched.get(t.id)
        assert error_codes(failed) == ["exit-status"]
        assert failed.error is not None and "given up" in failed.error.message


async def test_history_marks_new_failures_and_learns_durations(
    cluster: ManualCluster, sched: Scheduler
) -> None:
    """A kind that completed before and now fails is flagged as a new failure; its p50 is kept."""
    [ok] = await sched.submit(spec(name="align"))
    alloc = (await cluster.next_request()).grant()
    await alloc.wait_running(1)
    alloc.complete(ok.id)
    await sched.wait(ok.id)
    assert sched.kind_history("align").completed == 1
    [bad] = await sched.submit(spec(name="align"))
    await wait_until(lambda: bad.id in alloc.task_ids)
    alloc.complete(bad.id, exit_code=1)
    bad = await sched.wait(bad.id)
    assert bad.error is not None and "new failure" in bad.error.message
    assert sched.kind_history("align").failed == 1


async def test_prune_forgets_old_settled_tasks(cluster: ManualCluster, sched: Scheduler) -> None:
    """prune() deletes settled tasks from memory and store; unsettled ones and keys of kept ones stay."""
    [done] = await sched.submit(spec(key="old", hold=True))
    await sched.kill(done.id)
    [waiting] = await sched.submit(spec(hold=True))
    removed = await sched.prune(sched.clock.now() + 1)
    assert removed == 1
    with pytest.raises(TaskNotFoundError):
        sched.get(done.id)
    assert [t.id for t in sched.list_tasks()] == [waiting.id]
    [again] = await sched.submit(spec(key="old", hold=True))
    assert again.id != done.id


async def test_big_task_is_not_starved_by_small_ones_when_the_cluster_is_full() -> None:
    """When no new alloc can come, a waiting big task holds a room; small tasks behind it wait."""
    cluster = SimCluster([AllocShape(resources=Resources(cpu=2, mem=4 * GiB))], max_allocs=1)
    async with Scheduler(cluster, config=FAST) as sched:
        # The two running tasks end at different times, so each end frees one core only.
        smalls = await sched.submit(
            spec(cpu=1, mem=1 * GiB, expected_duration=0.1),
            spec(cpu=1, mem=1 * GiB, expected_duration=0.3),
        )
        await wait_until(lambda: all(sched.get(t.id).state is S.RUNNING for t in smalls))
        [big] = await sched.submit(spec(cpu=2, mem=2 * GiB, expected_duration=0.05))
        later = await sched.submit(
            *[spec(cpu=1, mem=1 * GiB, expected_duration=0.3) for _ in range(4)]
        )
        big = await sched.wait(big.id)
        assert big.state is S.COMPLETE
        assert big.started_at is not None
        for t in later:
            done = await sched.wait(t.id)
            assert done.started_at is not None and done.started_at >= big.started_at


async def test_runners_are_reused_and_a_kill_reaches_a_reused_one(
    cluster: ManualCluster, sched: Scheduler
) -> None:
    """Attempts one after another on one slot share a runner, and kill still ends the latest."""
    tasks = await sched.submit(*[spec() for _ in range(3)])
    alloc = (await cluster.next_request()).grant(Resources(cpu=1, mem=1 * GiB))
    for t in tasks[:2]:
        await alloc.wait_running(1)
        alloc.complete(t.id)
        assert (await sched.wait(t.id)).state is S.COMPLETE
    await alloc.wait_running(1)
    killed = await sched.kill(tasks[2].id)
    assert killed.state is S.KILLED and error_codes(killed) == ["killed"]
    assert alloc.task_ids == []


async def test_a_burst_leaves_a_bounded_number_of_idle_runners() -> None:
    """500 tasks started at once settle, and at most a few dozen runner tasks stay behind."""
    cluster = SimCluster([AllocShape(resources=Resources(cpu=500, mem=1000 * GiB))], max_allocs=1)
    async with Scheduler(cluster, config=FAST) as sched:
        before = len(asyncio.all_tasks())
        tasks = await sched.submit(*[spec(cpu=1, mem=1 * GiB) for _ in range(500)])
        done = await sched.wait_many([t.id for t in tasks])
        assert [t.state for t in done] == [S.COMPLETE] * 500
        # At most 64 idle runners, plus the alloc's keepalive and a timer or two.
        assert len(asyncio.all_tasks()) - before <= 64 + 4


async def test_placement_is_told_the_shapes_and_the_alloc_overhead() -> None:
    """The policy's place() hears what the cluster offers and how long an idle alloc is kept,
    so a long task can weigh a busy alloc against one of its own."""
    seen: list[tuple[tuple[AllocShape, ...], float]] = []

    class Recording:
        plan = staticmethod(packing.plan)

        def place(
            self, demands: Sequence[packing.Demand], rooms: Sequence[packing.Room], **options: Any
        ) -> packing.Placement:
            seen.append((tuple(options["shapes"]), options["alloc_overhead"]))
            return packing.place(demands, rooms, **options)

    offered = [
        AllocShape(resources=Resources(cpu=c, mem=4 * c * GiB), name=f"{c}cpu") for c in (2, 8)
    ]
    config = msgspec.structs.replace(FAST, max_alloc_idle_time=42.0)
    async with Scheduler(SimCluster(offered), config=config, policy=Recording()) as sched:
        [t] = await sched.submit(spec(cpu=1, mem=1 * GiB, expected_duration=0.01))
        assert (await sched.wait(t.id)).state is S.COMPLETE
    assert seen and all(s == (tuple(offered), 42.0) for s in seen)
