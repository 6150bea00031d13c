"""The daemon's configuration: one validated struct built from a TOML file, the environment
and command-line flags, in that order of precedence (later wins).

With no configuration at all the daemon runs tasks on this machine (LocalCluster), keeps its
log in SQLite under a state directory and listens on 127.0.0.1 only.

Environment variables map onto keys with a double underscore between levels, so that single
underscores can stay inside key names::

    PACKSCHED_STATE_DIR=/var/lib/packsched      -> state_dir
    PACKSCHED_SERVER__PORT=9000                 -> server.port
    PACKSCHED_SCHEDULER__MAX_PENDING_ALLOCS=10  -> scheduler.max_pending_allocs
    PACKSCHED_CLUSTER__KIND=sim                 -> cluster.kind

Values are strings converted to the key's type (`"9000"` -> 9000, `"true"` -> True); a value
starting with `[` or `{` is read as a TOML inline array or table. `PACKSCHED_URL` and
`PACKSCHED_TOKEN` configure clients, not the daemon, and are ignored here. `PACKSCHED_CONFIG`
names the TOML file for both: `packsched serve` reads it when `--config` is not given, and
clients find the daemon's address and token in it (`DaemonConfig.client_url` / `client_token`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from .alloc.local import ExecutorConfig
from .alloc.remote import LeaseConfig
from .errors import InvalidSpecError
from .log import get_logger
from .resources import AllocShape, MiB, Resources
from .scheduler import SchedulerConfig

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_PORT",
    "ClusterConfig",
    "ConfigError",
    "DaemonConfig",
    "KubernetesClusterConfig",
    "LocalClusterConfig",
    "LogConfig",
    "ProcessClusterConfig",
    "ServerConfig",
    "SimClusterConfig",
    "SimShapeConfig",
    "SlurmClusterConfig",
    "StoreConfig",
    "default_state_dir",
    "http_url",
    "load_config",
    "read_token",
]

log = get_logger("packsched.config")

DEFAULT_PORT = 8742
ENV_PREFIX = "PACKSCHED_"


class ConfigError(InvalidSpecError):
    """The configuration is malformed; the message names the key (`server.port`) and the fault."""


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The HTTP listener and its limits.

    `token` (or the contents of `token_file`) is the bearer token every client must send; with
    neither, one is generated once into `<state_dir>/token` (mode 0600). `metrics_auth` keeps
    `/metrics` behind the token too (Prometheus sends it with `authorization.credentials_file`).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    token_file: str | None = None
    metrics_auth: bool = True
    max_body_bytes: int = 16 * MiB
    max_batch: int = 10_000
    max_wait: float = 60.0
    drain_grace: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"must be a TCP port 0..65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty")
        for name in ("max_body_bytes", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait", "drain_grace"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0")


class StoreConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where tasks are logged: `sqlite` (the default; `path` defaults to
    `<state_dir>/packsched.db`) or `memory` (nothing survives a restart)."""

    kind: Literal["sqlite", "memory"] = "sqlite"
    path: str | None = None
    durability: Literal["full", "normal", "off"] = "normal"


class LocalClusterConfig(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="local",
    tag_field="kind",
):
    """Run tasks on this machine. Sizes left unset are measured (memory less `reserve_mem`)."""

    cpu: float | str | None = None
    mem: int | str | None = None
    disk: int | str | None = None
    gpu: int | None = None
    reserve_mem: int | str | None = None
    work_root: str | None = None
    executor: ExecutorConfig = ExecutorConfig()


class SimShapeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One alloc shape a simulated cluster offers; sizes in base units or people's units."""

    cpu: float | str = 64
    mem: int | str = "256GiB"
    disk: int | str = "1TiB"
    gpu: int = 0
    price: float | None = None
    name: str = ""

    def to_shape(self, path: str) -> AllocShape:
        """The `AllocShape`; a bad quantity raises `ConfigError` naming `path`."""
        try:
            resources = Resources.parse(cpu=self.cpu, mem=self.mem, disk=self.disk, gpu=self.gpu)
            return AllocShape(resources=resources, price=self.price, name=self.name)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None


class SimClusterConfig(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="sim",
    tag_field="kind",
):
    """Simulated allocs for tests, demos and benchmarks: tasks "run" for their
    `expected_duration` (else `default_duration`) seconds and exit 0."""

    shapes: list[SimShapeConfig] = msgspec.field(default_factory=lambda: [SimShapeConfig()])
    startup_delay: float = 0.0
    default_duration: float = 0.0
    max_allocs: int | None = None


