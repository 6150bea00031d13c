"""End to end against a real `packsched serve` process: Client, stats, metrics, auth, bad input,
and a SIGTERM drain with a restart that loses nothing."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from packsched import Resources, TaskSpec, TaskState
from packsched.api import Client, DaemonUnreachableError, UnauthorizedError

from .daemon import TOKEN, Daemon

S = TaskState


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path_factory.mktemp("daemon"), max_body_bytes=1024 * 1024, max_batch=2000
    ).start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()


def spec(i: int, **kw: object) -> TaskSpec:
    return TaskSpec(command=["true"], name=f"t{i}", resources=Resources(cpu=0.5), **kw)  # type: ignore[arg-type]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_a_thousand_tasks_through_the_client(daemon: Daemon) -> None:
    """1,000 tasks submitted and waited for; /v1/stats and /metrics agree with what was sent."""
    with Client(daemon.url, TOKEN) as client:
        before = client.stats()
        tasks = client.submit([spec(i, run="thousand") for i in range(1000)])
        assert len({t.id for t in tasks}) == 1000
        done = client.wait([t.id for t in tasks], timeout=120)
        assert len(done) == 1000 and all(t.state is S.COMPLETE for t in done)
        snap = client.stats()
        assert snap.counters.submitted - before.counters.submitted == 1000
        assert snap.tasks_by_state[S.COMPLETE] - before.tasks_by_state[S.COMPLETE] == 1000
        [run] = [r for r in client.runs() if r.run == "thousand"]
        assert run.state == "done" and run.total == 1000
    with daemon.http() as http:
        samples = metric_samples(http.get("/metrics").text)
    assert samples[("packsched_tasks", (("state", "complete"),))] == snap.tasks_by_state[S.COMPLETE]
    assert samples[("packsched_tasks_submitted_total", ())] == snap.counters.submitted
    assert samples[("packsched_tasks_finished_total", (("outcome", "complete"),))] >= 1000


def test_token_is_required(daemon: Daemon) -> None:
    """No token or a wrong one is 401 everywhere but the probes."""
    for token in (None, "wrong"):
        with daemon.http(token) as http:
            for method, path in [("GET", "/v1/tasks"), ("POST", "/v1/tasks"), ("GET", "/metrics")]:
                r = http.request(method, path)
                assert r.status_code == 401, (token, path)
                assert r.json()["error"]["code"] == "unauthorized"
            assert http.get("/livez").status_code == 200
            assert http.get("/readyz").status_code == 200
    with Client(daemon.url, "wrong", retry_timeout=0) as client, pytest.raises(UnauthorizedError):
        client.list_tasks(limit=1)


@pytest.mark.parametrize(
    ("body", "status", "path"),
    [
        (b"{not json", 400, "$"),
        (b'{"tasks": [{"command": "true"}]}', 400, "$.tasks[0].command"),
        (
            b'{"tasks": [{"command": ["true"], "resources": {"cpu": -2}}]}',
            400,
            "$.tasks[0].resources.cpu",
        ),
        (
            b'{"tasks": [{"command": ["true"], "resources": {"mem": "-1Gi"}}]}',
            400,
            "$.tasks[0].resources.mem",
        ),
        (b'{"tasks": [{"command": ["true"], "nice": 5}]}', 400, "$.tasks[0].nice"),
        (b'{"tasks": [{"command": ["' + b"x" * 1_200_000 + b'"]}]}', 413, None),
    ],
)
def test_bad_input_is_refused_and_the_daemon_keeps_serving(
    daemon: Daemon, body: bytes, status: int, path: str | None
) -> None:
    """Malformed JSON, wrong types, negative resources, unknown fields, an oversized body: a 4xx
    naming the field, and the daemon still accepts good work afterwards."""
    with daemon.http() as http:
        before = http.get("/v1/stats").json()["total_tasks"]
        r = http.post("/v1/tasks", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        if path is not None:
            assert error["path"] == path
        assert http.get("/v1/stats").json()["total_tasks"] == before
        r = http.post("/v1/tasks", json={"tasks": [{"command": ["true"]}]})
        assert r.status_code == 200


def test_sigterm_drains_and_a_restart_finishes_everything(tmp_path: Path) -> None:
    """SIGTERM mid-run: submits get 503 and /readyz fails while draining, the process exits 0;
    a restart on the same store runs every task to COMPLETE."""
    cluster = {
        "kind": "sim",
        "shapes": [{"cpu": 2, "mem": "8GiB", "disk": "8GiB"}],
        "max_allocs": 2,
    }
    daemon = Daemon(tmp_path, cluster=cluster, drain_grace=1.0).start()
    try:
        with Client(daemon.url, TOKEN) as client:
            tasks = client.submit(
                [
                    TaskSpec(command=["true"], resources=Resources(cpu=1), expected_duration=0.2)
                    for _ in range(40)
                ]
            )
            ids = [t.id for t in tasks]
            client.wait(ids, return_when="first", timeout=30)
        daemon.signal(signal.SIGTERM)
        with daemon.http() as http:
            deadline = time.monotonic() + 10
            while http.get("/readyz").status_code != 503:
                assert time.monotonic() < deadline, "never reported draining"
                time.sleep(0.01)
            r = http.post("/v1/tasks", json={"tasks": [{"command": ["true"]}]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert daemon.wait_exit(30) == 0, daemon.log()
        assert '"event": "draining"' in daemon.log()
    finally:
        daemon.stop()

    again = Daemon(tmp_path, cluster=cluster).start()
    try:
        with Client(again.url, TOKEN) as client:
            unfinished = [t for t in (client.get(i) for i in ids) if t.state is not S.COMPLETE]
            assert unfinished, "the drain should have left work for the restart"
            done = client.wait(ids, timeout=60)
            assert [t.state for t in done] == [S.COMPLETE] * len(ids)
    finally:
        assert again.stop() == 0


def test_client_retries_until_the_daemon_is_up(tmp_path: Path) -> None:
    """A client started before the daemon retries the connection and then succeeds."""
    daemon = Daemon(tmp_path)
    with (
        Client(daemon.url, TOKEN, retry_timeout=0) as client,
        pytest.raises(DaemonUnreachableError),
    ):
        client.list_tasks()
    # The process is still importing when the client first calls: the retries carry it.
    daemon.spawn()
    try:
        with Client(daemon.url, TOKEN, retry_timeout=30) as client:
            task = client.submit(TaskSpec(command=["true"]))
            assert client.wait(task.id, timeout=30).state is S.COMPLETE
    finally:
        daemon.stop()


def test_readyz_and_livez_without_token(daemon: Daemon) -> None:
    """Probes answer without a token."""
    assert httpx.get(f"{daemon.url}/livez").json() == {"status": "ok"}
    assert httpx.get(f"{daemon.url}/readyz").json() == {"status": "ready"}
