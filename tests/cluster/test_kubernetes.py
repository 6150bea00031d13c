"""KubernetesCluster: pod manifests, the watch, and real agents through a fake API server.

The fake API server (`fake_kube.py`) speaks real Kubernetes JSON over HTTP on 127.0.0.1 and runs
each pod's command as a local process, so the real `packsched agent` runs in every "pod". Tests
against a real cluster run only when `KUBECONFIG` is set.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from packsched import GiB, MiB, Resources, Scheduler, SchedulerConfig, TaskSpec, TaskState
from packsched.alloc.remote import LeaseConfig, RemoteAlloc
from packsched.api.client import AsyncClient
from packsched.cluster.kubernetes import (
    ALLOC_ID_LABEL,
    MANAGED_BY_LABEL,
    KubernetesApiError,
    KubernetesCluster,
    build_pod,
    format_cpu,
    node_resources,
    parse_quantity,
    pod_gone_reason,
    pod_name,
    pod_resources,
)
from packsched.errors import AllocationError
from packsched.packing import Demand, lower_bound
from packsched.resources import AllocShape, Requirements, TiB
from packsched.store.base import HistoryQuery

from ..conftest import hosted
from .agents import (
    count_lines,
    counting,
    free_port,
    kill_daemon_midrun_and_restart,
    serve_agents,
    wait_for,
)
from .fake_kube import FakeKube, default_node

AGENT = (sys.executable, "-m", "packsched.agent")
SLEEPER = ("sh", "-c", "exec sleep 60", "sh")  # a container that ignores its args and waits
# A lease much longer than the time it takes to notice a pod's end: a lost alloc in these tests
# is noticed by the pod watch, not by the lease running out (and a loaded box misses no lease).
LEASE = LeaseConfig(
    heartbeat_interval=0.2, lease_timeout=10, start_timeout=30, exit_wait=5, kill_wait=10
)
CONFIG = SchedulerConfig(
    keepalive_interval=0.1,
    keepalive_timeout=5,
    min_alloc=Resources(cpu=1, mem=128 * MiB),
    max_alloc_idle_time=30,
)

# -- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", 2.0),
        ("3800m", 3.8),
        ("16Gi", 16 * 2**30),
        ("128974848", 128974848.0),
        ("129e6", 129e6),
        ("1.5k", 1500.0),
        ("12E", 12e18),
        ("100Ki", 102400.0),
        ("250u", 250e-6),
    ],
)
def test_parse_quantity(text: str, value: float) -> None:
    """Kubernetes quantities parse with decimal, binary and exponent suffixes."""
    assert parse_quantity(text) == pytest.approx(value)


def test_parse_quantity_rejects_garbage() -> None:
    """A malformed quantity is an error naming the field."""
    with pytest.raises(ValueError, match="node n1 memory"):
        parse_quantity("12 GB", field="node n1 memory")


def test_format_cpu_and_pod_resources() -> None:
    """Cores become whole cores or millicores (rounded up); every dimension maps to its name."""
    assert format_cpu(2) == "2"
    assert format_cpu(1.5) == "1500m"
    assert format_cpu(0.0001) == "1m"
    res = Resources(
        cpu=0.5, mem=1 * GiB, disk=2 * GiB, gpu=1, extra={"example.com/fpga": 1, "licence": 2}
    )
    assert pod_resources(res) == {
        "cpu": "500m",
        "memory": str(GiB),
        "ephemeral-storage": str(2 * GiB),
        "nvidia.com/gpu": "1",
        "example.com/fpga": "1",
    }


def test_node_resources_reads_allocatable() -> None:
    """A node's allocatable cpu, memory, storage, GPUs and extended resources become Resources."""
    node = default_node(cpu="3800m", memory="15Gi", storage="50Gi", gpu=2)
    node["status"]["allocatable"]["example.com/fpga"] = "4"
    res = node_resources(node)
    assert res == Resources(
        cpu=3.8, mem=15 * GiB, disk=50 * GiB, gpu=2, extra={"example.com/fpga": 4.0}
    )


