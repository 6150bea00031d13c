"""Tests of the Prometheus export, parsed with prometheus_client's own parser."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from packsched import GiB, Resources, Scheduler, SchedulerConfig, TaskSpec, TaskState
from packsched.stats.prometheus import (
    PackschedCollector,
    metrics_app,
    render_metrics,
    start_metrics_server,
)
from packsched.stats.recorder import StatsRecorder
from packsched.stats.snapshot import AllocStats, StatsSnapshot, TaskStats
from packsched.task import RuntimeStatistics
from packsched.testing import ManualCluster, wait_until

from ..conftest import hosted

NAME = re.compile(r"^packsched_[a-z][a-z0-9_]*$")


def parse(text: bytes | str) -> dict[str, list[Sample]]:
    """Samples by family name, as Prometheus's own parser reads the exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample_names(text: bytes) -> list[str]:
    return [s.name for samples in parse(text).values() for s in samples]


def alloc(id: str, *, dead: bool = False, used_cpu: float = 1) -> AllocStats:
    res = Resources(cpu=4, mem=8 * GiB)
    return AllocStats(
        id=id,
        resources=res,
        available=res - Resources(cpu=used_cpu, mem=2 * GiB),
        dead=dead,
        task_ids=["a" * 16],
        labels={},
        created_at=100.0,
        idle_since=None,
    )


def snapshot(allocs: list[AllocStats]) -> StatsSnapshot:
    rec = StatsRecorder()
    rec.task_submitted(3)
    rec.task_finished("complete", 0.5, 2.0)
    rec.task_lost()
    rec.alloc_requested()
    rec.alloc_started()
    return StatsSnapshot(
        taken_at=160.0,
        total_allocs=len(allocs),
        total_tasks=3,
        tasks_by_state={TaskState.RUNNING: 1, TaskState.COMPLETE: 1, TaskState.WAITING: 1},
        allocs=allocs,
        tasks=[
            TaskStats(
                id="b" * 16,
                name="align",
                kind="align",
                state=TaskState.COMPLETE,
                attempt=0,
                alloc_id="x",
                priority=0,
                runtime_statistics=RuntimeStatistics(duration=2.0, memory=5 * 1024**2),
            )
        ],
        pending_alloc_requests=1,
        pending_alloc_resources=Resources(cpu=2, mem=1 * GiB),
        counters=rec.counters(),
    )


def test_names_follow_the_conventions() -> None:
    """Every family has the prefix; counters end in _total; units are base units."""
    text = render_metrics(snapshot([alloc("live-1")]), per_task=True)
    families = list(text_string_to_metric_families(text.decode()))
    assert families
    for family in families:
        assert NAME.match(family.name), family.name
        assert not re.search(r"_(milliseconds|ms|kilobytes|mib|percent)\b", family.name)
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        else:
            assert not family.name.endswith("_total")


def test_values_come_from_the_snapshot() -> None:
    """Counters, gauges, histograms and per-alloc ratios carry the snapshot's numbers."""
    m = parse(render_metrics(snapshot([alloc("live-1", used_cpu=1), alloc("live-2", used_cpu=3)])))
    by_state = {s.labels["state"]: s.value for s in m["packsched_tasks"]}
    assert by_state["running"] == 1 and by_state["hold"] == 0 and len(by_state) == len(TaskState)
    assert m["packsched_tasks_submitted"][0].value == 3
    finished = {s.labels["outcome"]: s.value for s in m["packsched_tasks_finished"]}
    assert finished["complete"] == 1 and finished["error"] == 0
    assert m["packsched_tasks_lost"][0].value == 1
    run = {
        s.labels.get("le"): s.value
        for s in m["packsched_task_run_seconds"]
        if s.name.endswith("_bucket")
    }
    assert run["1.0"] == 0 and run["2.5"] == 1 and run["+Inf"] == 1
    assert m["packsched_alloc_requests_pending"][0].value == 1
    cap = {
        (s.labels["alloc"], s.labels["resource"]): s.value for s in m["packsched_alloc_capacity"]
    }
    assert cap[("live-1", "mem")] == 8 * GiB
    util = {
        (s.labels["alloc"], s.labels["resource"]): s.value
        for s in m["packsched_alloc_utilisation_ratio"]
    }
    assert util[("live-1", "cpu")] == 0.25 and util[("live-2", "cpu")] == 0.75
    assert ("live-1", "gpu") not in util  # no capacity, no ratio
    eff = {s.labels["resource"]: s.value for s in m["packsched_packing_efficiency_ratio"]}
    assert eff["cpu"] == 0.5 and eff["mem"] == 0.25
    assert {s.labels["alloc"]: s.value for s in m["packsched_alloc_age_seconds"]}["live-1"] == 60


