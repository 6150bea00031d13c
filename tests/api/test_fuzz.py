"""Property-based fuzzing of the HTTP API: whatever arrives, the answer is never a 5xx, and every
error is a JSON body with a code and a message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import anyio.from_thread
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packsched import KiB, Scheduler, SchedulerConfig
from packsched.api.server import ApiServer
from packsched.cluster import SimCluster
from packsched.config import ServerConfig

TOKEN = "fuzz"
FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Target:
    """The API in a background event loop, called from the (sync) hypothesis tests."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, http: httpx.AsyncClient) -> None:
        self.portal = portal
        self.http = http

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        response: httpx.Response = self.portal.call(lambda: self.http.request(method, path, **kw))
        assert response.status_code < 500, (method, path, kw, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] and error["message"]
        return response


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with anyio.from_thread.start_blocking_portal() as portal:
        sched = Scheduler(SimCluster(), config=SchedulerConfig(drain_timeout=0.001))
        with portal.wrap_async_context_manager(sched):
            limits = ServerConfig(max_body_bytes=32 * KiB, max_batch=20, max_wait=0.02)
            server = ApiServer(sched, limits, token=TOKEN)
            http = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=server.app),
                base_url="http://fuzz",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            try:
                yield Target(portal, http)
            finally:
                portal.call(http.aclose)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        ["4GiB", "500m", "-1", "1e400", "0x10", "1.5G", "", "0123456789abcdef", "NaN"]
    )
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
resources = st.fixed_dictionaries(
    {},
    optional={
        "cpu": json_values,
        "mem": json_values,
        "disk": json_values,
        "gpu": json_values,
        "extra": json_values,
    },
)
spec = st.fixed_dictionaries(
    {"command": st.lists(st.text(max_size=6), max_size=3) | json_values},
    optional={
        "resources": resources | json_values,
        "priority": json_values,
        "name": json_values,
        "env": json_values,
        "labels": json_values,
        "after": st.lists(
            st.sampled_from(["0123456789abcdef", "zz"]) | st.text(max_size=16), max_size=2
        ),
        "timeout": json_values,
        "expected_duration": json_values,
        "retries": json_values,
        "max_lost": json_values,
        "hold": json_values,
        "key": json_values,
        "surprise": json_values,
    },
)


def _encode(value: Any) -> bytes:
    # allow_nan: NaN and Infinity are not JSON, which is exactly what a fuzzer should send.
    return json.dumps(value, allow_nan=True).encode()


@FUZZ
@given(body=st.fixed_dictionaries({"tasks": st.lists(spec, max_size=4)}) | json_values)
def test_submit_never_5xx(target: Target, body: Any) -> None:
    """Any JSON body to POST /v1/tasks gets a 2xx or a 4xx."""
    target.request("POST", "/v1/tasks", content=_encode(body))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_raw_bytes_never_5xx(target: Target, raw: bytes) -> None:
    """Arbitrary bytes as a body are a 4xx, never a 5xx."""
    target.request("POST", "/v1/tasks", content=raw)
    target.request("POST", "/v1/wait", content=raw)


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {"ids": st.lists(st.sampled_from(["0123456789abcdef"]) | st.text(max_size=16), max_size=3)},
        optional={"return_when": json_values, "timeout": json_values},
    )
    | json_values
)
def test_wait_never_5xx(target: Target, body: Any) -> None:
    """Any body to POST /v1/wait gets a 2xx or a 4xx."""
    target.request("POST", "/v1/wait", content=_encode(body))


@FUZZ
@given(
    task_id=st.sampled_from(["0123456789abcdef"]) | st.text(max_size=20),
    action=st.sampled_from(["hold", "release", "kill", "retry", "priority", "x"])
    | st.text(max_size=8),
    body=json_values,
)
def test_controls_never_5xx(target: Target, task_id: str, action: str, body: Any) -> None:
    """Controls on any id, known actions or not, with any body: never a 5xx."""
    path = f"/v1/tasks/{quote(task_id or 'x', safe='')}/{quote(action or 'y', safe='')}"
    target.request("POST", path, content=_encode(body))


params = st.lists(
    st.tuples(
        st.sampled_from(
            ["state", "label", "run", "kind", "after", "limit", "since", "until", "task_id"]
        )
        | st.text(max_size=6),
        st.text(max_size=12) | st.integers().map(str),
    ),
    max_size=4,
)


@FUZZ
@given(query=params, path=st.sampled_from(["/v1/tasks", "/v1/history", "/v1/runs", "/v1/stats"]))
def test_queries_never_5xx(target: Target, query: list[tuple[str, str]], path: str) -> None:
    """Any query parameters on the read routes: never a 5xx."""
    target.request("GET", path, params=query)