def _pod(**overrides: object) -> dict[str, object]:
    args: dict[str, object] = {
        "name": "packsched-kubernetes-1",
        "namespace": "batch",
        "alloc_id": "kubernetes-1",
        "cluster_name": "packsched",
        "image": "registry.example/packsched:1",
        "command": ["packsched", "agent"],
        "server_url": "http://packsched.batch.svc:8000",
        "env": {
            "PACKSCHED_URL": "http://packsched.batch.svc:8000",
            "PACKSCHED_AGENT_TOKEN": "s3cret",
            "PACKSCHED_ALLOC_ID": "kubernetes-1",
        },
        "resources": Resources(cpu=2, mem=4 * GiB, gpu=1),
        "token_secret": "packsched-kubernetes-1",
    }
    args.update(overrides)
    return build_pod(**args)  # type: ignore[arg-type]


def test_pod_manifest() -> None:
    """The pod is labelled, sized with equal requests and limits, never restarted, and its
    token comes from the Secret, not the spec."""
    pod = _pod(
        labels={"team": "genomics"},
        node_selector={"pool": "batch"},
        tolerations=[{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        service_account="runner",
    )
    meta, spec = pod["metadata"], pod["spec"]
    assert isinstance(meta, dict) and isinstance(spec, dict)
    assert meta["labels"] == {
        "team": "genomics",
        MANAGED_BY_LABEL: "packsched",
        ALLOC_ID_LABEL: "kubernetes-1",
        "packsched.io/cluster": "packsched",
    }
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"pool": "batch"}
    assert spec["serviceAccountName"] == "runner"
    [container] = spec["containers"]
    assert container["command"] == ["packsched", "agent"]
    assert container["args"] == ["--server", "http://packsched.batch.svc:8000"]
    sized = {"cpu": "2", "memory": str(4 * GiB), "nvidia.com/gpu": "1"}
    assert container["resources"] == {"requests": sized, "limits": sized}
    env = {e["name"]: e for e in container["env"]}
    assert env["PACKSCHED_ALLOC_ID"]["value"] == "kubernetes-1"
    assert env["PACKSCHED_AGENT_TOKEN"] == {
        "name": "PACKSCHED_AGENT_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "packsched-kubernetes-1", "key": "token"}},
    }
    assert "s3cret" not in repr(pod)


def test_pod_overrides_merge_but_cannot_unlabel() -> None:
    """Overrides deep-merge into the pod and container, but identity labels and the command stay."""
    pod = _pod(
        pod_overrides={
            "metadata": {"labels": {ALLOC_ID_LABEL: "other"}, "annotations": {"a": "b"}},
            "spec": {"priorityClassName": "batch-low", "restartPolicy": "Always"},
        },
        container_overrides={"command": ["sh"], "securityContext": {"runAsNonRoot": True}},
        token_secret=None,
    )
    meta, spec = pod["metadata"], pod["spec"]
    assert isinstance(meta, dict) and isinstance(spec, dict)
    assert meta["labels"][ALLOC_ID_LABEL] == "kubernetes-1"
    assert meta["annotations"] == {"a": "b"}
    assert spec["priorityClassName"] == "batch-low"
    assert spec["restartPolicy"] == "Never"
    [container] = spec["containers"]
    assert container["command"] == ["packsched", "agent"]
    assert container["securityContext"] == {"runAsNonRoot": True}
    env = {e["name"]: e for e in container["env"]}
    assert env["PACKSCHED_AGENT_TOKEN"]["value"] == "s3cret"  # token_secret=False: plain env


def test_pod_gone_reason() -> None:
    """Running and Pending pods live; Failed, Evicted, Succeeded, deleting and missing ones do not."""
    assert pod_gone_reason({"metadata": {"name": "p"}, "status": {"phase": "Running"}}) is None
    assert pod_gone_reason({"metadata": {"name": "p"}, "status": {"phase": "Pending"}}) is None
    assert pod_gone_reason(None) == "the pod no longer exists"
    deleting = {"metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert pod_gone_reason(deleting) == "pod p is being deleted"
    evicted = {
        "metadata": {"name": "p"},
        "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"},
    }
    assert pod_gone_reason(evicted) == "pod p failed; (Evicted: low on memory)"
    oom = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "agent", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
            ],
        },
    }
    assert pod_gone_reason(oom) == "pod p failed; container agent exited with 137 (OOMKilled)"


def test_pod_name_is_dns_safe() -> None:
    """Pod names are lowercase DNS labels derived from the alloc id."""
    assert pod_name("kubernetes-3F2a_9") == "packsched-kubernetes-3f2a-9"


