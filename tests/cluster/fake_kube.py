"""A fake Kubernetes API server for tests: real HTTP on 127.0.0.1, real Kubernetes JSON.

It serves the part of the core/v1 API that KubernetesCluster uses: pods (create, get, list with
a label selector, watch streams with resourceVersion, delete with a grace period), secrets
(create, get, delete, garbage-collected with their owner pod) and nodes (list). Errors are
`Status` objects with the codes a real API server returns, a watch from a compacted
resourceVersion gets a 410 `Expired` ERROR event, and a pod "runs" as a local process group
started from its container's command, so a real `packsched agent` runs inside it.

Test hooks act as the kubelet or an operator would: `kill_container` (SIGKILL, the pod goes
Failed), `evict` (Failed, reason Evicted), `delete_pod`, `compact` (old resourceVersions expire)
and `close_watches` (every open watch stream ends, as at a server-side timeout).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import math
import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["FakeKube", "FakePod", "default_node", "status_body"]

Json = dict[str, Any]

# Every container process carries this variable, so that when the container "dies" its whole
# process tree can be found and killed, even children that started sessions of their own (the
# way a real container's cgroup takes all of them down).
MARKER = "FAKE_KUBE_POD_UID"

_BYTES = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "m": 0.001,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (`500m` -> 0.5, `2Gi` -> 2147483648)."""
    if isinstance(value, int | float):
        return float(value)
    for suffix in sorted(_BYTES, key=len, reverse=True):
        if suffix and value.endswith(suffix):
            return float(value[: -len(suffix)]) * _BYTES[suffix]
    return float(value)


def now_rfc3339() -> str:
    """The time now as Kubernetes writes timestamps."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, **details: Any) -> Json:
    """A `Status` failure object, as the API server returns with every error."""
    body: Json = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def error(code: int, reason: str, message: str, **details: Any) -> JSONResponse:
    """An error response carrying a `Status`."""
    return JSONResponse(status_body(code, reason, message, **details), status_code=code)


def default_node(
    name: str = "node-1",
    *,
    cpu: str = "8",
    memory: str = "32Gi",
    storage: str = "100Gi",
    gpu: int = 0,
    labels: Mapping[str, str] | None = None,
    taints: list[Json] | None = None,
    unschedulable: bool = False,
) -> Json:
    """A Node object with the given allocatable resources."""
    allocatable = {"cpu": cpu, "memory": memory, "ephemeral-storage": storage, "pods": "110"}
    if gpu:
        allocatable["nvidia.com/gpu"] = str(gpu)
    spec: Json = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": str(uuid.uuid4()),
            "resourceVersion": "1",
            "labels": {"kubernetes.io/hostname": name, **(labels or {})},
        },
        "spec": spec,
        "status": {"allocatable": allocatable, "capacity": dict(allocatable)},
    }


def parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    """A label selector's terms as (key, op, value): `a=b`, `a==b`, `a!=b`, `a`, `!a`."""
    terms: list[tuple[str, str, str | None]] = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in raw:
            key, value = raw.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in raw:
            key, value = raw.split("==", 1) if "==" in raw else raw.split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif raw.startswith("!"):
            terms.append((raw[1:].strip(), "!", None))
        else:
            terms.append((raw, "exists", None))
    return terms


def selector_matches(terms: list[tuple[str, str, str | None]], labels: Mapping[str, str]) -> bool:
    """Whether `labels` satisfy every term."""
    for key, op, value in terms:
        have = labels.get(key)
        if (
            (op == "=" and have != value)
            or (op == "!=" and have == value)
            or (op == "exists" and have is None)
            or (op == "!" and have is not None)
        ):
            return False
    return True


def pod_requests(pod: Json) -> dict[str, float]:
    """The sum of a pod's container requests (limits where requests are absent)."""
    total: dict[str, float] = {}
    for container in pod["spec"].get("containers", []):
        res = container.get("resources") or {}
        wanted = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        for name, value in wanted.items():
            total[name] = total.get(name, 0.0) + quantity(value)
    return total


