"""KubernetesCluster: each alloc is a pod running `packsched agent`.

Allocating creates a pod sized to the request (requests equal to limits, so the pod is
Guaranteed and the last to be evicted), labelled `app.kubernetes.io/managed-by=packsched` and
`packsched.io/alloc-id=<id>`, whose one container runs `packsched agent --server URL`. The
alloc is live when that agent registers with the daemon (`AgentCluster`). The agent token
travels in a Secret per pod, owned by the pod so that the garbage collector removes it with the
pod, and read by the container through `secretKeyRef`: it never appears in the pod spec, which
far more people can read than secrets.

The pods are watched (one watch stream on the label selector, resumed from the last
resourceVersion when it ends and re-listed on 410 Gone), so that a pod that fails, is evicted
or is deleted makes its alloc's next keepalive fail at once rather than when the lease runs
out. Freeing deletes the pod. The shapes on offer are configured, or read from the nodes'
allocatable resources.

kubernetes_asyncio (the `kubernetes` extra) is imported only when the cluster starts. The
daemon's service account needs, in its namespace, pods: create, get, list, watch, delete and
secrets: create; and nodes: list (cluster-wide) unless the shapes are configured.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import importlib
import math
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import msgspec

from ..alloc.remote import AgentCluster, LeaseConfig, RemoteAlloc
from ..errors import AllocationError, PackschedError
from ..log import get_logger
from ..resources import AllocShape, MiB, Requirements, Resources
from .base import Alloc

__all__ = [
    "ALLOC_ID_LABEL",
    "CLUSTER_LABEL",
    "MANAGED_BY_LABEL",
    "KubernetesApiError",
    "KubernetesCluster",
    "build_pod",
    "format_cpu",
    "node_resources",
    "parse_quantity",
    "pod_gone_reason",
    "pod_name",
    "pod_resources",
]

log = get_logger("packsched.kubernetes")

Json = dict[str, Any]

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
ALLOC_ID_LABEL = "packsched.io/alloc-id"
CLUSTER_LABEL = "packsched.io/cluster"
GPU_RESOURCE = "nvidia.com/gpu"
TOKEN_KEY = "token"
CONTAINER_NAME = "agent"
_IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# -- quantities ---------------------------------------------------------------------------------

_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$"
)
# Decimal, so that `3800m` is exactly 3.8 cores and not 3.8000000000000003.
_SUFFIX = {
    None: Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(value: str | int | float, *, field: str = "quantity") -> float:
    """A Kubernetes resource quantity as a number: `3800m` -> 3.8, `16Gi`, `1e3`, `12E`.

    Raises:
        ValueError: naming `field`, when the text is not a quantity.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise ValueError(f"{field} is not a Kubernetes quantity: {value!r}")
    number, exponent, suffix = match.groups()
    scale = Decimal(10) ** int(exponent[1:]) if exponent else _SUFFIX[suffix]
    return float(Decimal(number) * scale)


def format_cpu(cores: float) -> str:
    """Cores as Kubernetes writes them: whole cores as `2`, else millicores rounded up (`1500m`)."""
    millis = math.ceil(round(cores * 1000, 6))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def pod_resources(resources: Resources) -> dict[str, str]:
    """The container resources (requests and limits alike) for an alloc of `resources`.

    `extra` dimensions whose names look like Kubernetes extended resources (`vendor/name`) are
    passed on, rounded up to whole units; other extras are packsched's own and are not.
    """
    out = {"cpu": format_cpu(resources.cpu), "memory": str(resources.mem)}
    if resources.disk:
        out["ephemeral-storage"] = str(resources.disk)
    if resources.gpu:
        out[GPU_RESOURCE] = str(resources.gpu)
    for name, amount in resources.extra.items():
        if "/" in name and amount > 0:
            out[name] = str(math.ceil(amount - 1e-9))
    return out


def node_resources(node: Mapping[str, Any]) -> Resources:
    """What a Node object says its pods may use (`status.allocatable`).

    Extended resources (`vendor/name`) other than NVIDIA GPUs become `extra` dimensions of
    the same name, matching what `pod_resources` passes on.

    Raises:
        ValueError: a quantity is malformed (the message names it).
    """
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    name = (node.get("metadata") or {}).get("name", "?")

    def get(key: str) -> float:
        if key not in allocatable:
            return 0.0
        return parse_quantity(allocatable[key], field=f"node {name} allocatable {key}")

    return Resources(
        cpu=get("cpu"),
        mem=math.floor(get("memory")),
        disk=math.floor(get("ephemeral-storage")),
        gpu=math.floor(get(GPU_RESOURCE)),
        extra={k: get(k) for k in allocatable if "/" in k and k != GPU_RESOURCE and get(k) > 0},
    )