# -- the Kubernetes layer against the fake API server ----------------------------------------


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async for k in hosted(FakeKube(nodes=[default_node(cpu="8", memory="16Gi")])):
        yield k


def make_cluster(kube: FakeKube, tmp_path: Path, **kwargs: object) -> KubernetesCluster:
    """A KubernetesCluster on the fake server, its agents run from this interpreter."""
    options: dict[str, object] = {
        "kubeconfig": kube.write_kubeconfig(tmp_path / "kubeconfig"),
        "agent_command": AGENT,
        "lease": LEASE,
        "termination_grace": 2,
    }
    options.update(kwargs)
    return KubernetesCluster("packsched:test", **options)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(cluster: KubernetesCluster) -> AsyncIterator[KubernetesCluster]:
    """The cluster entered (watch running) with its agent routes served."""
    async with cluster, serve_agents(cluster):
        yield cluster


def new_alloc(cluster: KubernetesCluster, alloc_id: str, resources: Resources) -> RemoteAlloc:
    """A RemoteAlloc registered with the cluster, as `allocate` makes one."""
    alloc = RemoteAlloc(
        cluster.registry,
        alloc_id,
        resources,
        {"provider": "kubernetes"},
        register_deadline=time.monotonic() + 30,
    )
    cluster.registry.add(alloc)
    return alloc


async def test_shapes_come_from_schedulable_nodes(kube: FakeKube, tmp_path: Path) -> None:
    """Shapes are the allocatable of the nodes pods may use, less the agent's overhead."""
    kube.nodes = [
        default_node("small", cpu="4", memory="8Gi"),
        default_node("small-2", cpu="4", memory="8Gi"),
        default_node(
            "gpu",
            cpu="16",
            memory="64Gi",
            gpu=2,
            taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        ),
        default_node("cordoned", cpu="64", memory="256Gi", unschedulable=True),
    ]
    overhead = Resources(cpu=0.5, mem=512 * MiB)
    cluster = make_cluster(kube, tmp_path, overhead=overhead)
    await cluster.start("http://127.0.0.1:1")
    try:
        shapes = [s.resources for s in cluster.shapes()]
        assert shapes == [Resources(cpu=3.5, mem=8 * GiB - 512 * MiB, disk=100 * GiB)]
        assert not cluster.can_allocate(Resources(gpu=1))
        cluster.tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists"}]
        await cluster.refresh_nodes()
        assert cluster.can_allocate(Resources(cpu=8, gpu=2))
        cluster.node_selector = {"pool": "none"}
        with pytest.raises(AllocationError, match="no schedulable node"):
            await cluster.refresh_nodes()
    finally:
        await cluster.aclose()


async def test_grant_fits_the_shapes(kube: FakeKube, tmp_path: Path) -> None:
    """A request is granted up to its full width as far as a shape holds it; too big is refused."""
    cluster = make_cluster(
        kube, tmp_path, shapes=[AllocShape(resources=Resources(cpu=4, mem=8 * GiB))]
    )
    one = Resources(cpu=1, mem=1 * GiB)
    assert cluster._grant(Requirements(min=one, width=1)) == Resources(cpu=2, mem=2 * GiB)
    assert cluster._grant(Requirements(min=one, width=9)) == Resources(cpu=4, mem=8 * GiB)
    with pytest.raises(AllocationError, match="too much cpu"):
        cluster._grant(Requirements(min=Resources(cpu=5)))


async def test_wrong_token_is_a_status_error(kube: FakeKube, tmp_path: Path) -> None:
    """A refused call surfaces the Status code and reason the server sent."""
    path = kube.write_kubeconfig(tmp_path / "wrong-kubeconfig")
    path.write_text(path.read_text().replace(kube.token, "wrong"))
    cluster = make_cluster(kube, tmp_path, kubeconfig=path)
    with pytest.raises(KubernetesApiError) as caught:
        await cluster.start("http://127.0.0.1:1")
    assert (caught.value.code, caught.value.reason) == (401, "Unauthorized")