class AgentClusterFields(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What every cluster whose allocs run `packsched agent` shares.

    `agent_token` (or the contents of `agent_token_file`) is the token agents send; with
    neither, one is generated once into `<state_dir>/agent-token`, so that agents outlive a
    restart. `advertise_url` is where agents reach the daemon (default: the address it listens
    on, which is only right when they run on this machine).
    """

    lease: LeaseConfig = LeaseConfig()
    agent_token: str | None = None
    agent_token_file: str | None = None
    advertise_url: str | None = None


class ProcessClusterConfig(
    AgentClusterFields,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="process",
    tag_field="kind",
):
    """Each alloc is a local `packsched agent` process holding a slice of this machine."""

    cpu: float | str | None = None
    mem: int | str | None = None
    disk: int | str | None = None
    reserve_mem: int | str | None = None
    work_root: str | None = None
    kill_grace: float = 5.0


class SlurmClusterConfig(
    AgentClusterFields,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="slurm",
    tag_field="kind",
):
    """Each alloc is a Slurm batch job running `packsched agent` (sbatch / squeue / scancel)."""

    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None
    extra_args: list[str] = []
    agent_command: list[str] | None = None
    agent_mem: int | str = "128MiB"
    work_root: str | None = None
    log_dir: str | None = None
    disk: int | str | None = None
    state_poll: float = 1.0


class KubernetesClusterConfig(
    AgentClusterFields,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="kubernetes",
    tag_field="kind",
):
    """Each alloc is a pod running `packsched agent` (needs the `kubernetes` extra).

    `shapes` empty means one shape per distinct node allocatable; `overhead_*` is what the
    agent itself is given beyond its tasks. `advertise_url` must be an address pods can reach
    (the daemon's Service). See `KubernetesCluster` for the rest.
    """

    image: str
    namespace: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool | None = None
    agent_command: list[str] = msgspec.field(default_factory=lambda: ["packsched", "agent"])
    shapes: list[SimShapeConfig] = []
    overhead_cpu: float | str = 0.1
    overhead_mem: int | str = "256MiB"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    service_account: str | None = None
    image_pull_policy: str | None = None
    pod_overrides: dict[str, Any] = {}
    container_overrides: dict[str, Any] = {}
    token_secret: bool = True
    termination_grace: float = 30.0
    name: str = "packsched"


ClusterConfig = (
    LocalClusterConfig
    | SimClusterConfig
    | ProcessClusterConfig
    | SlurmClusterConfig
    | KubernetesClusterConfig
)


class LogConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`format = "auto"` renders for people on a terminal and as JSON lines otherwise."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything `packsched serve` needs. Every field has a default that works."""

    state_dir: str | None = None
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    cluster: ClusterConfig = LocalClusterConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    log: LogConfig = LogConfig()

    def resolved_state_dir(self) -> Path:
        """The state directory: as configured, else the per-user default."""
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()

    def client_url(self) -> str:
        """Where a client on this machine reaches the daemon this config describes (a
        wildcard listen address, `0.0.0.0` or `::`, is reached on loopback).

        Raises:
            ConfigError: `server.port` is 0: the daemon picks a free port when it starts, so
                no client can know it from the config.
        """
        if self.server.port == 0:
            raise ConfigError(
                "server.port is 0 (a free port picked at start), so a client cannot find the "
                "daemon from the config: set a port, or give the client its URL"
            )
        host = self.server.host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None  # a host name
        if address is not None and address.is_unspecified:
            host = "::1" if address.version == 6 else "127.0.0.1"
        return http_url(host, self.server.port)

    def client_token(self) -> str | None:
        """The daemon's bearer token as a client on this machine finds it: `server.token`,
        else the contents of `server.token_file`, else `<state_dir>/token` once the daemon
        has written it; None when there is none to read.

        Raises:
            ConfigError: `server.token_file` cannot be read or is empty.
        """
        if self.server.token:
            return self.server.token
        if self.server.token_file:
            return read_token(Path(self.server.token_file).expanduser(), "server.token_file")
        try:
            text = (self.resolved_state_dir() / "token").read_text(encoding="utf-8")
        except OSError:
            return None
        return text.strip() or None

    def store_path(self) -> Path:
        """The SQLite file: as configured, else `<state_dir>/packsched.db`."""
        if self.store.path:
            return Path(self.store.path).expanduser()
        return self.resolved_state_dir() / "packsched.db"


# The environment variable naming the TOML config file, for the daemon and its clients.
CONFIG_ENV = "PACKSCHED_CONFIG"


def http_url(host: str, port: int) -> str:
    """The http URL of host:port (an IPv6 address in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def read_token(path: Path, what: str) -> str:
    """A bearer token from a file (stripped), warning when others can read the file.

    Raises:
        ConfigError: naming `what` (the key or the file's role), when the file cannot be
            read or is empty.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{what}: {path} is empty")
    if path.stat().st_mode & 0o077:
        log.warning("token file is readable by others; chmod 600 it", path=str(path))
    return token


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$PACKSCHED_STATE_DIR`, else `$XDG_STATE_HOME/packsched`, else `~/.local/state/packsched`."""
    env = os.environ if environ is None else environ
    if env.get("PACKSCHED_STATE_DIR"):
        return Path(env["PACKSCHED_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    return Path(base) / "packsched"


# -- loading ---------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Build the config from a TOML file, then `PACKSCHED_*` variables, then `overrides`.

    Args:
        path: a TOML file, or None for none.
        environ: the environment (default `os.environ`).
        overrides: dotted keys from the command line, e.g. `{"server.port": 9000}`.

    Raises:
        ConfigError: naming the key and what is wrong with it, and the file when it is there.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            from_file = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        # Validated alone first, strictly, so that a fault is reported against the file.
        _convert(from_file, strict=True, source=str(path))
        merged = from_file
    env_layer = _from_environ(os.environ if environ is None else environ)
    _deep_merge(merged, env_layer)
    flags: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if isinstance(value, str):  # --set scheduler.labels='{ team = "bio" }' as for env
            value = _env_value(f"--set {key}", value)
        _set_dotted(flags, key.split("."), value)
    _deep_merge(merged, flags)
    return _convert(merged, strict=False, source=None)


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest == "STATE_DIR":
            out["state_dir"] = raw
        elif "__" in rest:
            keys = [part.lower() for part in rest.split("__")]
            if not all(keys):
                raise ConfigError(f"{name}: empty key between double underscores")
            _set_dotted(out, keys, _env_value(name, raw))
    return out


def _env_value(name: str, raw: str) -> Any:
    if raw.lstrip().startswith(("[", "{")):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{name}: not a TOML inline array or table: {exc}") from None
    return raw


def _set_dotted(target: dict[str, Any], keys: list[str], value: Any) -> None:
    node = target
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")


def _convert(data: dict[str, Any], *, strict: bool, source: str | None) -> DaemonConfig:
    try:
        data = _parse_quantities(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
    try:
        return msgspec.convert(data, DaemonConfig, strict=strict)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(str(exc), source)) from None


def _parse_quantities(data: dict[str, Any]) -> dict[str, Any]:
    """Let `scheduler.min_alloc` be written in people's units (`mem = "1GiB"`), and a
    `[cluster]` table without `kind` mean the local cluster."""
    cluster = data.get("cluster")
    if isinstance(cluster, dict) and "kind" not in cluster:
        data = {**data, "cluster": {"kind": "local", **cluster}}
    sched = data.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("min_alloc"), dict):
        spec = sched["min_alloc"]
        try:
            parsed = Resources.parse(**spec)
        except (InvalidSpecError, TypeError) as exc:
            raise ConfigError(f"scheduler.min_alloc: {exc}") from None
        data = {**data, "scheduler": {**sched, "min_alloc": msgspec.to_builtins(parsed)}}
    return data


def _describe(text: str, source: str | None) -> str:
    """msgspec's `Expected int, got str - at $.server.port` as `server.port: expected int, got str`."""
    match = _AT.match(text)
    assert match is not None  # the pattern matches any text
    message, path = match.group("msg"), (match.group("path") or "").lstrip(".")
    unknown = _UNKNOWN.match(message)
    if unknown:
        field = unknown.group("field")
        path = f"{path}.{field}" if path else field
        message = "unknown key" + _allowed_keys(path)
    else:
        message = message.replace("`", "")
        message = message[:1].lower() + message[1:]
    where = path or "config"
    return f"{source}: {where}: {message}" if source else f"{where}: {message}"


def _allowed_keys(path: str) -> str:
    struct: Any = DaemonConfig
    for part in path.split(".")[:-1]:
        fields = {f.name: f.type for f in msgspec.structs.fields(struct)}
        struct = fields.get(part)
        if not (isinstance(struct, type) and issubclass(struct, msgspec.Struct)):
            return ""
    names = [f.name for f in msgspec.structs.fields(struct)]
    return f" (known keys: {', '.join(names)})"
