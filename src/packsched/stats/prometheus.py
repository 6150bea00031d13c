"""Prometheus export: a collector built from a `StatsSnapshot` at every scrape.

Nothing is kept between scrapes, so an alloc that died or was freed leaves no series behind.
Names follow Prometheus conventions: prefix `packsched_`, base units (seconds, bytes, cores),
counters end in `_total`, ratios in `_ratio`. Per-alloc resource series carry a `resource`
label (`cpu` in cores, `mem` and `disk` in bytes, `gpu` in devices, `extra.<name>` as given).
Per-task series are off by default: with thousands of tasks they would swamp Prometheus.

For embedded users: `metrics_app` is an ASGI app serving `/metrics`, and `start_metrics_server`
serves it from a thread without an ASGI server.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio.from_thread
import anyio.lowlevel
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..resources import Resources
from ..task import TaskState
from .snapshot import Histogram, StatsSnapshot

__all__ = [
    "MetricsServer",
    "PackschedCollector",
    "metrics_app",
    "render_metrics",
    "start_metrics_server",
]

SnapshotFn = Callable[[], StatsSnapshot]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Outcomes are always exported (at 0 until seen) so that rate() works from the first scrape.
_OUTCOMES = ("complete", "error", "failed", "killed", "skipped")


class PackschedCollector(Collector):
    """Builds every packsched metric family from `snapshot_fn()` at each collect.

    Args:
        snapshot_fn: returns the scheduler's current snapshot (e.g. `scheduler.stats`). If it
            takes an `include_tasks` keyword, as `Scheduler.stats` does, it is asked for the
            per-task rows only when they are exported, which keeps scrapes cheap.
        per_task: also export one set of series per task (off by default).
    """

    def __init__(self, snapshot_fn: SnapshotFn, *, per_task: bool = False) -> None:
        self.snapshot_fn = _snapshot_call(snapshot_fn, per_task)
        self.per_task = per_task

    def collect(self) -> Iterator[Metric]:
        """Every metric family of one snapshot."""
        return iter(families(self.snapshot_fn(), per_task=self.per_task))

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on the snapshot (and registering must not
        take one)."""
        return []


def _snapshot_call(snapshot_fn: SnapshotFn, per_task: bool) -> SnapshotFn:
    """`snapshot_fn`, passing `include_tasks=per_task` when it takes that keyword."""
    try:
        takes = "include_tasks" in inspect.signature(snapshot_fn).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins)
        takes = False
    if not takes:
        return snapshot_fn
    with_tasks: Callable[..., StatsSnapshot] = snapshot_fn
    return functools.partial(with_tasks, include_tasks=per_task)


