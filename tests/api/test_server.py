"""The HTTP API in process: every route, its errors, and the AsyncClient on top of it."""

from __future__ import annotations

import httpx
import msgspec
import pytest

from packsched import (
    GiB,
    InvalidSpecError,
    InvalidTransition,
    Resources,
    TaskNotFoundError,
    TaskSpec,
    TaskState,
)
from packsched.api import TaskFailed, UnauthorizedError
from packsched.api.models import RunState
from packsched.api.openapi import openapi_document
from packsched.api.server import ApiServer
from packsched.config import ServerConfig

from .conftest import LIMITS, TOKEN, Api

S = TaskState


def spec(name: str = "t", **kw: object) -> TaskSpec:
    return TaskSpec(command=["true"], name=name, resources=Resources(cpu=1, mem=GiB), **kw)  # type: ignore[arg-type]


async def test_submit_with_units_then_wait(api: Api) -> None:
    """Resources in people's units are parsed; wait returns every task complete."""
    body = {
        "tasks": [{"command": ["true"], "resources": {"cpu": "500m", "mem": "1.5GiB", "disk": 10}}]
    }
    r = await api.http.post("/v1/tasks", json=body)
    assert r.status_code == 200
    [task] = r.json()["tasks"]
    assert task["spec"]["resources"]["cpu"] == 0.5
    assert task["spec"]["resources"]["mem"] == 1536 * 1024**2
    [done] = await api.client.wait([task["id"]], timeout=10)
    assert done.state is S.COMPLETE


async def test_submit_is_idempotent_by_key(api: Api) -> None:
    """The same key twice returns the first task; the client gives every spec a key."""
    first = await api.client.submit(spec(key="k1"))
    again = await api.client.submit(spec(key="k1"))
    assert again.id == first.id
    [a, b] = await api.client.submit([spec(), spec()])
    assert a.id != b.id and a.spec.key and b.spec.key and a.spec.key != b.spec.key


async def test_client_adapts_to_a_lower_batch_limit(api: Api) -> None:
    """A submit larger than the daemon's max_batch is split until it fits, in order."""
    specs = [spec(name=f"t{i}") for i in range(LIMITS.max_batch * 2 + 7)]
    tasks = await api.client.submit(specs)
    assert [t.spec.name for t in tasks] == [s.name for s in specs]
    assert len(api.scheduler.list_tasks()) == len(specs)


