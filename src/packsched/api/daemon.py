"""`packsched serve`: build the cluster, store and scheduler from a `DaemonConfig`, serve the
API, and drain cleanly on SIGTERM / SIGINT.

Draining: submits get 503 and `/readyz` fails at once, nothing new is started, the daemon
waits up to `server.drain_grace` seconds for what runs to finish, then stops. Tasks still
running then go back to the queue, and the next start (same store) runs them again. A second
signal stops at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from starlette.types import ASGIApp

from ..alloc.remote import AgentCluster
from ..cluster.base import Cluster
from ..config import (
    ConfigError,
    DaemonConfig,
    KubernetesClusterConfig,
    LocalClusterConfig,
    ProcessClusterConfig,
    SlurmClusterConfig,
    http_url,
    read_token,
)
from ..errors import InvalidSpecError
from ..log import get_logger
from ..resources import Resources, parse_bytes, parse_cpu
from ..scheduler import Scheduler
from ..store.base import Store
from .server import ApiServer

__all__ = ["build_cluster", "build_store", "resolve_token", "serve"]

log = get_logger("packsched.daemon")


def resolve_token(config: DaemonConfig) -> tuple[str, Path | None]:
    """The bearer token and the file it came from (None when given directly).

    Order: `server.token`, then `server.token_file`, then `<state_dir>/token`, which is created
    with a fresh random token (mode 0600) when missing.

    Raises:
        ConfigError: the token file cannot be read or is empty.
    """
    server = config.server
    if server.token:
        return server.token, None
    if server.token_file:
        path = Path(server.token_file).expanduser()
        return read_token(path, "server.token_file"), path
    path = config.resolved_state_dir() / "token"
    try:
        # O_EXCL: two daemons starting at once never overwrite each other's token.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(path, "token file"), path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    log.info("generated a bearer token", path=str(path))
    return read_token(path, "token file"), path


def build_store(config: DaemonConfig) -> Store:
    """The store the config names (SQLite under the state directory by default)."""
    if config.store.kind == "memory":
        from ..store.memory import MemoryStore

        return MemoryStore()
    from ..store.sqlite import SQLiteStore

    path = config.store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return SQLiteStore(path, durability=config.store.durability)


def build_cluster(config: DaemonConfig) -> Cluster:
    """The cluster the config names (this machine by default).

    Raises:
        ConfigError: a size in the cluster section is malformed.
    """
    cluster = config.cluster
    if isinstance(cluster, LocalClusterConfig):
        return _local_cluster(cluster)
    if isinstance(cluster, ProcessClusterConfig | SlurmClusterConfig | KubernetesClusterConfig):
        return _agent_cluster(config, cluster)
    from ..cluster.sim import SimCluster

    shapes = [s.to_shape(f"cluster.shapes[{i}]") for i, s in enumerate(cluster.shapes)]
    return SimCluster(
        shapes,
        startup_delay=cluster.startup_delay,
        default_duration=cluster.default_duration,
        max_allocs=cluster.max_allocs,
    )


def _agent_cluster(
    config: DaemonConfig,
    cfg: ProcessClusterConfig | SlurmClusterConfig | KubernetesClusterConfig,
) -> AgentCluster:
    """A cluster whose allocs run `packsched agent`, with a token that survives restarts."""

    def size(name: str, value: int | float | str | None, parse: Callable[..., Any]) -> Any:
        try:
            return None if value is None else parse(value, field=f"cluster.{name}")
        except InvalidSpecError as exc:
            raise ConfigError(str(exc)) from None

    if cfg.agent_token:
        token = cfg.agent_token
    elif cfg.agent_token_file:
        token = read_token(Path(cfg.agent_token_file).expanduser(), "cluster.agent_token_file")
    else:
        token = _state_token(config.resolved_state_dir() / "agent-token", "agent token file")
    if isinstance(cfg, KubernetesClusterConfig):
        return _kubernetes_cluster(cfg, token)
    if isinstance(cfg, SlurmClusterConfig):
        from ..cluster.slurm import SlurmCluster

        return SlurmCluster(
            partition=cfg.partition,
            account=cfg.account,
            time_limit=cfg.time_limit,
            extra_args=cfg.extra_args,
            agent_command=cfg.agent_command,
            agent_mem=size("agent_mem", cfg.agent_mem, parse_bytes),
            work_root=cfg.work_root,
            log_dir=cfg.log_dir,
            disk=size("disk", cfg.disk, parse_bytes),
            state_poll=cfg.state_poll,
            lease=cfg.lease,
            agent_token=token,
            server_url=cfg.advertise_url,
        )
    from ..cluster.process import ProcessCluster
    from ..stats.runtime import machine_capacity

    work_root = Path(cfg.work_root).expanduser() if cfg.work_root else None
    reserve = size("reserve_mem", cfg.reserve_mem, parse_bytes)
    given = {
        "cpu": size("cpu", cfg.cpu, parse_cpu),
        "mem": size("mem", cfg.mem, parse_bytes),
        "disk": size("disk", cfg.disk, parse_bytes),
    }
    capacity = None
    if any(v is not None for v in given.values()):
        import psutil

        from ..cluster.local import default_reserve_mem, default_work_root

        if reserve is None:
            reserve = default_reserve_mem(psutil.virtual_memory().total)
        probe = work_root or default_work_root()
        measured = machine_capacity(reserve_mem=reserve, disk_path=probe)
        capacity = Resources(
            cpu=measured.cpu if given["cpu"] is None else given["cpu"],
            mem=measured.mem if given["mem"] is None else given["mem"],
            disk=measured.disk if given["disk"] is None else given["disk"],
        )
    return ProcessCluster(
        capacity=capacity,
        reserve_mem=reserve,
        work_root=work_root,
        lease=cfg.lease,
        agent_token=token,
        server_url=cfg.advertise_url,
        kill_grace=cfg.kill_grace,
    )


def _kubernetes_cluster(cfg: KubernetesClusterConfig, token: str) -> AgentCluster:
    """A KubernetesCluster from its config section (bad sizes raise `ConfigError`)."""
    from ..cluster.kubernetes import KubernetesCluster

    try:
        shapes = [s.to_shape(f"cluster.shapes[{i}]") for i, s in enumerate(cfg.shapes)]
        overhead = Resources(
            cpu=parse_cpu(cfg.overhead_cpu, field="cluster.overhead_cpu"),
            mem=parse_bytes(cfg.overhead_mem, field="cluster.overhead_mem"),
        )
        return KubernetesCluster(
            cfg.image,
            namespace=cfg.namespace,
            kubeconfig=cfg.kubeconfig,
            context=cfg.context,
            in_cluster=cfg.in_cluster,
            server_url=cfg.advertise_url,
            agent_command=cfg.agent_command,
            shapes=shapes or None,
            overhead=overhead,
            labels=cfg.labels,
            annotations=cfg.annotations,
            node_selector=cfg.node_selector,
            tolerations=cfg.tolerations,
            service_account=cfg.service_account,
            image_pull_policy=cfg.image_pull_policy,
            pod_overrides=cfg.pod_overrides,
            container_overrides=cfg.container_overrides,
            token_secret=cfg.token_secret,
            termination_grace=cfg.termination_grace,
            name=cfg.name,
            lease=cfg.lease,
            agent_token=token,
        )
    except (InvalidSpecError, ValueError) as exc:
        raise ConfigError(f"cluster: {exc}") from None


def _entered(cluster: Cluster) -> contextlib.AbstractAsyncContextManager[object]:
    """The cluster itself when it is an async context manager, which it is to run a watch of
    its allocs while entered (KubernetesCluster); else nothing to enter."""
    if isinstance(cluster, contextlib.AbstractAsyncContextManager):
        return cluster
    return contextlib.nullcontext()


def _state_token(path: Path, what: str) -> str:
    """The token in `path`, created with a fresh random one (mode 0600) when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(path, what)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return read_token(path, what)