# -- the pod ------------------------------------------------------------------------------------


def pod_name(alloc_id: str) -> str:
    """The pod of an alloc: `packsched-<alloc id>`, a valid DNS-1123 name."""
    return "packsched-" + re.sub(r"[^a-z0-9-]", "-", alloc_id.lower())[:50].strip("-")


def _merge(base: Any, override: Any) -> Any:
    """Deep-merge `override` into `base`: mappings merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, Mapping):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def build_pod(
    *,
    name: str,
    namespace: str,
    alloc_id: str,
    cluster_name: str,
    image: str,
    command: Sequence[str],
    server_url: str,
    env: Mapping[str, str],
    resources: Resources,
    token_secret: str | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    service_account: str | None = None,
    image_pull_policy: str | None = None,
    termination_grace: float = 30.0,
    pod_overrides: Mapping[str, Any] | None = None,
    container_overrides: Mapping[str, Any] | None = None,
) -> Json:
    """The Pod manifest of one alloc (pure: no I/O).

    `env` is the agent's environment; `PACKSCHED_AGENT_TOKEN` in it is replaced by a
    `secretKeyRef` into `token_secret` when one is named. The overrides are deep-merged last,
    but the labels that identify the pod and the agent's command always win.
    """
    identity = {
        MANAGED_BY_LABEL: "packsched",
        ALLOC_ID_LABEL: alloc_id,
        CLUSTER_LABEL: cluster_name,
    }
    env_list: list[Json] = []
    for key, value in env.items():
        if key == "PACKSCHED_AGENT_TOKEN" and token_secret is not None:
            env_list.append(
                {
                    "name": key,
                    "valueFrom": {"secretKeyRef": {"name": token_secret, "key": TOKEN_KEY}},
                }
            )
        else:
            env_list.append({"name": key, "value": value})
    sized = pod_resources(resources)
    container: Json = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": list(command),
        "args": ["--server", server_url],
        "env": env_list,
        "resources": {"requests": dict(sized), "limits": dict(sized)},
    }
    if image_pull_policy:
        container["imagePullPolicy"] = image_pull_policy
    if container_overrides:
        container = _merge(container, container_overrides)
        container.update(name=CONTAINER_NAME, command=list(command))
    spec: Json = {
        # The agent must not be restarted in place: a second agent for one alloc cannot know
        # what the first one ran, so a dead agent must end the pod and its alloc.
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": math.ceil(termination_grace),
        # The agent needs no Kubernetes API and no service links in its tasks' environment.
        "enableServiceLinks": False,
        "containers": [container],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    else:
        spec["automountServiceAccountToken"] = False
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    pod: Json = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**(labels or {}), **identity},
            "annotations": dict(annotations or {}),
        },
        "spec": spec,
    }
    if pod_overrides:
        pod = _merge(pod, pod_overrides)
        pod["metadata"]["labels"] = {**(pod["metadata"].get("labels") or {}), **identity}
        pod["metadata"].update(name=name, namespace=namespace)
        pod["spec"]["restartPolicy"] = "Never"
    return pod


def build_token_secret(
    *, name: str, namespace: str, alloc_id: str, cluster_name: str, token: str, owner: Json
) -> Json:
    """The Secret holding an alloc's agent token, owned by its pod (collected with it)."""
    meta = owner["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                MANAGED_BY_LABEL: "packsched",
                ALLOC_ID_LABEL: alloc_id,
                CLUSTER_LABEL: cluster_name,
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "stringData": {TOKEN_KEY: token},
    }


def pod_gone_reason(pod: Mapping[str, Any] | None) -> str | None:
    """Why a pod can no longer hold an alloc, or None while it can.

    A pod is gone once it is missing, being deleted, or has ended (Failed, Succeeded): with
    `restartPolicy: Never` none of these comes back.
    """
    if pod is None:
        return "the pod no longer exists"
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = meta.get("name", "?")
    if meta.get("deletionTimestamp"):
        return f"pod {name} is being deleted"
    phase = status.get("phase")
    if phase not in ("Failed", "Succeeded"):
        return None
    parts = [f"pod {name} {'failed' if phase == 'Failed' else 'ended'}"]
    if status.get("reason"):
        parts.append(f"({status['reason']}: {status.get('message') or 'no message'})")
    for cs in status.get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated:
            parts.append(
                f"container {cs.get('name')} exited with {terminated.get('exitCode')}"
                f" ({terminated.get('reason') or 'no reason'})"
            )
    return "; ".join(parts)