async def test_a_bad_spec_fails_the_whole_batch(api: Api) -> None:
    """One bad spec in a batch: 400 naming its path, and none of the batch is accepted."""
    good = {"command": ["true"]}
    body = {"tasks": [good, good, {"command": ["true"], "resources": {"mem": "lots"}}]}
    r = await api.http.post("/v1/tasks", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid" and error["path"] == "$.tasks[2].resources.mem"
    assert "byte quantity" in error["message"]
    assert api.scheduler.list_tasks() == []


async def test_unknown_dependency_is_reported_at_its_path(api: Api) -> None:
    """An `after` id that does not exist is a 400 at its path; nothing is accepted."""
    body = {"tasks": [{"command": ["true"]}, {"command": ["true"], "after": ["0123456789abcdef"]}]}
    r = await api.http.post("/v1/tasks", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["path"] == "$.tasks[1].after[0]"
    assert api.scheduler.list_tasks() == []


@pytest.mark.parametrize(
    ("body", "path", "words"),
    [
        (b'{"tasks": [', "$", "malformed JSON"),
        (b'{"tasks": {}}', "$.tasks", "expected array"),
        (b'{"tasks": [{"command": "true"}]}', "$.tasks[0].command", "expected array"),
        (
            b'{"tasks": [{"command": ["x"], "resources": {"cpu": -1}}]}',
            "$.tasks[0].resources.cpu",
            ">= 0",
        ),
        (
            b'{"tasks": [{"command": ["x"], "resources": {"mem": "-1GiB"}}]}',
            "$.tasks[0].resources.mem",
            "byte",
        ),
        (
            b'{"tasks": [{"command": ["x"], "resources": {"gpu": 1.5}}]}',
            "$.tasks[0].resources.gpu",
            "whole",
        ),
        (b'{"tasks": [{"command": ["x"], "colour": "red"}]}', "$.tasks[0].colour", "unknown field"),
        (b'{"tasks": [{"command": []}]}', "$.tasks[0].command", "must not be empty"),
        (b'{"tasks": [{"command": ["x"], "retries": -2}]}', "$.tasks[0].retries", "retries"),
        (b'{"tasks": [{"command": ["x"], "after": ["nope"]}]}', "$.tasks[0].after[0]", "task id"),
        (
            b'{"tasks": [{"command": ["x"], "priority": "high"}]}',
            "$.tasks[0].priority",
            "expected int",
        ),
        (b'{"tasks": [{"command": ["x"], "timeout": 0}]}', "$.tasks[0].timeout", "timeout"),
        (
            b'{"tasks": [{"command": ["x"], "resources": {"extra": {"": 1}}}]}',
            "$.tasks[0].resources.extra.",
            "empty",
        ),
    ],
)
async def test_bad_input_names_the_field(api: Api, body: bytes, path: str, words: str) -> None:
    """Malformed JSON, wrong types, negative resources, unknown fields: 400 naming the path."""
    r = await api.http.post("/v1/tasks", content=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["path"] == path
    assert words.lower() in error["message"].lower()


async def test_client_raises_invalid_spec_with_path(api: Api) -> None:
    """The client turns a 400 into InvalidSpecError carrying the path."""
    with pytest.raises(InvalidSpecError) as info:
        await api.client.submit([spec(), spec(after=["0123456789abcdef"])])
    assert info.value.path == "$.tasks[1].after[0]"


async def test_body_and_batch_limits(api: Api) -> None:
    """A body over max_body_bytes and a batch over max_batch are refused with 413."""
    big = b'{"tasks": [{"command": ["' + b"x" * (LIMITS.max_body_bytes + 1) + b'"]}]}'
    r = await api.http.post("/v1/tasks", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too-large"
    many = {"tasks": [{"command": ["true"]}] * (LIMITS.max_batch + 1)}
    r = await api.http.post("/v1/tasks", json=many)
    assert r.status_code == 413 and r.json()["error"]["path"] == "$.tasks"
    assert api.scheduler.list_tasks() == []


async def test_auth(api: Api) -> None:
    """No token or a wrong one is 401 on every route but the probes."""
    transport = api.http._transport
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as anon:
        for method, path in [
            ("GET", "/v1/tasks"),
            ("POST", "/v1/tasks"),
            ("GET", "/v1/stats"),
            ("GET", "/openapi.json"),
        ]:
            r = await anon.request(method, path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
        r = await anon.get("/v1/tasks", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await anon.get("/livez")).status_code == 200
        assert (await anon.get("/readyz")).status_code == 200
    from packsched.api import AsyncClient

    async with AsyncClient("http://api", "wrong", transport=transport, retry_timeout=0) as bad:
        with pytest.raises(UnauthorizedError):
            await bad.list_tasks()


async def test_metrics_route_is_exact_and_guarded(api: Api) -> None:
    """/metrics is served at exactly that path, behind the token unless metrics_auth is off."""
    from starlette.responses import PlainTextResponse
    from starlette.types import Receive, Scope, Send

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # A plain ASGI function, as stats.prometheus.metrics_app returns.
        await PlainTextResponse("packsched_tasks 0\n")(scope, receive, send)

    for auth in (True, False):
        server = ApiServer(api.scheduler, ServerConfig(metrics_auth=auth), token=TOKEN, metrics=app)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=server.app), base_url="http://m"
        ) as c:
            r = await c.get("/metrics")
            assert r.status_code == (401 if auth else 200)
            r = await c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and r.text.startswith("packsched_tasks")
            r = await c.get("/metrics/", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 404


async def test_controls_and_conflicts(api: Api) -> None:
    """hold, release, kill and priority work; a control the table forbids is 409 naming both states."""
    held = await api.client.submit(spec(hold=True))
    assert held.state is S.HOLD
    held = await api.client.set_priority(held.id, -5)
    assert held.spec.priority == -5
    r = await api.http.post(f"/v1/tasks/{held.id}/hold")
    assert r.status_code == 409
    error = r.json()["error"]
    assert (error["current"], error["target"], error["code"]) == (
        "hold",
        "hold",
        "invalid-transition",
    )
    assert "hold" in error["message"]
    killed = await api.client.kill(held.id)
    assert killed.state is S.KILLED
    with pytest.raises(InvalidTransition) as info:
        await api.client.release(held.id)
    assert (info.value.current, info.value.target) == ("killed", "waiting")
    r = await api.http.post(f"/v1/tasks/{held.id}/explode")
    assert r.status_code == 404
    r = await api.http.post(f"/v1/tasks/{held.id}/priority", json={"priority": "x"})
    assert r.status_code == 400 and r.json()["error"]["path"] == "$.priority"


async def test_hold_then_release_runs(api: Api) -> None:
    """A held task runs after release."""
    task = await api.client.submit(spec(hold=True))
    await api.client.release(task.id)
    assert (await api.client.wait(task.id, timeout=10)).state is S.COMPLETE


async def test_unknown_task_is_404(api: Api) -> None:
    """An unknown or malformed id is 404; the client raises TaskNotFoundError."""
    for task_id in ("0123456789abcdef", "not-an-id"):
        r = await api.http.get(f"/v1/tasks/{task_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not-found"
    with pytest.raises(TaskNotFoundError):
        await api.client.get("0123456789abcdef")
    r = await api.http.post("/v1/wait", json={"ids": ["0123456789abcdef"]})
    assert r.status_code == 404 and r.json()["error"]["path"] == "$.ids[0]"


async def test_result_raises_task_failed(api: Api) -> None:
    """result() returns a completed task's result and raises TaskFailed with the exit code."""
    ok, bad = await api.client.submit([spec(), spec(name="bad")])
    assert (await api.client.result(ok.id, timeout=10)).exit_code == 0
    with pytest.raises(TaskFailed) as info:
        await api.client.result(bad.id, timeout=10)
    assert info.value.exit_code == 3
    assert info.value.task.state is S.ERROR
    assert "exit-status" in info.value.error_codes
    assert "exit code 3" in str(info.value)


async def test_wait_first_and_timeout(api: Api) -> None:
    """return_when=first returns on the first settled task; a timeout leaves the rest pending."""
    held = await api.client.submit(spec(hold=True))
    quick = await api.client.submit(spec())
    first = await api.client.wait([held.id, quick.id], return_when="first", timeout=10)
    assert [t.id for t in first] == [quick.id]
    r = await api.http.post("/v1/wait", json={"ids": [held.id], "timeout": 0.05})
    answer = r.json()
    assert answer["timed_out"] is True and answer["pending"] == [held.id]
    with pytest.raises(TimeoutError):
        await api.client.wait([held.id], timeout=0.05)
    r = await api.http.post("/v1/wait", json={"ids": [held.id], "timeout": -1})
    assert r.status_code == 400 and r.json()["error"]["path"] == "$.timeout"


@pytest.mark.parametrize("count", [20, 100])
async def test_as_completed_yields_each_task_once(api: Api, count: int) -> None:
    """as_completed yields every task exactly once, for few ids and for many (gathered polls)."""
    tasks = await api.client.submit([spec() for _ in range(count // 2)])
    tasks += await api.client.submit([spec() for _ in range(count - count // 2)])
    seen = [t.id async for t in api.client.as_completed([t.id for t in tasks], timeout=10)]
    assert sorted(seen) == sorted(t.id for t in tasks)
    held = [await api.client.submit(spec(hold=True)) for _ in range(count)]
    with pytest.raises(TimeoutError):
        async for _ in api.client.as_completed([t.id for t in held], timeout=0.05):
            pass


async def test_list_filters_and_pages(api: Api) -> None:
    """Filters by state, label, run and kind; pages with a cursor cover everything once."""
    a = await api.client.submit(
        [spec(name="align", run="r1", labels={"tier": "gold"}) for _ in range(12)]
    )
    b = await api.client.submit([spec(name="sort", run="r2", hold=True) for _ in range(5)])
    assert len(await api.client.list_tasks(run="r1")) == 12
    assert {t.id for t in await api.client.list_tasks(state="hold")} == {t.id for t in b}
    assert len(await api.client.list_tasks(label={"tier": "gold"})) == 12
    assert len(await api.client.list_tasks(kind="sort")) == 5
    assert len(await api.client.list_tasks(limit=3)) == 3
    ids: list[str] = []
    cursor = None
    while True:
        params = {"limit": "5"} | ({"after": str(cursor)} if cursor is not None else {})
        page = (await api.http.get("/v1/tasks", params=params)).json()
        ids += [t["id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert ids == [t.id for t in a + b]


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("state=sleeping", "query.state"),
        ("label=novalue", "query.label"),
        ("limit=0", "query.limit"),
        ("limit=abc", "query.limit"),
        ("after=-3", "query.after"),
    ],
)
async def test_bad_query_names_the_parameter(api: Api, query: str, path: str) -> None:
    """A bad query parameter is a 400 naming it."""
    r = await api.http.get(f"/v1/tasks?{query}")
    assert r.status_code == 400 and r.json()["error"]["path"] == path


async def test_runs(api: Api) -> None:
    """Runs list with derived states; a run's tasks; killing a run cancels it."""
    done = await api.client.submit([spec(run="done") for _ in range(3)])
    await api.client.wait([t.id for t in done], timeout=10)
    await api.client.submit([spec(run="later", hold=True) for _ in range(2)])
    runs = {r.run: r for r in await api.client.runs()}
    assert runs["done"].state is RunState.DONE and runs["done"].finished_at is not None
    assert runs["later"].state is RunState.HELD and runs["later"].counts == {S.HOLD: 2}
    detail = await api.client.run("later")
    assert len(detail.tasks) == 2
    killed = await api.client.kill_run("later")
    assert killed.killed == [t.id for t in detail.tasks]
    assert killed.summary.state is RunState.CANCELED
    r = await api.http.get("/v1/runs/nope")
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([S.COMPLETE, S.FAILED, S.KILLED], RunState.FAILED),
        ([S.COMPLETE, S.KILLED, S.RUNNING], RunState.CANCELED),
        ([S.WAITING, S.RUNNING, S.ERROR], RunState.RUNNING),
        ([S.COMPLETE, S.ERROR], RunState.ERROR),
        ([S.COMPLETE, S.COMPLETE], RunState.DONE),
        ([S.COMPLETE, S.SKIPPED], RunState.DONE),
        ([S.WAITING, S.HOLD], RunState.PENDING),
        ([S.COMPLETE, S.WAITING], RunState.RUNNING),
        ([S.COMPLETE, S.HOLD], RunState.HELD),
        ([S.LOST], RunState.PENDING),
    ],
)
def test_run_state(states: list[TaskState], expected: RunState) -> None:
    """A run's state is derived from its tasks' states, FAILED first."""
    from packsched.api.models import run_state

    assert run_state(states) is expected


async def test_stats_history_and_openapi(api: Api) -> None:
    """Stats decode on the client; history lists finished attempts; the OpenAPI document is whole."""
    tasks = await api.client.submit([spec(kind="k") for _ in range(3)])
    await api.client.wait([t.id for t in tasks], timeout=10)
    snap = await api.client.stats()
    assert snap.tasks_by_state[S.COMPLETE] == 3 and len(snap.tasks) == 3
    lean = await api.client.stats(include_tasks=False)
    assert lean.tasks == [] and lean.tasks_by_state == snap.tasks_by_state
    assert (await api.http.get("/v1/stats?tasks=maybe")).status_code == 400
    attempts = await api.client.history(kind="k")
    assert {a.task_id for a in attempts} == {t.id for t in tasks}
    r = await api.http.get("/v1/history?since=abc")
    assert r.status_code == 400 and r.json()["error"]["path"] == "query.since"
    doc = (await api.http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    refs = set()

    def collect(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(doc)
    assert refs <= set(schemas)
    assert doc == msgspec.json.decode(msgspec.json.encode(openapi_document()))


async def test_draining_refuses_submits_and_fails_readiness(api: Api) -> None:
    """While draining, submits are 503 (the client gives up after its retry period) and /readyz is 503."""
    api.server.start_draining()
    r = await api.http.post("/v1/tasks", json={"tasks": [{"command": ["true"]}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    assert r.headers["retry-after"]
    assert (await api.http.get("/readyz")).status_code == 503
    assert (await api.http.get("/livez")).status_code == 200


async def test_stop_releases_long_polls(api: Api) -> None:
    """stop() answers a pending long-poll at once with what it has."""
    held = await api.client.submit(spec(hold=True))
    import anyio

    async with anyio.create_task_group() as tg:

        async def poll() -> None:
            r = await api.http.post("/v1/wait", json={"ids": [held.id], "timeout": 60})
            assert r.json()["timed_out"] is True

        tg.start_soon(poll)
        await anyio.wait_all_tasks_blocked()
        api.server.stop()