async def test_api_errors_map_from_status(kube: FakeKube, tmp_path: Path) -> None:
    """404 reads as absent, a second create is 409 AlreadyExists, deleting twice is fine."""
    cluster = make_cluster(kube, tmp_path, shapes=[AllocShape(resources=Resources(cpu=1))])
    async with cluster:
        api = cluster.api()
        assert await api.get_pod("default", "nope") is None
        body = {
            "metadata": {"name": "p1"},
            "spec": {"containers": [{"name": "c", "image": "i", "command": ["sleep", "30"]}]},
        }
        await api.create_pod("default", body)
        with pytest.raises(KubernetesApiError) as caught:
            await api.create_pod("default", body)
        assert (caught.value.code, caught.value.reason) == (409, "AlreadyExists")
        with pytest.raises(KubernetesApiError) as invalid:
            await api.create_pod("default", {"metadata": {"name": "p2"}, "spec": {}})
        assert invalid.value.code == 422 and "spec.containers" in str(invalid.value)
        await api.delete_pod("default", "p1", 0)
        await api.delete_pod("default", "missing", 0)
        await wait_for(lambda: not kube.live_pods(), 10, "the pod to go")


async def test_launch_creates_a_pod_and_an_owned_secret(kube: FakeKube, tmp_path: Path) -> None:
    """The pod runs the agent command with the token from its Secret; deleting the pod takes
    the Secret with it; a failed container kills the alloc through the watch."""
    script = 'echo "token=$PACKSCHED_AGENT_TOKEN alloc=$PACKSCHED_ALLOC_ID args=$*"; exec sleep 60'
    cluster = make_cluster(
        kube,
        tmp_path,
        agent_command=["sh", "-c", script, "sh"],
        shapes=[AllocShape(resources=Resources(cpu=4, mem=4 * GiB))],
    )
    async with cluster:
        await cluster.start("http://daemon.example:8000")
        alloc = new_alloc(cluster, "kubernetes-aa", Resources(cpu=1, mem=1 * GiB))
        await cluster._launch(alloc)
        name = pod_name(alloc.id)
        assert alloc.labels["kubernetes.pod"] == name
        pod = kube.pod(name)
        await wait_for(lambda: "token=" in pod.log(), 10, "the container to start")
        assert f"token={cluster.agent_token} alloc=kubernetes-aa" in pod.log()
        assert "args=--server http://daemon.example:8000" in pod.log()
        assert cluster.agent_token not in repr(pod.obj)  # only in the Secret
        secret = kube.secrets[("default", name)]
        assert secret["metadata"]["ownerReferences"][0]["uid"] == pod.uid
        requests = pod.obj["spec"]["containers"][0]["resources"]["requests"]
        assert requests == {"cpu": "1100m", "memory": str(1 * GiB + 256 * MiB)}  # + overhead
        assert alloc.check is not None and await alloc.check() is None

        await kube.kill_container(name)
        await wait_for(lambda: alloc.dead_reason is not None, 10, "the watch to see the failure")
        assert alloc.dead_reason is not None
        assert "failed" in alloc.dead_reason and "137" in alloc.dead_reason
        with pytest.raises(AllocationError):
            await alloc.keepalive()
        assert alloc.teardown is not None
        await alloc.teardown()
        await wait_for(lambda: not kube.live_pods(), 10, "the pod to be deleted")
        assert ("default", name) not in kube.secrets


async def test_watch_resumes_and_relists_after_410(kube: FakeKube, tmp_path: Path) -> None:
    """The watch resumes from its resourceVersion when a stream ends, lists again after 410
    Expired, and still notices a deletion made while it was away."""
    cluster = make_cluster(
        kube,
        tmp_path,
        agent_command=SLEEPER,
        shapes=[AllocShape(resources=Resources(cpu=4, mem=4 * GiB))],
    )
    async with cluster:
        await cluster.start("http://daemon.example:8000")
        await wait_for(lambda: cluster.relists == 1, 10, "the first list")
        a = new_alloc(cluster, "kubernetes-a", Resources(cpu=1))
        b = new_alloc(cluster, "kubernetes-b", Resources(cpu=1))
        await cluster._launch(a)
        await cluster._launch(b)
        await wait_for(lambda: kube.pod(pod_name(b.id)).phase == "Running", 10, "pods running")
        opened = kube.watches_opened
        kube.close_watches()
        await wait_for(lambda: kube.watches_opened > opened, 10, "the watch to resume")
        assert cluster.relists == 1 and kube.expired_watches == 0

        # History compacted and the stream cut while a pod goes: the resumed watch gets 410.
        kube.compact()
        kube.close_watches()
        await kube.evict(pod_name(a.id))
        await wait_for(lambda: a.dead_reason is not None, 10, "the eviction to be noticed")
        assert a.dead_reason is not None and "Evicted" in a.dead_reason
        assert kube.expired_watches >= 1 and cluster.relists >= 2
        assert b.dead_reason is None

        await kube.delete_pod(pod_name(b.id), grace=0)
        await wait_for(lambda: b.dead_reason is not None, 10, "the deletion to be noticed")
        assert b.dead_reason is not None and pod_name(b.id) in b.dead_reason