def pod_pending_detail(pod: Mapping[str, Any]) -> str:
    """Why a pod is still Pending, as the scheduler and kubelet say (for messages)."""
    status = pod.get("status") or {}
    details = []
    for cond in status.get("conditions") or []:
        if cond.get("status") == "False" and cond.get("reason"):
            details.append(f"{cond['reason']}: {cond.get('message', '')}".strip(": "))
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            details.append(f"{waiting['reason']}: {waiting.get('message', '')}".strip(": "))
    return "; ".join(details) or f"phase {status.get('phase', 'unknown')}"


# The alloc id `_launch` is creating a pod for, seen by `allocate` in the same task.
_launching: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "packsched_kubernetes_launching", default=None
)

# Waiting reasons that no amount of waiting fixes: the allocation fails at once.
_FATAL_WAITING = frozenset({"InvalidImageName", "ErrImageNeverPull"})


# -- the API ------------------------------------------------------------------------------------


class KubernetesApiError(PackschedError):
    """The Kubernetes API refused a call, or could not be reached (`code` 0).

    Attributes:
        code: the HTTP status (404, 409, 410, ...), or 0 when the server was unreachable.
        reason: the Status reason (`NotFound`, `AlreadyExists`, `Expired`, ...).
    """

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"Kubernetes API: {code} {reason}: {message}")
        self.code = code
        self.reason = reason


class _Status(msgspec.Struct, kw_only=True):
    """The part of a `Status` object packsched reads (Kubernetes objects carry many more
    fields, so unknown fields are accepted here, unlike in packsched's own wire types)."""

    code: int = 0
    reason: str = ""
    message: str = ""


_status_decoder = msgspec.json.Decoder(_Status)
_json_decoder = msgspec.json.Decoder(dict[str, Any])


def _api_error(status: int, body: bytes) -> KubernetesApiError:
    try:
        parsed = _status_decoder.decode(body)
    except msgspec.MsgspecError:
        return KubernetesApiError(status, "Unknown", body[:200].decode(errors="replace"))
    return KubernetesApiError(status, parsed.reason or "Unknown", parsed.message)


class _KubeApi:
    """The handful of core/v1 calls the cluster makes, over kubernetes_asyncio's client.

    Responses are read raw (`_preload_content=False`) and decoded as plain JSON: packsched
    needs a few fields, not the client's model objects, and a watch stream is read line by line.
    """

    def __init__(self, core: Any, api_client: Any, request_timeout: float) -> None:
        self._core = core
        self._api_client = api_client
        self._timeout = request_timeout

    async def aclose(self) -> None:
        await self._api_client.close()

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Json:
        kwargs.setdefault("_request_timeout", self._timeout)
        try:
            resp = await getattr(self._core, method)(*args, _preload_content=False, **kwargs)
            try:
                body = await resp.read()
            finally:
                resp.release()
        except KubernetesApiError:
            raise
        except Exception as exc:  # aiohttp's and the client's errors: the server is unreachable
            raise KubernetesApiError(0, "Unreachable", repr(exc)) from exc
        if not 200 <= resp.status < 300:
            raise _api_error(resp.status, body)
        return _json_decoder.decode(body)

    async def create_pod(self, namespace: str, body: Json) -> Json:
        return await self._call("create_namespaced_pod", namespace, body)

    async def get_pod(self, namespace: str, name: str) -> Json | None:
        try:
            return await self._call("read_namespaced_pod", name, namespace)
        except KubernetesApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def delete_pod(self, namespace: str, name: str, grace: float | None) -> None:
        body = {} if grace is None else {"gracePeriodSeconds": math.ceil(grace)}
        try:
            await self._call("delete_namespaced_pod", name, namespace, body=body)
        except KubernetesApiError as exc:
            if exc.code != 404:
                raise

    async def create_secret(self, namespace: str, body: Json) -> Json:
        return await self._call("create_namespaced_secret", namespace, body)

    async def list_pods(self, namespace: str, selector: str) -> tuple[list[Json], str]:
        out = await self._call("list_namespaced_pod", namespace, label_selector=selector)
        return list(out.get("items") or []), str(
            (out.get("metadata") or {}).get("resourceVersion", "")
        )

    async def list_nodes(self) -> list[Json]:
        out = await self._call("list_node")
        return list(out.get("items") or [])

    async def watch_pods(
        self, namespace: str, selector: str, resource_version: str, timeout: int
    ) -> AsyncIterator[Json]:
        """The events of one watch stream, until the server ends it."""
        aiohttp = importlib.import_module("aiohttp")
        try:
            resp = await self._core.list_namespaced_pod(
                namespace,
                label_selector=selector,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _preload_content=False,
                # No total limit: a watch lasts `timeout`; but a silent stream is a dead one.
                _request_timeout=aiohttp.ClientTimeout(
                    total=None, connect=self._timeout, sock_read=timeout + self._timeout
                ),
            )
        except Exception as exc:
            raise KubernetesApiError(0, "Unreachable", repr(exc)) from exc
        try:
            if not 200 <= resp.status < 300:
                raise _api_error(resp.status, await resp.read())
            while True:
                try:
                    line = await resp.content.readline()
                except Exception as exc:
                    raise KubernetesApiError(0, "Unreachable", repr(exc)) from exc
                if not line:
                    return
                if line.strip():
                    yield _json_decoder.decode(line)
        finally:
            resp.release()