def test_dead_allocs_have_no_series() -> None:
    """A dead alloc is counted but leaves no per-alloc series."""
    text = render_metrics(snapshot([alloc("live-1"), alloc("dead-1", dead=True)]))
    assert b"dead-1" not in text
    m = parse(text)
    states = {s.labels["state"]: s.value for s in m["packsched_allocs"]}
    assert states == {"live": 1, "dead": 1}


def test_per_task_series_only_behind_the_flag() -> None:
    """Per-task series appear only when asked for."""
    snap = snapshot([alloc("live-1")])
    assert "packsched_task_memory_peak_bytes" not in parse(render_metrics(snap))
    m = parse(render_metrics(snap, per_task=True))
    [mem] = m["packsched_task_memory_peak_bytes"]
    assert mem.labels == {"task": "b" * 16, "name": "align", "kind": "align"}
    assert mem.value == 5 * 1024**2


def test_snapshot_without_tasks_is_asked_for_when_per_task_is_off() -> None:
    """A snapshot function taking include_tasks is asked for task rows only when exported."""
    calls: list[bool] = []
    snap = snapshot([alloc("live-1")])

    def stats(*, include_tasks: bool = True) -> StatsSnapshot:
        calls.append(include_tasks)
        return snap

    PackschedCollector(stats).collect()
    PackschedCollector(stats, per_task=True).collect()
    PackschedCollector(lambda: snap).collect()
    assert calls == [False, True]


FAST = SchedulerConfig(
    drain_timeout=0.01,
    keepalive_interval=0.02,
    keepalive_timeout=0.5,
    min_alloc=Resources(),
)


@pytest.fixture
async def sched() -> AsyncIterator[tuple[Scheduler, ManualCluster]]:
    cluster = ManualCluster(max_alloc=Resources(cpu=8, mem=16 * GiB))
    async for s in hosted(Scheduler(cluster, config=FAST)):
        yield s, cluster


async def test_scrape_after_an_alloc_dies_has_none_of_its_series(
    sched: tuple[Scheduler, ManualCluster],
) -> None:
    """Scraping a real scheduler over the ASGI app: a dead alloc's series are gone."""
    scheduler, cluster = sched
    app = metrics_app(scheduler.stats)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        [t] = await scheduler.submit(
            TaskSpec(command=["true"], resources=Resources(cpu=1, mem=1 * GiB), max_lost=3)
        )
        req = await cluster.next_request()
        doomed = req.grant(Resources(cpu=2, mem=2 * GiB))
        await scheduler.wait(t.id, TaskState.RUNNING)
        before = await client.get("/metrics")
        assert before.status_code == 200
        assert before.headers["content-type"].startswith("text/plain")
        assert doomed.id in before.text
        alloc_ids = {s.labels.get("alloc") for s in parse(before.text)["packsched_alloc_capacity"]}
        assert alloc_ids == {doomed.id}

        doomed.fail()
        await wait_until(lambda: scheduler.stats().counters.lost == 1)
        after = await client.get("/metrics")
        assert doomed.id not in after.text
        m = parse(after.text)
        assert m["packsched_allocs_dead"][0].value == 1
        assert m["packsched_tasks_lost"][0].value == 1
        for name in sample_names(after.content):
            assert NAME.match(name)


async def test_asgi_app_serves_exactly_metrics(sched: tuple[Scheduler, ManualCluster]) -> None:
    """Only /metrics is served: other paths are 404 without a redirect; POST is 405; HEAD is empty."""
    scheduler, _ = sched
    transport = httpx.ASGITransport(app=metrics_app(scheduler.stats))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/metrics/")).status_code == 404
        assert (await client.get("/")).status_code == 404
        post = await client.post("/metrics")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
        head = await client.head("/metrics")
        assert head.status_code == 200 and head.content == b""


async def test_metrics_server_over_real_http(sched: tuple[Scheduler, ManualCluster]) -> None:
    """start_metrics_server serves the scheduler's metrics over real HTTP on loopback."""
    scheduler, _ = sched
    with start_metrics_server(0, scheduler.stats) as server:
        assert server.host == "127.0.0.1"
        async with httpx.AsyncClient() as client:
            ok = await client.get(server.url)
            missing = await client.get(server.url.replace("/metrics", "/other"))
    assert ok.status_code == 200
    assert parse(ok.text)["packsched_tasks_submitted"][0].value == 0
    assert missing.status_code == 404


def test_metrics_server_outside_an_event_loop() -> None:
    """Outside an event loop the snapshot function is called from the server thread."""
    snap = snapshot([alloc("live-1")])
    with start_metrics_server(0, lambda: snap) as server:
        response = httpx.get(server.url)
    assert response.status_code == 200
    assert "live-1" in response.text