async def test_a_garbled_watch_is_retried(kube: FakeKube, tmp_path: Path) -> None:
    """A watch stream that is not Kubernetes JSON is dropped and the pods listed again."""
    cluster = make_cluster(
        kube,
        tmp_path,
        agent_command=SLEEPER,
        shapes=[AllocShape(resources=Resources(cpu=4, mem=4 * GiB))],
    )
    async with cluster:
        await cluster.start("http://daemon.example:8000")
        await wait_for(lambda: cluster.relists == 1, 10, "the first list")
        alloc = new_alloc(cluster, "kubernetes-g", Resources(cpu=1))
        await cluster._launch(alloc)
        kube.garble_next_watch()
        kube.close_watches()
        await wait_for(lambda: cluster.relists >= 2, 10, "a re-list after the garbled stream")
        await kube.delete_pod(pod_name(alloc.id), grace=0)
        await wait_for(lambda: alloc.dead_reason is not None, 10, "the deletion to be noticed")


async def test_410_as_an_http_status_also_relists(tmp_path: Path) -> None:
    """An API server that answers a too-old watch with HTTP 410 is handled the same way."""
    async with FakeKube(expired_as_http=True) as kube:
        cluster = make_cluster(kube, tmp_path, shapes=[AllocShape(resources=Resources(cpu=1))])
        async with cluster:
            await wait_for(lambda: cluster.relists == 1, 10, "the first list")
            kube.compact()
            kube.close_watches()
            await wait_for(lambda: cluster.relists >= 2, 10, "a re-list after 410")
            assert kube.expired_watches >= 1


async def test_keepalive_reads_the_pod_without_a_watch(kube: FakeKube, tmp_path: Path) -> None:
    """Started but not entered (no watch), keepalives check the pods by listing them."""
    cluster = make_cluster(
        kube,
        tmp_path,
        agent_command=SLEEPER,
        shapes=[AllocShape(resources=Resources(cpu=4, mem=4 * GiB))],
        poll_interval=0,
    )
    await cluster.start("http://daemon.example:8000")
    try:
        alloc = new_alloc(cluster, "kubernetes-c", Resources(cpu=1))
        await cluster._launch(alloc)
        assert alloc.check is not None
        await wait_for(lambda: kube.pod(pod_name(alloc.id)).phase == "Running", 10, "running")
        assert await alloc.check() is None
        await kube.delete_pod(pod_name(alloc.id), grace=0)
        await wait_for(lambda: not kube.live_pods(), 10, "the pod to go")
        reason = await alloc.check()
        assert reason is not None and "deleted" in reason
    finally:
        await cluster.aclose()


async def test_unschedulable_pod_times_out_and_is_deleted(kube: FakeKube, tmp_path: Path) -> None:
    """A pod no node can take stays Pending; at the start timeout the allocation fails and the
    pod is deleted."""
    cluster = make_cluster(
        kube,
        tmp_path,
        shapes=[AllocShape(resources=Resources(cpu=64, mem=4 * GiB))],  # the nodes have 8
        lease=LeaseConfig(heartbeat_interval=0.2, start_timeout=1.5),
    )
    async with running(cluster):
        with pytest.raises(AllocationError, match="did not register") as caught:
            await cluster.allocate(Requirements(min=Resources(cpu=32)), {})
        assert "was still Pending (Unschedulable: 0/1 nodes are available" in str(caught.value)
        await wait_for(lambda: not kube.live_pods(), 10, "the pending pod to be deleted")
        assert not cluster.registry.allocs()


async def test_an_invalid_image_fails_the_allocation_at_once(
    kube: FakeKube, tmp_path: Path
) -> None:
    """A pod whose image can never start (InvalidImageName) fails the allocation without
    waiting for the start timeout, and is deleted."""
    kube.bad_images["packsched:test"] = "InvalidImageName"
    cluster = make_cluster(kube, tmp_path, shapes=[AllocShape(resources=Resources(cpu=4))])
    async with running(cluster):
        with pytest.raises(AllocationError, match="cannot start: InvalidImageName"):
            await cluster.allocate(Requirements(min=Resources(cpu=1)), {})
        await wait_for(lambda: not kube.live_pods(), 10, "the pod to be deleted")