def _local_cluster(cfg: LocalClusterConfig) -> Cluster:
    from ..cluster.local import LocalCluster, count_gpus, default_reserve_mem, default_work_root
    from ..stats.runtime import machine_capacity

    def size(name: str, parse: Callable[..., Any]) -> Any:
        value = getattr(cfg, name)
        try:
            return None if value is None else parse(value, field=f"cluster.{name}")
        except InvalidSpecError as exc:
            raise ConfigError(str(exc)) from None

    reserve = size("reserve_mem", parse_bytes)
    work_root = Path(cfg.work_root).expanduser() if cfg.work_root else default_work_root()
    given = {
        name: size(name, parse_cpu if name == "cpu" else parse_bytes)
        for name in ("cpu", "mem", "disk")
    }
    capacity = None
    if any(v is not None for v in given.values()) or cfg.gpu is not None:
        # Some sizes given: measure only the others.
        import psutil

        if reserve is None:
            reserve = default_reserve_mem(psutil.virtual_memory().total)
        measured = machine_capacity(reserve_mem=reserve, disk_path=work_root)
        capacity = Resources(
            cpu=measured.cpu if given["cpu"] is None else given["cpu"],
            mem=measured.mem if given["mem"] is None else given["mem"],
            disk=measured.disk if given["disk"] is None else given["disk"],
            gpu=count_gpus() if cfg.gpu is None else cfg.gpu,
        )
    return LocalCluster(
        reserve_mem=reserve, work_root=work_root, capacity=capacity, executor=cfg.executor
    )