def families(snap: StatsSnapshot, *, per_task: bool = False) -> list[Metric]:
    """The metric families of one snapshot (see the module docstring for the conventions)."""
    out: list[Metric] = []
    c = snap.counters

    tasks = GaugeMetricFamily("packsched_tasks", "Tasks known, by state.", labels=["state"])
    for state in TaskState:
        tasks.add_metric([state.value], snap.tasks_by_state.get(state, 0))
    out.append(tasks)

    out.append(_counter("packsched_tasks_submitted", "Tasks accepted by submit.", c.submitted))
    finished = CounterMetricFamily(
        "packsched_tasks_finished", "Attempts that settled, by outcome.", labels=["outcome"]
    )
    for outcome in sorted(set(_OUTCOMES) | set(c.finished)):
        finished.add_metric([outcome], c.finished.get(outcome, 0))
    out.append(finished)
    out.append(_counter("packsched_tasks_lost", "Attempts lost with their alloc.", c.lost))
    out.append(_counter("packsched_tasks_retried", "Retries of tasks in ERROR.", c.retried))
    for name, doc, hist in (
        (
            "packsched_task_queue_wait_seconds",
            "Seconds tasks waited to be placed.",
            c.queue_wait_seconds,
        ),
        ("packsched_task_run_seconds", "Seconds attempts ran.", c.run_seconds),
    ):
        if hist is not None:
            out.append(_histogram(name, doc, hist))

    live = snap.live_allocs()
    allocs = GaugeMetricFamily(
        "packsched_allocs", "Allocs in the snapshot: live, or dead and shown.", labels=["state"]
    )
    allocs.add_metric(["live"], len(live))
    allocs.add_metric(["dead"], len(snap.allocs) - len(live))
    out.append(allocs)
    out.append(_counter("packsched_allocs_started", "Allocs granted.", c.allocs_started))
    out.append(_counter("packsched_allocs_freed", "Allocs freed.", c.allocs_freed))
    out.append(
        _counter("packsched_allocs_dead", "Allocs that died (keepalive failed).", c.allocs_dead)
    )
    out.append(
        _counter(
            "packsched_alloc_requests", "Alloc requests made to the cluster.", c.alloc_requests
        )
    )
    out.append(
        _counter(
            "packsched_alloc_requests_failed",
            "Alloc requests refused or failed.",
            c.alloc_requests_failed,
        )
    )
    pending = GaugeMetricFamily("packsched_alloc_requests_pending", "Alloc requests in flight now.")
    pending.add_metric([], snap.pending_alloc_requests)
    out.append(pending)
    pending_res = GaugeMetricFamily(
        "packsched_alloc_requests_pending_resources",
        "Resources asked for by the requests in flight (base units).",
        labels=["resource"],
    )
    for resource, amount in snap.pending_alloc_resources.items():
        pending_res.add_metric([resource], amount)
    out.append(pending_res)

    capacity = GaugeMetricFamily(
        "packsched_alloc_capacity",
        "What a live alloc holds, per resource (base units).",
        labels=["alloc", "resource"],
    )
    used = GaugeMetricFamily(
        "packsched_alloc_used",
        "What a live alloc's tasks hold, per resource (base units).",
        labels=["alloc", "resource"],
    )
    utilisation = GaugeMetricFamily(
        "packsched_alloc_utilisation_ratio",
        "Used over capacity of a live alloc, per resource it has.",
        labels=["alloc", "resource"],
    )
    running = GaugeMetricFamily(
        "packsched_alloc_tasks", "Tasks running on a live alloc.", labels=["alloc"]
    )
    idle = GaugeMetricFamily(
        "packsched_alloc_idle_seconds",
        "Seconds a live alloc has had no task (0 while busy).",
        labels=["alloc"],
    )
    age = GaugeMetricFamily(
        "packsched_alloc_age_seconds", "Seconds since a live alloc was granted.", labels=["alloc"]
    )
    total_capacity = Resources()
    total_used = Resources()
    for a in live:
        in_use = a.resources - a.available
        total_capacity = total_capacity + a.resources
        total_used = total_used + in_use
        for resource, have in a.resources.items():
            capacity.add_metric([a.id, resource], have)
            used.add_metric([a.id, resource], in_use.amount(resource))
            if have > 0:
                utilisation.add_metric([a.id, resource], in_use.amount(resource) / have)
        running.add_metric([a.id], len(a.task_ids))
        idle.add_metric(
            [a.id], max(0.0, snap.taken_at - a.idle_since) if a.idle_since is not None else 0.0
        )
        age.add_metric([a.id], max(0.0, snap.taken_at - a.created_at))
    out.extend([capacity, used, utilisation, running, idle, age])

    efficiency = GaugeMetricFamily(
        "packsched_packing_efficiency_ratio",
        "Sum of used over sum of capacity across live allocs, per resource they have.",
        labels=["resource"],
    )
    for resource, have in total_capacity.items():
        if have > 0:
            efficiency.add_metric([resource], total_used.amount(resource) / have)
    out.append(efficiency)

    if per_task:
        out.extend(_task_families(snap))
    return out


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """A counter family with one unlabelled sample; the client appends `_total`."""
    return CounterMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    buckets = [
        ("+Inf" if math.isinf(bound) else _le(bound), float(count))
        for bound, count in zip(hist.bounds, hist.buckets, strict=True)
    ]
    family.add_metric([], buckets, sum_value=hist.sum)
    return family


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (`1.0`, `0.005`)."""
    return repr(float(bound))


def _task_families(snap: StatsSnapshot) -> list[Metric]:
    """One set of series per task: state, attempt and what its latest attempt used."""
    labels = ["task", "name", "kind"]
    state = GaugeMetricFamily(
        "packsched_task_state", "1 for the state a task is in.", labels=[*labels, "state"]
    )
    attempt = GaugeMetricFamily("packsched_task_attempt", "A task's attempt number.", labels=labels)
    memory = GaugeMetricFamily(
        "packsched_task_memory_peak_bytes", "Peak memory of a task's latest attempt.", labels=labels
    )
    cpu = GaugeMetricFamily(
        "packsched_task_cpu_seconds", "CPU time of a task's latest attempt.", labels=labels
    )
    duration = GaugeMetricFamily(
        "packsched_task_duration_seconds", "Wall time of a task's latest attempt.", labels=labels
    )
    disk = GaugeMetricFamily(
        "packsched_task_disk_peak_bytes",
        "Peak work-dir bytes of a task's latest attempt.",
        labels=labels,
    )
    for t in snap.tasks:
        values = [t.id, t.name, t.kind or ""]
        state.add_metric([*values, t.state.value], 1)
        attempt.add_metric(values, t.attempt)
        stats = t.runtime_statistics
        if stats is not None:
            memory.add_metric(values, stats.memory)
            cpu.add_metric(values, stats.cpu_time)
            duration.add_metric(values, stats.duration)
            disk.add_metric(values, stats.disk_space)
    return [state, attempt, memory, cpu, duration, disk]


def _registry(snapshot_fn: SnapshotFn, per_task: bool) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PackschedCollector(snapshot_fn, per_task=per_task))
    return registry


def render_metrics(snap: StatsSnapshot, *, per_task: bool = False) -> bytes:
    """The exposition text (format 0.0.4) of one snapshot, for servers of their own."""
    return generate_latest(_registry(lambda: snap, per_task))


def metrics_app(snapshot_fn: SnapshotFn, *, per_task: bool = False) -> ASGIApp:
    """An ASGI app that serves the metrics at exactly `/metrics` (GET or HEAD).

    Any other path is 404 (no redirects), any other method 405. `snapshot_fn` is called on the
    event loop, so it may read the scheduler directly.
    """
    registry = _registry(snapshot_fn, per_task)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        if scope.get("path") != "/metrics":
            status, body, ctype = 404, b"not found: metrics are at /metrics\n", "text/plain"
        elif method not in ("GET", "HEAD"):
            status, body, ctype = 405, b"method not allowed: use GET\n", "text/plain"
        else:
            status, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


class MetricsServer:
    """A running metrics HTTP server (see `start_metrics_server`); `close()` stops it."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        address = server.server_address
        self.host = str(address[0] if isinstance(address[0], str) else address[0].decode())
        self.port = int(address[1])

    @property
    def url(self) -> str:
        """The address of the metrics page."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and wait for the server thread (blocks for up to ~0.1 s)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    port: int,
    snapshot_fn: SnapshotFn,
    *,
    host: str = "127.0.0.1",
    per_task: bool = False,
) -> MetricsServer:
    """Serve `/metrics` on `host:port` from a background thread; port 0 picks a free one.

    Called from inside an event loop (the usual case: `start_metrics_server(9464,
    sched.stats)`), each scrape runs `snapshot_fn` on that loop, so it never reads the
    scheduler from another thread. It listens on loopback unless told otherwise.
    """
    token = _loop_token()
    take = _snapshot_call(snapshot_fn, per_task)

    def snapshot() -> StatsSnapshot:
        if token is None:
            return take()
        return anyio.from_thread.run_sync(take, token=token)

    registry = _registry(snapshot, per_task)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._respond(head=False)

        def do_HEAD(self) -> None:
            self._respond(head=True)

        def _respond(self, *, head: bool) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                status, body, ctype = 404, b"not found: metrics are at /metrics\n", "text/plain"
            else:
                try:
                    status, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
                except Exception as exc:  # the loop is gone, or the snapshot failed
                    status, body, ctype = 503, f"no snapshot: {exc!r}\n".encode(), "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not worth a log line each."""

    server = ThreadingHTTPServer((host, port), Handler)
    # Request threads may wait on the event loop; closing must not wait for them.
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"packsched-metrics-{port}",
        daemon=True,
    )
    thread.start()
    return MetricsServer(server, thread)


def _loop_token() -> anyio.lowlevel.EventLoopToken | None:
    """The running event loop's token, or None when called outside one."""
    try:
        return anyio.lowlevel.current_token()
    except RuntimeError:  # anyio's NoEventLoopError
        return None