async def test_reattach_takes_back_live_pods_only(kube: FakeKube, tmp_path: Path) -> None:
    """After a restart, an alloc whose pod still runs is taken back; one whose pod is gone, or
    that another provider made, is not."""
    cluster = make_cluster(
        kube, tmp_path, agent_command=SLEEPER, shapes=[AllocShape(resources=Resources(cpu=4))]
    )
    async with cluster:
        await cluster.start("http://daemon.example:8000")
        alive = new_alloc(cluster, "kubernetes-alive", Resources(cpu=1))
        gone = new_alloc(cluster, "kubernetes-gone", Resources(cpu=1))
        await cluster._launch(alive)
        await cluster._launch(gone)
        await kube.delete_pod(pod_name(gone.id), grace=0)
        await wait_for(lambda: len(kube.live_pods()) == 1, 10, "one pod to go")
        labels = {**alive.labels}
        again = await cluster.reattach(alive.id, alive.resources, labels)
        assert isinstance(again, RemoteAlloc) and again.check is not None
        assert await again.check() is None
        assert await cluster.reattach(gone.id, gone.resources, dict(gone.labels)) is None
        assert await cluster.reattach("process-1", Resources(), {"provider": "process"}) is None


# -- real agents through the Scheduler -------------------------------------------------------


def pods_created(kube: FakeKube) -> int:
    """How many pods were ever created."""
    return sum(1 for method, path in kube.requests if method == "POST" and path.endswith("/pods"))


async def test_mixed_batch_completes_within_the_lower_bound_plus_one(
    kube: FakeKube, tmp_path: Path
) -> None:
    """A batch of mixed small tasks all COMPLETE in pods, with at most lower bound + 1 allocs."""
    shape = Resources(cpu=2, mem=2 * GiB)
    kube.nodes = [default_node(cpu="16", memory="32Gi")]
    cluster = make_cluster(kube, tmp_path, shapes=[AllocShape(resources=shape)])
    sizes = [
        Resources(cpu=1, mem=256 * MiB),
        Resources(cpu=0.5, mem=768 * MiB),
        Resources(cpu=0.5, mem=256 * MiB),
        Resources(cpu=0.25, mem=512 * MiB),
    ]
    specs = [TaskSpec(command=["sleep", "0.5"], resources=sizes[i % len(sizes)]) for i in range(16)]
    bound = lower_bound(
        [Demand(id=str(i), resources=s.resources) for i, s in enumerate(specs)], shape
    )
    async with running(cluster), Scheduler(cluster, config=CONFIG) as sched:
        tasks = await sched.submit(*specs)
        done = await sched.wait_many([t.id for t in tasks], timeout=60)
        assert [t.state for t in done] == [TaskState.COMPLETE] * len(specs)
        assert all(t.attempt == 0 for t in done)
        started = sched.stats().counters.allocs_started
    assert started <= bound + 1, f"{started} allocs for a lower bound of {bound}"
    # Pods of requests the scheduler abandoned (once the tasks fit elsewhere) are not allocs.
    assert pods_created(kube) >= started
    await wait_for(lambda: not kube.live_pods(), 20, "every pod to be deleted")


async def _lose_an_alloc(kube: FakeKube, tmp_path: Path, how: str) -> None:
    runs = tmp_path / "runs"
    cluster = make_cluster(
        kube, tmp_path, shapes=[AllocShape(resources=Resources(cpu=2, mem=1 * GiB))]
    )
    async with running(cluster), Scheduler(cluster, config=CONFIG) as sched:
        tasks = await sched.submit(
            *[TaskSpec(command=counting(runs, 2), resources=Resources(cpu=1)) for _ in range(2)]
        )
        for task in tasks:
            await sched.wait(task.id, TaskState.RUNNING, timeout=60)
        await wait_for(lambda: len(count_lines(runs)) == 2, 30, "both tasks to start")
        victim = sched.get(tasks[0].id).alloc_id
        assert victim is not None
        alloc = cluster.registry.get(victim)
        assert alloc is not None
        name = pod_name(victim)
        if how == "delete":
            await kube.delete_pod(name)
        else:
            pid = kube.pod(name).pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # the agent is the container's main process
        done = await sched.wait_many([t.id for t in tasks], timeout=90)
        assert [t.state for t in done] == [TaskState.COMPLETE] * 2
        moved = [t for t in done if t.attempt > 0]
        assert moved, "the lost alloc's tasks should have run again elsewhere"
        counts = count_lines(runs)
        for task in moved:
            assert task.alloc_id != victim
            states = [a.state for a in await sched.history(HistoryQuery(task_id=task.id))]
            assert TaskState.LOST in states
            assert counts[task.id] == 2  # once on the lost pod, once elsewhere
        assert sched.stats().counters.lost >= 1
        # Noticed through the pod (the watch), long before the 10 s lease would have run out.
        assert alloc.dead_reason is not None and name in alloc.dead_reason, alloc.dead_reason