def _metrics_app(scheduler: Scheduler) -> ASGIApp:
    from ..stats.prometheus import metrics_app

    # Per-task rows are not exported by default, so the snapshot need not build them.
    app: ASGIApp = metrics_app(lambda: scheduler.stats(include_tasks=False))
    return app


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so that port 0 works and the real port is known."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon drains first, then stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(config: DaemonConfig) -> None:
    """Run the daemon until SIGTERM / SIGINT, then drain and stop.

    Raises:
        ConfigError: the token cannot be resolved or the cluster options are bad.
        OSError: the address cannot be bound.
        StoreError: the store cannot be opened (corrupt, or in use by another daemon).
    """
    state_dir = config.resolved_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token, token_path = resolve_token(config)
    cluster = build_cluster(config)
    store = build_store(config)
    sock = _listen(config.server.host, config.server.port)
    host, port = sock.getsockname()[:2]
    url = http_url(host, port)
    try:
        if isinstance(cluster, AgentCluster):
            # Before the scheduler resumes: agents must know where to call, and the cluster
            # its shapes, when the store's allocs are re-attached.
            await cluster.start(url)
        async with (
            _entered(cluster),
            Scheduler(cluster, config=config.scheduler, store=store) as scheduler,
        ):
            api = ApiServer(
                scheduler,
                config.server,
                token=token,
                metrics=_metrics_app(scheduler),
                agent=cluster.agent_app() if isinstance(cluster, AgentCluster) else None,
            )
            uv = _Uvicorn(
                uvicorn.Config(
                    api.app,
                    lifespan="off",
                    log_config=None,
                    access_log=False,
                    timeout_graceful_shutdown=5,
                )
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    _drain_on_signal,
                    api,
                    scheduler,
                    uv,
                    config.server.drain_grace,
                    cluster.registry.release_polls if isinstance(cluster, AgentCluster) else None,
                )
                log.info(
                    "listening",
                    url=url,
                    token_file=str(token_path) if token_path else None,
                    store=store.describe(),
                    cluster=type(cluster).__name__,
                    pid=os.getpid(),
                )
                if not ipaddress.ip_address(host).is_loopback:
                    log.warning(
                        "listening beyond loopback: the bearer token is the only guard and "
                        "travels in clear text; put a TLS proxy in front",
                        url=url,
                    )
                await uv.serve(sockets=[sock])
                tg.cancel_scope.cancel()
            log.info("stopping", running=scheduler.running_count())
    finally:
        sock.close()
        await cluster.aclose()
    log.info("stopped")


async def _drain_on_signal(
    api: ApiServer,
    scheduler: Scheduler,
    uv: uvicorn.Server,
    grace: float,
    release_polls: Callable[[], None] | None = None,
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        received = await anext(aiter(signals))
        api.start_draining()
        scheduler.stop_accepting()
        log.info(
            "draining",
            signal=signal.Signals(received).name,
            running=scheduler.running_count(),
            grace=grace,
        )
        with anyio.move_on_after(grace):
            async with anyio.create_task_group() as tg:

                async def stop_on_second_signal() -> None:
                    again = await anext(aiter(signals))
                    log.warning("second signal: stopping now", signal=signal.Signals(again).name)
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_on_second_signal)
                # The scheduler has no event for "nothing runs"; a short poll is cheap here.
                while scheduler.running_count() > 0:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        api.stop()
        if release_polls is not None:
            release_polls()  # agents' long-polls too, or the server waits for them
        uv.should_exit = True