# -- the cluster --------------------------------------------------------------------------------


def _tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Whether one of the tolerations tolerates the taint (the Kubernetes matching rules)."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t.get("key") == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


class KubernetesCluster(AgentCluster):
    """Allocs are pods running `packsched agent`, in one namespace of a Kubernetes cluster.

    Use it as `async with KubernetesCluster(...) as cluster:` (or let the daemon start it): it
    loads the client config, reads the nodes when no shapes are configured, and watches its
    pods. Without the watch (started but not entered), keepalives share one pod list per
    `poll_interval` instead.

    Args:
        image: the container image; it must have `packsched` installed.
        namespace: where pods go (default: the kubeconfig context's, the pod's own when
            in-cluster, else `default`).
        kubeconfig: the kubeconfig file (default `$KUBECONFIG` or `~/.kube/config`).
        context: the kubeconfig context (default the current one).
        in_cluster: use the service account of the pod the daemon runs in (default: when no
            kubeconfig file is found).
        server_url: where agents reach the daemon; a pod cannot use loopback, so this is the
            daemon's Service or routable address.
        agent_command: the container's command; `--server URL` is added as args.
        shapes: the alloc shapes on offer, as what tasks get (each pod asks for `overhead`
            more); default one per distinct node allocatable (less `overhead`) of the
            schedulable nodes the pods may go to.
        overhead: resources added to every pod beyond what its tasks get, for the agent itself.
        labels, annotations: added to every pod.
        node_selector, tolerations, service_account, image_pull_policy: of every pod.
        pod_overrides: deep-merged into every Pod manifest (`{"spec": {"priorityClassName":
            "batch"}}`); container_overrides: into the agent container.
        token_secret: carry the agent token in a Secret per pod (default); False puts it in
            the pod's env (for service accounts that may not create secrets).
        termination_grace: seconds a deleted pod's agent has to stop its tasks.
        name: this daemon's name among others in the namespace (label `packsched.io/cluster`).
        lease, agent_token: as for `AgentCluster`.
        request_timeout: seconds for one API call; watch_timeout: seconds one watch stream
            lasts before it is resumed; poll_interval: without a watch, the longest a pod
            list is trusted by keepalives.
    """

    provider = "kubernetes"

    def __init__(
        self,
        image: str,
        *,
        namespace: str | None = None,
        kubeconfig: str | Path | None = None,
        context: str | None = None,
        in_cluster: bool | None = None,
        server_url: str | None = None,
        agent_command: Sequence[str] = ("packsched", "agent"),
        shapes: Sequence[AllocShape] | None = None,
        overhead: Resources = Resources(cpu=0.1, mem=256 * MiB),  # noqa: B008 - immutable
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        node_selector: Mapping[str, str] | None = None,
        tolerations: Sequence[Mapping[str, Any]] = (),
        service_account: str | None = None,
        image_pull_policy: str | None = None,
        pod_overrides: Mapping[str, Any] | None = None,
        container_overrides: Mapping[str, Any] | None = None,
        token_secret: bool = True,
        termination_grace: float = 30.0,
        name: str = "packsched",
        lease: LeaseConfig | None = None,
        agent_token: str | None = None,
        request_timeout: float = 30.0,
        watch_timeout: int = 300,
        poll_interval: float = 1.0,
    ) -> None:
        super().__init__(lease=lease, agent_token=agent_token, server_url=server_url)
        if not image:
            raise ValueError("image must name a container image with packsched installed")
        if not agent_command:
            raise ValueError("agent_command must not be empty")
        if shapes is not None and not shapes:
            raise ValueError("shapes must not be empty (leave it None to read the nodes)")
        if watch_timeout < 1:
            raise ValueError(f"watch_timeout must be >= 1 second, got {watch_timeout!r}")
        for key, value in {**(labels or {}), **(node_selector or {})}.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"labels and node_selector map strings to strings: {key!r}")
        self.image = image
        self.namespace = namespace
        self.kubeconfig = Path(kubeconfig) if kubeconfig is not None else None
        self.context = context
        self.in_cluster = in_cluster
        self.agent_command = tuple(agent_command)
        self.overhead = overhead
        self.pod_labels = dict(labels or {})
        self.annotations = dict(annotations or {})
        self.node_selector = dict(node_selector or {})
        self.tolerations = [dict(t) for t in tolerations]
        self.service_account = service_account
        self.image_pull_policy = image_pull_policy
        self.pod_overrides = dict(pod_overrides or {})
        self.container_overrides = dict(container_overrides or {})
        self.token_secret = token_secret
        self.termination_grace = termination_grace
        self.name = name
        self.request_timeout = request_timeout
        self.watch_timeout = watch_timeout
        self.poll_interval = poll_interval
        self._configured_shapes = list(shapes) if shapes is not None else None
        self._node_shapes: list[AllocShape] = []
        self._api: _KubeApi | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._tg_cm: Any = None
        # alloc id -> pod name of every pod this cluster tracks, and the latest state seen.
        self._pods: dict[str, str] = {}
        self._seen: dict[str, Json | None] = {}
        self._watching = False
        self._never_ran: dict[str, str] = {}  # alloc id -> what its deleted pod waited for
        self._poll_lock = anyio.Lock()
        self._polled_at = -math.inf
        self.watch_restarts = 0  # streams resumed from a resourceVersion
        self.relists = 0  # full re-lists after a 410 or an error

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def selector(self) -> str:
        """The label selector of this cluster's pods."""
        return f"{MANAGED_BY_LABEL}=packsched,{CLUSTER_LABEL}={self.name}"

    async def start(self, server_url: str | None = None) -> None:
        """Load the client config, resolve the namespace and read the nodes (once).

        Raises:
            AllocationError: the `kubernetes` extra is missing, the config cannot be loaded,
                or no node can take a pod and no shapes are configured.
        """
        await super().start(server_url)
        if self._api is not None:
            return
        host = urllib.parse.urlsplit(self.server_url or "").hostname or ""
        if host in ("localhost", "::1") or host.startswith("127."):
            log.warning(
                "agents in pods cannot reach a loopback address unless the pods share this "
                "host's network: set server_url (the daemon's Service) for a real cluster",
                server_url=self.server_url,
            )
        try:
            kclient: Any = importlib.import_module("kubernetes_asyncio.client")
            kconfig: Any = importlib.import_module("kubernetes_asyncio.config")
        except ImportError as exc:
            raise AllocationError(
                "KubernetesCluster needs kubernetes_asyncio: pip install 'packsched[kubernetes]'"
            ) from exc
        configuration = kclient.Configuration()
        in_cluster = self.in_cluster
        path = self.kubeconfig
        if in_cluster is None:
            in_cluster = path is None and not await anyio.to_thread.run_sync(_default_kubeconfig)
        try:
            if in_cluster:
                kconfig.load_incluster_config(client_configuration=configuration)
            else:
                await kconfig.load_kube_config(
                    config_file=str(path) if path is not None else None,
                    context=self.context,
                    client_configuration=configuration,
                )
        except Exception as exc:
            where = "the in-cluster service account" if in_cluster else (path or "the kubeconfig")
            raise AllocationError(f"cannot load the Kubernetes config from {where}: {exc}") from exc
        if self.namespace is None:
            self.namespace = await anyio.to_thread.run_sync(
                functools.partial(_config_namespace, kconfig, in_cluster, path, self.context)
            )
        api_client = kclient.ApiClient(configuration=configuration)
        self._api = _KubeApi(kclient.CoreV1Api(api_client), api_client, self.request_timeout)
        try:
            if self._configured_shapes is None:
                await self.refresh_nodes()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._api.aclose()
            self._api = None
            raise

    async def __aenter__(self) -> KubernetesCluster:
        await self.start()
        self._tg_cm = anyio.create_task_group()
        self._tg = await self._tg_cm.__aenter__()
        self._tg.start_soon(self._watch_pods)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Free what is still tracked, stop the watch and close the API client."""
        with anyio.CancelScope(shield=True):
            await super().aclose()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            tg_cm, self._tg = self._tg_cm, None
            await tg_cm.__aexit__(None, None, None)
        if self._api is not None:
            with anyio.CancelScope(shield=True):
                await self._api.aclose()
            self._api = None

    def api(self) -> _KubeApi:
        """The API client; the cluster must have been started."""
        if self._api is None:
            raise AllocationError(
                "KubernetesCluster is not started: use `async with KubernetesCluster(...)` "
                "or await start() first"
            )
        return self._api

    # -- shapes -----------------------------------------------------------------------------

    async def refresh_nodes(self) -> list[AllocShape]:
        """Read the nodes and derive the shapes on offer from those the pods may go to.

        Raises:
            AllocationError: no schedulable node matches the node selector and tolerations.
        """
        nodes = await self.api().list_nodes()
        by_size: dict[bytes, AllocShape] = {}
        for node in nodes:
            meta, spec = node.get("metadata") or {}, node.get("spec") or {}
            labels = meta.get("labels") or {}
            if spec.get("unschedulable"):
                continue
            if any(labels.get(k) != v for k, v in self.node_selector.items()):
                continue
            taints = [
                t
                for t in spec.get("taints") or []
                if t.get("effect") in ("NoSchedule", "NoExecute")
            ]
            if any(not _tolerates(self.tolerations, t) for t in taints):
                continue
            try:
                size = node_resources(node) - self.overhead
            except ValueError as exc:
                log.warning("skipping a node with a malformed allocatable", error=str(exc))
                continue
            if size.is_zero():
                continue
            by_size.setdefault(
                msgspec.json.encode(size),
                AllocShape(resources=size, name=str(meta.get("name", ""))),
            )
        if not by_size:
            raise AllocationError(
                f"no schedulable node of the {len(nodes)} in the cluster matches the node "
                f"selector {self.node_selector or '{}'} and tolerations; configure shapes to "
                f"allocate from nodes an autoscaler will add"
            )
        self._node_shapes = list(by_size.values())
        return self._node_shapes

    def shapes(self) -> Sequence[AllocShape]:
        """The configured shapes, else one per distinct node size (read at start)."""
        if self._configured_shapes is not None:
            return self._configured_shapes
        if not self._node_shapes:
            raise AllocationError(
                "KubernetesCluster has not read its nodes yet: start it first, or configure shapes"
            )
        return self._node_shapes

    def _grant(self, requirements: Requirements) -> Resources:
        """At least `min`; up to `full` as far as the smallest shape that holds most of it."""
        need, full = requirements.min, requirements.full
        fitting = [s.resources for s in self.shapes() if need.fits_in(s.resources)]
        if not fitting:
            too_big = ", ".join(need.exceeding(self.max_alloc()))
            raise AllocationError(
                f"no node can hold an alloc of {need.describe()} (too much {too_big}); the "
                f"largest on offer is {self.max_alloc().describe()}"
            )
        holding_full = [r for r in fitting if full.fits_in(r)]
        if holding_full:
            return full
        best = max(fitting, key=lambda r: sum(min(1.0, s) for s in r.shares(full).values()))
        return need.max(full.min(best))

    # -- pods -------------------------------------------------------------------------------

    async def allocate(self, requirements: Requirements, labels: Mapping[str, str]) -> Alloc:
        """A pod for an alloc of at least `requirements.min`, returned once its agent registered.

        Raises:
            AllocationError: the pod could not be created, failed, or its agent did not
                register in time; the message says what the pod was waiting for (an
                Unschedulable pod names the resources no node had).
        """
        token = _launching.set(None)
        try:
            return await super().allocate(requirements, labels)
        except AllocationError as exc:
            alloc_id = _launching.get()
            detail = self._never_ran.pop(alloc_id, None) if alloc_id else None
            if detail is None:
                raise
            raise AllocationError(f"{exc}; {detail}") from exc
        finally:
            self._never_ran.pop(_launching.get() or "", None)
            _launching.reset(token)

    async def _launch(self, alloc: RemoteAlloc) -> None:
        """Create the alloc's pod (and the Secret with its token) and set its hooks."""
        # `allocate` runs this in its own task: the id tells it which pod a failure was about.
        _launching.set(alloc.id)
        api = self.api()
        assert self.namespace is not None and self.server_url is not None
        name = pod_name(alloc.id)
        alloc.labels["kubernetes.namespace"] = self.namespace
        alloc.labels["kubernetes.pod"] = name
        env = self.agent_env(alloc.id)
        manifest = build_pod(
            name=name,
            namespace=self.namespace,
            alloc_id=alloc.id,
            cluster_name=self.name,
            image=self.image,
            command=self.agent_command,
            server_url=self.server_url,
            env=env,
            resources=alloc.resources + self.overhead,
            token_secret=name if self.token_secret else None,
            labels=self.pod_labels,
            annotations=self.annotations,
            node_selector=self.node_selector,
            tolerations=self.tolerations,
            service_account=self.service_account,
            image_pull_policy=self.image_pull_policy,
            termination_grace=self.termination_grace,
            pod_overrides=self.pod_overrides,
            container_overrides=self.container_overrides,
        )
        self._track(alloc)
        try:
            pod = await api.create_pod(self.namespace, manifest)
        except KubernetesApiError as exc:
            raise AllocationError(f"could not create pod {name}: {exc}") from exc
        # The Secret comes after the pod so that it can be owned by it: the kubelet waits
        # for a missing secret (CreateContainerConfigError) and starts the container once it
        # exists, and the garbage collector removes it with the pod even if the daemon dies.
        if self.token_secret:
            secret = build_token_secret(
                name=name,
                namespace=self.namespace,
                alloc_id=alloc.id,
                cluster_name=self.name,
                token=env["PACKSCHED_AGENT_TOKEN"],
                owner=pod,
            )
            try:
                await api.create_secret(self.namespace, secret)
            except KubernetesApiError as exc:
                raise AllocationError(
                    f"could not create secret {name} for pod {name}: {exc}"
                ) from exc
        log.info("pod created", alloc_id=alloc.id, pod=name, namespace=self.namespace)

    def _track(self, alloc: RemoteAlloc) -> None:
        name = alloc.labels["kubernetes.pod"]
        self._pods[alloc.id] = name
        self._seen[alloc.id] = {}
        alloc.check = functools.partial(self._check, alloc.id)
        alloc.teardown = functools.partial(self._teardown, alloc.id)

    async def _check(self, alloc_id: str) -> str | None:
        """Why the alloc's pod is gone (or hopeless while pending), or None while it lives."""
        name = self._pods.get(alloc_id)
        if name is None:
            return f"alloc {alloc_id} has no pod"
        if not self._watching:
            try:
                await self._poll_pods()
            except KubernetesApiError as exc:
                log.warning("cannot list pods", alloc_id=alloc_id, error=str(exc))
                return None  # the lease decides while the API is unreachable
        pod = self._seen.get(alloc_id)
        if pod == {}:
            return None  # created, not seen yet
        reason = pod_gone_reason(pod)
        if reason is None and pod is not None:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in _FATAL_WAITING:
                    reason = f"pod {name} cannot start: {pod_pending_detail(pod)}"
        if reason is not None and pod is None:
            reason = f"pod {name} was deleted"
        return reason

    async def _poll_pods(self) -> None:
        """Without a watch: list this cluster's pods, at most every `poll_interval` seconds,
        one call for every alloc (as a watch would, but later)."""
        async with self._poll_lock:
            if time.monotonic() - self._polled_at < self.poll_interval:
                return
            pods, _ = await self.api().list_pods(self.namespace or "default", self.selector)
            self._polled_at = time.monotonic()
            self._resync(pods)

    async def _teardown(self, alloc_id: str) -> None:
        """Delete the alloc's pod (its Secret goes with it) and stop tracking it."""
        name = self._pods.get(alloc_id)
        if name is None:
            return
        seen = self._seen.get(alloc_id)
        if seen and seen.get("status", {}).get("phase") == "Pending":
            why = pod_pending_detail(seen)
            self._never_ran[alloc_id] = f"pod {name} was still Pending ({why})"
            log.info("deleting a pod that never ran", pod=name, why=why)
        try:
            with anyio.fail_after(self.request_timeout * 2):
                await self.api().delete_pod(self.namespace or "default", name, None)
        except (KubernetesApiError, TimeoutError, AllocationError) as exc:
            # The pod is left behind: say so loudly, its owner must delete it.
            log.error("could not delete pod", alloc_id=alloc_id, pod=name, error=str(exc))
        finally:
            self._pods.pop(alloc_id, None)
            self._seen.pop(alloc_id, None)

    async def _relaunch(self, alloc: RemoteAlloc) -> bool:
        """Take back the pod named in the alloc's labels if it still runs."""
        name = alloc.labels.get("kubernetes.pod")
        if not name:
            return False
        try:
            pod = await self.api().get_pod(
                alloc.labels.get("kubernetes.namespace") or self.namespace or "default", name
            )
        except KubernetesApiError as exc:
            log.warning("cannot read pod to re-attach", alloc_id=alloc.id, error=str(exc))
            return False
        reason = pod_gone_reason(pod)
        if reason is not None:
            log.info("not re-attaching alloc", alloc_id=alloc.id, reason=reason)
            return False
        self._track(alloc)
        self._seen[alloc.id] = pod
        return True

    # -- the watch --------------------------------------------------------------------------

    def _observe(self, event: str, pod: Json) -> None:
        """Record what a watch event says of one of our pods; a gone pod kills its alloc."""
        alloc_id = ((pod.get("metadata") or {}).get("labels") or {}).get(ALLOC_ID_LABEL)
        if alloc_id is None or alloc_id not in self._pods:
            return
        if (pod.get("metadata") or {}).get("name") != self._pods[alloc_id]:
            return
        self._seen[alloc_id] = None if event == "DELETED" else pod
        self._kill_if_gone(alloc_id)

    def _kill_if_gone(self, alloc_id: str) -> None:
        pod = self._seen.get(alloc_id)
        if pod == {}:
            return
        reason = pod_gone_reason(pod)
        alloc = self.registry.get(alloc_id)
        if reason is None or alloc is None or alloc.exiting:
            return
        if pod is None:
            reason = f"pod {self._pods[alloc_id]} was deleted"
        alloc.die(reason)

    async def _watch_pods(self) -> None:
        """Keep `_seen` current: list, then watch from the list's resourceVersion; resume from
        the last one seen when a stream ends, re-list when it is too old (410) or on errors."""
        api = self.api()
        assert self.namespace is not None
        version: str | None = None
        backoff = 0.2
        try:
            while True:
                try:
                    if version is None:
                        pods, version = await api.list_pods(self.namespace, self.selector)
                        self.relists += 1
                        self._resync(pods)
                        self._watching = True
                    async for event in api.watch_pods(
                        self.namespace, self.selector, version, self.watch_timeout
                    ):
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            raise _api_error(int(obj.get("code") or 500), msgspec.json.encode(obj))
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if kind in ("ADDED", "MODIFIED", "DELETED"):
                            self._observe(kind, obj)
                    self.watch_restarts += 1
                    backoff = 0.2
                except Exception as exc:
                    if isinstance(exc, KubernetesApiError) and exc.code == 410:
                        log.info("pod watch expired; listing again", error=str(exc))
                        version = None
                        continue
                    # Anything else (the API unreachable, a malformed event) must not end the
                    # watch, nor the daemon whose task group it runs in: list again later.
                    log.warning("pod watch failed; retrying", error=repr(exc), retry_in=backoff)
                    # While we cannot watch, keepalives read the pods themselves.
                    self._watching = False
                    version = None
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            self._watching = False

    def _resync(self, pods: list[Json]) -> None:
        """After a (re-)list: every tracked pod missing from it was deleted meanwhile."""
        by_alloc = {
            ((p.get("metadata") or {}).get("labels") or {}).get(ALLOC_ID_LABEL): p for p in pods
        }
        for alloc_id, name in list(self._pods.items()):
            pod = by_alloc.get(alloc_id)
            if pod is not None and (pod.get("metadata") or {}).get("name") == name:
                self._seen[alloc_id] = pod
            elif self._seen.get(alloc_id) == {} and alloc_id not in by_alloc:
                # Created after the list was taken: the watch will bring it.
                continue
            else:
                self._seen[alloc_id] = None
            self._kill_if_gone(alloc_id)


def _default_kubeconfig() -> bool:
    """Whether a kubeconfig is where the client looks by default (`$KUBECONFIG`, ~/.kube)."""
    env = os.environ.get("KUBECONFIG")
    if env:
        return any(Path(p).expanduser().exists() for p in env.split(os.pathsep) if p)
    return Path("~/.kube/config").expanduser().exists()


def _config_namespace(
    kconfig: Any, in_cluster: bool, path: Path | None, context: str | None
) -> str:
    """The namespace of the kubeconfig context, or of the pod the daemon runs in."""
    if in_cluster:
        with contextlib.suppress(OSError):
            return _IN_CLUSTER_NAMESPACE.read_text().strip() or "default"
        return "default"
    try:
        contexts, current = kconfig.list_kube_config_contexts(
            config_file=str(path) if path is not None else None
        )
    except Exception:
        return "default"
    chosen = current
    if context is not None:
        chosen = next((c for c in contexts if c.get("name") == context), current)
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")