class FakePod:
    """One pod: its object as served, plus the local process that plays its container."""

    def __init__(self, obj: Json) -> None:
        self.obj = obj
        self.process: anyio.abc.Process | None = None
        self.log_path: Path | None = None
        self.gone = anyio.Event()
        self.delete_requested = anyio.Event()
        self.grace: float = 0.0

    @property
    def name(self) -> str:
        """The pod's name."""
        return str(self.obj["metadata"]["name"])

    @property
    def uid(self) -> str:
        """The pod's uid."""
        return str(self.obj["metadata"]["uid"])

    @property
    def phase(self) -> str:
        """Pending, Running, Succeeded or Failed."""
        return str(self.obj["status"]["phase"])

    @property
    def pid(self) -> int | None:
        """The container's main process id, while it runs."""
        return self.process.pid if self.process is not None else None

    def log(self) -> str:
        """What the container wrote so far (stdout and stderr)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")


class FakeKube:
    """A Kubernetes API server for one test: `async with FakeKube() as kube: kube.url`.

    Args:
        nodes: Node objects to serve (default one 8-cpu, 32 GiB node).
        token: the bearer token every request must carry.
        default_grace: seconds a deleted pod's container has between SIGTERM and SIGKILL.
        expired_as_http: answer a watch from a compacted resourceVersion with an HTTP 410
            instead of an ERROR event in a 200 stream (API servers have done both).
    """

    def __init__(
        self,
        *,
        nodes: list[Json] | None = None,
        token: str = "fake-token",
        default_grace: float = 1.0,
        expired_as_http: bool = False,
    ) -> None:
        self.nodes = nodes if nodes is not None else [default_node()]
        self.token = token
        self.default_grace = default_grace
        self.expired_as_http = expired_as_http
        self.bad_images: dict[str, str] = {}  # image -> the waiting reason its pods get
        self.pods: dict[tuple[str, str], FakePod] = {}
        self.secrets: dict[tuple[str, str], Json] = {}
        self.requests: list[tuple[str, str]] = []
        self.watches_opened = 0
        self.expired_watches = 0
        self._rv = 100
        self._compacted = 0
        self._history: list[tuple[int, str, str, Json]] = []
        self._changed = anyio.Event()
        self._watch_epoch = 0
        self._garble = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._server: uvicorn.Server | None = None
        self._served = anyio.Event()
        self._logs = Path(tempfile.mkdtemp(prefix="fake-kube-"))
        self.url = ""
        self.app = Starlette(
            routes=[
                Route("/api/v1/nodes", self._list_nodes, methods=["GET"]),
                Route("/api/v1/namespaces/{ns}/pods", self._pods, methods=["GET", "POST"]),
                Route("/api/v1/namespaces/{ns}/pods/{name}", self._pod, methods=["GET", "DELETE"]),
                Route("/api/v1/namespaces/{ns}/secrets", self._create_secret, methods=["POST"]),
                Route(
                    "/api/v1/namespaces/{ns}/secrets/{name}",
                    self._secret,
                    methods=["GET", "DELETE"],
                ),
            ]
        )
        self.app.add_exception_handler(404, self._not_found)
        self.app.add_exception_handler(405, self._not_allowed)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> FakeKube:
        self._tg_cm = anyio.create_task_group()
        self._tg = await self._tg_cm.__aenter__()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            lifespan="off",
            log_config=None,
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._tg.start_soon(self._serve)
        with anyio.fail_after(10):
            while not self._server.started:  # noqa: ASYNC110 - uvicorn has no started event
                await anyio.sleep(0.005)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None and self._server is not None
        with anyio.CancelScope(shield=True):
            for pod in list(self.pods.values()):
                await self._kill_container(pod, signal.SIGKILL)
            self._close_streams()
            self._server.should_exit = True
            with anyio.move_on_after(5):
                await self._served.wait()
        # The kubelets wait for deletions that will never come now: stop them.
        self._tg.cancel_scope.cancel()
        await self._tg_cm.__aexit__(None, None, None)

    async def _serve(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve()
        finally:
            self._served.set()

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """Write a kubeconfig that points at this server with its token; return its path."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    # -- hooks for tests --------------------------------------------------------------------

    def pod(self, name: str, namespace: str = "default") -> FakePod:
        """The pod of that name (KeyError if there is none)."""
        return self.pods[(namespace, name)]

    def live_pods(self, namespace: str = "default") -> list[FakePod]:
        """The pods that exist now in a namespace."""
        return [p for (ns, _), p in self.pods.items() if ns == namespace]

    async def kill_container(self, name: str, namespace: str = "default") -> None:
        """SIGKILL the pod's container (its whole process tree): the pod goes Failed."""
        await self._kill_container(self.pod(name, namespace), signal.SIGKILL)

    async def evict(self, name: str, namespace: str = "default") -> None:
        """Evict the pod as a kubelet under memory pressure does: Failed, reason Evicted."""
        pod = self.pod(name, namespace)
        pod.obj["status"]["reason"] = "Evicted"
        pod.obj["status"]["message"] = "The node was low on resource: memory."
        await self._kill_container(pod, signal.SIGKILL)
        if pod.process is None:
            self._set_phase(pod, "Failed")

    async def delete_pod(
        self, name: str, namespace: str = "default", *, grace: float | None = None
    ) -> None:
        """Delete the pod as `kubectl delete pod` does (its own grace period by default)."""
        pod = self.pod(name, namespace)
        if grace is None:
            grace = float(pod.obj["spec"].get("terminationGracePeriodSeconds", self.default_grace))
        self._begin_delete(pod, grace)

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: a watch from any resourceVersion
        handed out so far gets 410 Expired."""
        self._compacted = int(self._next_rv())
        self._history.clear()

    def garble_next_watch(self) -> None:
        """Make the next watch stream open with a line that is not JSON (a broken proxy)."""
        self._garble = True

    def close_watches(self) -> None:
        """End every open watch stream, as a server-side watch timeout does."""
        self._close_streams()

    # -- the store --------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, kind: str, namespace: str, event: str, obj: Json) -> None:
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._history.append((self._rv, kind, event, json.loads(json.dumps(obj))))
        self._history = self._history[-1000:]
        if len(self._history) == 1000:
            self._compacted = self._history[0][0] - 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _close_streams(self) -> None:
        self._watch_epoch += 1
        self._notify()

    def _set_phase(self, pod: FakePod, phase: str, **status: Any) -> None:
        pod.obj["status"]["phase"] = phase
        pod.obj["status"].update(status)
        self._record("pods", pod.obj["metadata"]["namespace"], "MODIFIED", pod.obj)

    # -- HTTP -------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        self.requests.append((request.method, request.url.path))
        return request.headers.get("authorization") == f"Bearer {self.token}"

    @staticmethod
    def _unauthorized() -> JSONResponse:
        return error(401, "Unauthorized", "Unauthorized")

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error(404, "NotFound", "the server could not find the requested resource")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return error(405, "MethodNotAllowed", "the server does not allow this method")

    async def _list_nodes(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        terms = parse_selector(request.query_params.get("labelSelector", ""))
        items = [n for n in self.nodes if selector_matches(terms, n["metadata"]["labels"])]
        return JSONResponse(
            {
                "kind": "NodeList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        )

    async def _pods(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        ns = request.path_params["ns"]
        if request.method == "POST":
            return await self._create_pod(ns, request)
        terms = parse_selector(request.query_params.get("labelSelector", ""))
        if request.query_params.get("watch", "").lower() in ("true", "1"):
            return self._watch(ns, terms, request)
        items = [
            p.obj
            for (pns, _), p in self.pods.items()
            if pns == ns and selector_matches(terms, p.obj["metadata"].get("labels") or {})
        ]
        return JSONResponse(
            {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        )

    async def _create_pod(self, ns: str, request: Request) -> Response:
        try:
            obj = json.loads(await request.body())
        except ValueError:
            return error(400, "BadRequest", "the request body is not JSON")
        if not isinstance(obj, dict):
            return error(400, "BadRequest", "the request body is not an object")
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace", ns) != ns:
            return error(400, "BadRequest", "the namespace of the provided object does not match")
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
        problems = []
        if not name:
            problems.append("metadata.name: Required value")
        containers = (obj.get("spec") or {}).get("containers") or []
        if not containers:
            problems.append("spec.containers: Required value")
        for i, c in enumerate(containers):
            if not c.get("name"):
                problems.append(f"spec.containers[{i}].name: Required value")
            if not c.get("image"):
                problems.append(f"spec.containers[{i}].image: Required value")
        if problems:
            return error(
                422,
                "Invalid",
                f'Pod "{name}" is invalid: ' + ", ".join(problems),
                name=name,
                kind="Pod",
            )
        if (ns, name) in self.pods:
            return error(
                409, "AlreadyExists", f'pods "{name}" already exists', name=name, kind="pods"
            )
        meta.update(
            name=name,
            namespace=ns,
            uid=str(uuid.uuid4()),
            creationTimestamp=now_rfc3339(),
        )
        obj.update(kind="Pod", apiVersion="v1")
        obj["status"] = {
            "phase": "Pending",
            "qosClass": "Guaranteed",
            "conditions": [],
        }
        pod = FakePod(obj)
        self.pods[(ns, name)] = pod
        self._record("pods", ns, "ADDED", obj)
        assert self._tg is not None
        self._tg.start_soon(self._kubelet, pod)
        return JSONResponse(obj, status_code=201)

    async def _pod(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        ns, name = request.path_params["ns"], request.path_params["name"]
        pod = self.pods.get((ns, name))
        if pod is None:
            return error(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        if request.method == "GET":
            return JSONResponse(pod.obj)
        grace = float(pod.obj["spec"].get("terminationGracePeriodSeconds", self.default_grace))
        body = await request.body()
        if body:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                options = json.loads(body)
                if options.get("gracePeriodSeconds") is not None:
                    grace = float(options["gracePeriodSeconds"])
        if "gracePeriodSeconds" in request.query_params:
            grace = float(request.query_params["gracePeriodSeconds"])
        self._begin_delete(pod, grace)
        return JSONResponse(pod.obj)

    async def _create_secret(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        ns = request.path_params["ns"]
        obj = json.loads(await request.body())
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            return error(422, "Invalid", "Secret is invalid: metadata.name: Required value")
        if (ns, name) in self.secrets:
            return error(
                409, "AlreadyExists", f'secrets "{name}" already exists', name=name, kind="secrets"
            )
        data = dict(obj.get("data") or {})
        for key, value in (obj.pop("stringData", None) or {}).items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj["data"] = data
        obj.update(kind="Secret", apiVersion="v1")
        meta.update(
            namespace=ns,
            uid=str(uuid.uuid4()),
            creationTimestamp=now_rfc3339(),
        )
        self.secrets[(ns, name)] = obj
        self._record("secrets", ns, "ADDED", obj)
        return JSONResponse(obj, status_code=201)

    async def _secret(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        ns, name = request.path_params["ns"], request.path_params["name"]
        obj = self.secrets.get((ns, name))
        if obj is None:
            return error(404, "NotFound", f'secrets "{name}" not found', name=name, kind="secrets")
        if request.method == "DELETE":
            del self.secrets[(ns, name)]
            self._record("secrets", ns, "DELETED", obj)
        return JSONResponse(obj)

    def _watch(
        self, ns: str, terms: list[tuple[str, str, str | None]], request: Request
    ) -> Response:
        rv_text = request.query_params.get("resourceVersion", "")
        timeout = float(request.query_params.get("timeoutSeconds", "0") or 0)
        bookmarks = request.query_params.get("allowWatchBookmarks", "").lower() in ("true", "1")
        start = int(rv_text) if rv_text not in ("", "0") else None
        self.watches_opened += 1
        expired = start is not None and start < self._compacted
        if expired:
            self.expired_watches += 1
            message = f"too old resource version: {start} ({self._compacted})"
            if self.expired_as_http:
                return error(410, "Expired", message)

        def matches(obj: Json) -> bool:
            meta = obj["metadata"]
            return meta.get("namespace") == ns and selector_matches(terms, meta.get("labels") or {})

        def line(event: str, obj: Json) -> bytes:
            return json.dumps({"type": event, "object": obj}).encode() + b"\n"

        garble, self._garble = self._garble, False

        async def stream() -> AsyncIterator[bytes]:
            if garble:
                yield b"<html>502 Bad Gateway</html>\n"
                return
            if expired:
                yield line("ERROR", status_body(410, "Expired", message))
                return
            epoch = self._watch_epoch
            deadline = anyio.current_time() + timeout if timeout > 0 else math.inf
            if start is None:
                # No resourceVersion: the current state as synthetic ADDED events first.
                last = self._rv
                for (pns, _), pod in list(self.pods.items()):
                    if pns == ns and matches(pod.obj):
                        yield line("ADDED", pod.obj)
            else:
                last = start
            while True:
                changed = self._changed
                for rv, kind, event, obj in list(self._history):
                    if rv > last and kind == "pods" and matches(obj):
                        yield line(event, obj)
                if self._history:
                    last = max(last, self._history[-1][0])
                if self._watch_epoch != epoch:
                    return
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await changed.wait()
                    continue
                if bookmarks:
                    yield line(
                        "BOOKMARK",
                        {
                            "kind": "Pod",
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(last)},
                        },
                    )
                return

        return StreamingResponse(stream(), media_type="application/json")

    # -- the kubelet ------------------------------------------------------------------------

    def _fits(self, pod: FakePod, node: Json) -> bool:
        allocatable = {k: quantity(v) for k, v in node["status"]["allocatable"].items()}
        used: dict[str, float] = {}
        for other in self.pods.values():
            here = other.obj["spec"].get("nodeName") == node["metadata"]["name"]
            if other is not pod and here and other.phase in ("Pending", "Running"):
                for k, v in pod_requests(other.obj).items():
                    used[k] = used.get(k, 0.0) + v
        for k, v in pod_requests(pod.obj).items():
            if v > allocatable.get(k, 0.0) - used.get(k, 0.0) + 1e-9:
                return False
        selector = pod.obj["spec"].get("nodeSelector") or {}
        labels = node["metadata"]["labels"]
        return all(labels.get(k) == v for k, v in selector.items()) and not node["spec"].get(
            "unschedulable"
        )

    async def _wait_change(self, pod: FakePod) -> None:
        """Wait for any change to the store, or for the pod's deletion."""
        changed = self._changed
        async with anyio.create_task_group() as tg:

            async def on(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(on, changed)
            tg.start_soon(on, pod.delete_requested)

    def _env(self, pod: FakePod, container: Json) -> dict[str, str] | str:
        """The container's environment, or the reason it cannot be built yet."""
        ns = pod.obj["metadata"]["namespace"]
        env = dict(os.environ)
        env[MARKER] = pod.uid
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
                continue
            source = var.get("valueFrom") or {}
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.secrets.get((ns, ref["name"]))
                if secret is None or ref["key"] not in secret.get("data", {}):
                    return f'secret "{ref["name"]}" not found'
                env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                meta = pod.obj["metadata"]
                values = {
                    "metadata.name": meta["name"],
                    "metadata.namespace": meta["namespace"],
                    "metadata.uid": meta["uid"],
                    "spec.nodeName": pod.obj["spec"].get("nodeName", ""),
                    "status.podIP": "127.0.0.1",
                }
                env[var["name"]] = values.get(path, "")
        return env

    async def _kubelet(self, pod: FakePod) -> None:
        """Schedule, start and watch over one pod until it is gone."""
        ns = pod.obj["metadata"]["namespace"]
        try:
            await self._run_pod(pod)
            await pod.delete_requested.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if pod.process is not None:
                    await self._kill_container(pod, signal.SIGKILL)
                if self.pods.get((ns, pod.name)) is pod:
                    del self.pods[(ns, pod.name)]
                    self._record("pods", ns, "DELETED", pod.obj)
                    self._collect_garbage(ns, pod.uid)
                pod.gone.set()

    async def _run_pod(self, pod: FakePod) -> None:
        """Pending until scheduled and configured, then Running until the process exits."""
        spec = pod.obj["spec"]
        while not pod.delete_requested.is_set():
            node = next((n for n in self.nodes if self._fits(pod, n)), None)
            if node is not None:
                break
            if not pod.obj["status"]["conditions"]:
                pod.obj["status"]["conditions"] = [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": f"0/{len(self.nodes)} nodes are available: "
                        f"{len(self.nodes)} Insufficient resources.",
                    }
                ]
                self._set_phase(pod, "Pending")
            await self._wait_change(pod)
        else:
            return
        spec["nodeName"] = node["metadata"]["name"]
        pod.obj["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        self._set_phase(pod, "Pending")
        container = spec["containers"][0]
        bad_image = self.bad_images.get(container["image"])
        if bad_image is not None:
            # The kubelet cannot get the image: the pod waits, Pending, until deleted.
            pod.obj["status"]["containerStatuses"] = [
                {
                    "name": container["name"],
                    "ready": False,
                    "restartCount": 0,
                    "image": container["image"],
                    "state": {"waiting": {"reason": bad_image, "message": "cannot pull"}},
                }
            ]
            self._set_phase(pod, "Pending")
            return
        while not pod.delete_requested.is_set():
            env = self._env(pod, container)
            if isinstance(env, dict):
                break
            pod.obj["status"]["containerStatuses"] = [
                {
                    "name": container["name"],
                    "ready": False,
                    "restartCount": 0,
                    "image": container["image"],
                    "state": {"waiting": {"reason": "CreateContainerConfigError", "message": env}},
                }
            ]
            self._set_phase(pod, "Pending")
            await self._wait_change(pod)
        else:
            return
        command = list(container.get("command") or []) + list(container.get("args") or [])
        pod.log_path = self._logs / f"{pod.name}.log"
        with pod.log_path.open("wb") as log:
            try:
                pod.process = await anyio.open_process(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                self._terminate(pod, 128, "StartError", str(exc))
                return
        started = now_rfc3339()
        pod.obj["status"].update(
            podIP="127.0.0.1",
            startTime=started,
            containerStatuses=[
                {
                    "name": container["name"],
                    "ready": True,
                    "restartCount": 0,
                    "image": container["image"],
                    "started": True,
                    "state": {"running": {"startedAt": started}},
                }
            ],
        )
        self._set_phase(pod, "Running")
        process = pod.process
        async with anyio.create_task_group() as tg:

            async def stop_on_delete() -> None:
                # Deleted: TERM the container, KILL it after the grace period.
                await pod.delete_requested.wait()
                await self._kill_container(pod, signal.SIGTERM)
                with anyio.move_on_after(pod.grace):
                    await process.wait()
                await self._kill_container(pod, signal.SIGKILL)

            tg.start_soon(stop_on_delete)
            code = await process.wait()
            tg.cancel_scope.cancel()
        # The main process ended: the container ends with it, every process in it.
        await self._kill_container(pod, signal.SIGKILL)
        exit_code = code if code >= 0 else 128 - code
        if exit_code == 0:
            self._terminate(pod, 0, "Completed", "")
        else:
            self._terminate(pod, exit_code, "Error", "")

    def _terminate(self, pod: FakePod, exit_code: int, reason: str, message: str) -> None:
        container = pod.obj["spec"]["containers"][0]
        pod.obj["status"]["containerStatuses"] = [
            {
                "name": container["name"],
                "ready": False,
                "restartCount": 0,
                "image": container["image"],
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason,
                        "message": message,
                        "finishedAt": now_rfc3339(),
                    }
                },
            }
        ]
        self._set_phase(pod, "Succeeded" if exit_code == 0 else "Failed")

    def _begin_delete(self, pod: FakePod, grace: float) -> None:
        if pod.delete_requested.is_set():
            return
        pod.grace = grace
        pod.obj["metadata"]["deletionTimestamp"] = now_rfc3339()
        pod.obj["metadata"]["deletionGracePeriodSeconds"] = int(grace)
        self._record("pods", pod.obj["metadata"]["namespace"], "MODIFIED", pod.obj)
        pod.delete_requested.set()

    def _collect_garbage(self, ns: str, owner_uid: str) -> None:
        """Delete the secrets the gone pod owned, as the garbage collector does."""
        for key, obj in list(self.secrets.items()):
            owners = obj["metadata"].get("ownerReferences") or []
            if key[0] == ns and any(o.get("uid") == owner_uid for o in owners):
                del self.secrets[key]
                self._record("secrets", ns, "DELETED", obj)

    async def _kill_container(self, pod: FakePod, sig: signal.Signals) -> None:
        """Signal every process of the pod's container (found by their marker variable)."""
        if pod.process is None:
            return
        if sig == signal.SIGTERM:
            with contextlib.suppress(ProcessLookupError):
                pod.process.send_signal(sig)
            return
        main = pod.process.pid if pod.process.returncode is None else None
        await anyio.to_thread.run_sync(_kill_marked, pod.uid, main)


def _kill_marked(uid: str, main_pid: int | None) -> None:
    """SIGKILL the main process and every process whose environment carries the pod's marker."""
    if main_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(main_pid, signal.SIGKILL)
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == uid:
                proc.kill()
        except psutil.Error:
            continue