async def test_deleted_pod_loses_its_tasks_and_they_complete_elsewhere(
    kube: FakeKube, tmp_path: Path
) -> None:
    """Deleting a pod while its tasks run: they are LOST and COMPLETE in another pod."""
    await _lose_an_alloc(kube, tmp_path, "delete")


async def test_sigkilled_agent_loses_its_tasks_and_they_complete_elsewhere(
    kube: FakeKube, tmp_path: Path
) -> None:
    """SIGKILL of a pod's agent: the pod fails, its tasks are LOST and COMPLETE elsewhere."""
    await _lose_an_alloc(kube, tmp_path, "sigkill")


# -- the daemon: SIGKILL and restart ---------------------------------------------------------


async def wait_running(client: AsyncClient, task_id: str) -> None:
    """Poll the daemon until the task is RUNNING there (durable: the store says so)."""
    with anyio.fail_after(30):
        while (await client.get(task_id)).state is not TaskState.RUNNING:  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_daemon_sigkill_and_restart_reattaches_running_pods(
    kube: FakeKube, tmp_path: Path
) -> None:
    """SIGKILL of the daemon while pods run tasks, then a restart: the pods' agents come back,
    their running tasks are re-attached and finish once, never run again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runs = tmp_path / "runs"
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    agent = ", ".join(f'"{part}"' for part in AGENT)
    config = tmp_path / "packsched.toml"
    config.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
[server]
port = {port}
token = "user-token"
[cluster]
kind = "kubernetes"
image = "packsched:test"
kubeconfig = "{kubeconfig}"
agent_command = [{agent}]
termination_grace = 2
[[cluster.shapes]]
cpu = 2
mem = "1GiB"
[cluster.lease]
heartbeat_interval = 0.2
lease_timeout = 5
reattach_grace = 15
exit_wait = 2
[scheduler]
keepalive_interval = 0.1
max_alloc_idle_time = 30
[scheduler.min_alloc]
cpu = 1
mem = "128MiB"
"""
    )
    pods: set[str] = set()
    done = await kill_daemon_midrun_and_restart(
        config,
        tmp_path / "daemon.log",
        url,
        runs,
        seconds=4,
        timeout=60,
        before_kill=lambda: pods.update(p.name for p in kube.live_pods()),
    )
    assert {pod_name(t.alloc_id or "") for t in done} <= pods  # finished where they ran
    await wait_for(lambda: not kube.live_pods(), 30, "the drained daemon to delete its pods")


def test_daemon_config_builds_a_kubernetes_cluster(tmp_path: Path) -> None:
    """`kind = "kubernetes"` in the daemon config builds a KubernetesCluster; a bad size or an
    unknown key is a ConfigError naming it."""
    from packsched.api.daemon import build_cluster
    from packsched.config import ConfigError, load_config

    config = tmp_path / "packsched.toml"
    base = f"""
state_dir = "{tmp_path / "state"}"
[cluster]
kind = "kubernetes"
image = "registry.example/packsched:1"
namespace = "batch"
node_selector = {{ pool = "batch" }}
tolerations = [{{ key = "batch", operator = "Exists" }}]
pod_overrides = {{ spec = {{ priorityClassName = "low" }} }}
advertise_url = "http://packsched.batch.svc:8000"
"""
    config.write_text(base + '[[cluster.shapes]]\ncpu = 4\nmem = "16GiB"\n')
    cluster = build_cluster(load_config(config, environ={}))
    assert isinstance(cluster, KubernetesCluster)
    assert cluster.namespace == "batch" and cluster.node_selector == {"pool": "batch"}
    assert cluster.server_url == "http://packsched.batch.svc:8000"
    assert [s.resources for s in cluster.shapes()] == [Resources(cpu=4, mem=16 * GiB, disk=TiB)]
    config.write_text(base + 'overhead_mem = "lots"\n')
    with pytest.raises(ConfigError, match=r"cluster\.overhead_mem"):
        build_cluster(load_config(config, environ={}))
    config.write_text(base + "imagee = 1\n")
    with pytest.raises(ConfigError, match="imagee"):
        load_config(config, environ={})


# -- a real cluster ---------------------------------------------------------------------------

REAL = os.environ.get("KUBECONFIG")
REAL_IMAGE = os.environ.get("PACKSCHED_TEST_IMAGE")
REAL_ADVERTISE = os.environ.get("PACKSCHED_TEST_ADVERTISE_URL")


def real_phase(cluster: KubernetesCluster, alloc_id: str) -> str | None:
    """The phase of an alloc's pod as the cluster's watch last saw it."""
    pod = cluster._seen.get(alloc_id) or {}
    phase = (pod.get("status") or {}).get("phase")
    return str(phase) if phase else None


@pytest.mark.skipif(not REAL, reason="needs a real Kubernetes cluster: set KUBECONFIG")
async def test_real_cluster_reads_nodes_and_runs_a_pod() -> None:
    """On a real cluster: the nodes give shapes, and a pod is created, seen Running through
    the watch, and deleted."""
    cluster = KubernetesCluster(
        os.environ.get("PACKSCHED_TEST_POD_IMAGE", "busybox:stable"),
        namespace=os.environ.get("PACKSCHED_TEST_NAMESPACE"),
        agent_command=["sh", "-c", "sleep 300", "sh"],
        overhead=Resources(),
        name=f"packsched-test-{os.getpid()}",
    )
    async with cluster:
        await cluster.start("http://packsched.invalid:8000")
        assert cluster.shapes()
        alloc = new_alloc(cluster, f"kubernetes-t{os.getpid()}", Resources(cpu=0.1, mem=64 * MiB))
        try:
            await cluster._launch(alloc)
            await wait_for(lambda: real_phase(cluster, alloc.id) == "Running", 300, "Running")
            assert alloc.check is not None
            assert await alloc.check() is None
        finally:
            assert alloc.teardown is not None
            await alloc.teardown()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers (the test owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@pytest.mark.skipif(
    not (REAL and REAL_IMAGE and REAL_ADVERTISE),
    reason="needs a real Kubernetes cluster: set KUBECONFIG, PACKSCHED_TEST_IMAGE (an image "
    "with packsched installed) and PACKSCHED_TEST_ADVERTISE_URL (where pods reach this "
    "machine; the test serves the agent routes on that port on every interface)",
)
async def test_real_cluster_runs_tasks_in_pods() -> None:
    """On a real cluster: tasks run in pods whose agents call back here, and all COMPLETE."""
    assert REAL_IMAGE is not None and REAL_ADVERTISE is not None
    cluster = KubernetesCluster(
        REAL_IMAGE,
        namespace=os.environ.get("PACKSCHED_TEST_NAMESPACE"),
        server_url=REAL_ADVERTISE,
        lease=LeaseConfig(heartbeat_interval=1, start_timeout=300),
        name=f"packsched-test-{os.getpid()}",
    )
    port = urllib.parse.urlsplit(REAL_ADVERTISE).port or 80
    app = Starlette(routes=[Mount("/v1/agent", cluster.agent_app())])
    server = _Uvicorn(
        uvicorn.Config(
            app, host="0.0.0.0", port=port, lifespan="off", log_config=None, access_log=False
        )
    )
    config = SchedulerConfig(keepalive_interval=1, min_alloc=Resources(cpu=0.25, mem=128 * MiB))
    async with cluster, anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        await wait_for(lambda: server.started, 30, "the agent routes to be served")
        try:
            async with Scheduler(cluster, config=config) as sched:
                specs = [
                    TaskSpec(command=["sh", "-c", f"echo {i}"], resources=Resources(cpu=0.1))
                    for i in range(4)
                ]
                tasks = await sched.submit(*specs)
                done = await sched.wait_many([t.id for t in tasks], timeout=600)
                assert [t.state for t in done] == [TaskState.COMPLETE] * 4
        finally:
            server.should_exit = True
