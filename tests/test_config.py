"""The daemon's configuration: defaults, TOML < environment < flags, and errors that name the key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from packsched import GiB, MiB, Resources
from packsched.api.daemon import build_cluster, resolve_token
from packsched.cluster import SimCluster
from packsched.config import (
    ConfigError,
    DaemonConfig,
    LocalClusterConfig,
    SimClusterConfig,
    default_state_dir,
    load_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "packsched.toml"
    path.write_text(text)
    return path


def test_defaults_work_with_no_config(tmp_path: Path) -> None:
    """No file, no environment: loopback, the local cluster, SQLite under the state directory."""
    config = load_config(environ={"XDG_STATE_HOME": str(tmp_path)})
    assert config.server.host == "127.0.0.1"
    assert isinstance(config.cluster, LocalClusterConfig)
    assert config.store.kind == "sqlite"
    assert config.server.token is None and config.server.metrics_auth
    assert default_state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "packsched"
    assert default_state_dir({"HOME": "/h"}).name == "packsched"
    assert default_state_dir({"PACKSCHED_STATE_DIR": "/srv/ps"}) == Path("/srv/ps")
    assert DaemonConfig(state_dir=str(tmp_path)).store_path() == tmp_path / "packsched.db"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    """Each source overrides the one before it, key by key."""
    path = write(
        tmp_path,
        '[server]\nport = 9000\nhost = "0.0.0.0"\n[scheduler]\nmax_pending_allocs = 7\n',
    )
    env = {
        "PACKSCHED_SERVER__PORT": "9100",
        "PACKSCHED_SCHEDULER__LABELS": '{ team = "bio" }',
        "PACKSCHED_STATE_DIR": str(tmp_path / "state"),
        "PACKSCHED_URL": "http://elsewhere",  # a client variable: ignored here
        "PACKSCHED_TOKEN": "client-token",
    }
    overrides = {
        "server.port": 9200,
        "log.level": "debug",
        "cluster.executor": "{ kill_grace = 1.5 }",
    }
    config = load_config(path, environ=env, overrides=overrides)
    assert config.cluster.executor.kill_grace == 1.5  # type: ignore[union-attr]
    assert config.server.port == 9200
    assert config.server.host == "0.0.0.0"
    assert config.scheduler.max_pending_allocs == 7
    assert config.scheduler.labels == {"team": "bio"}
    assert config.state_dir == str(tmp_path / "state")
    assert config.log.level == "debug"
    assert config.server.token is None
    assert load_config(path, environ=env).server.port == 9100


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('[server]\nport = "eighty"\n', {}, "server.port: expected int, got str"),
        ("[server]\nprot = 80\n", {}, "server.prot: unknown key (known keys: host, port"),
        ("[serve]\nport = 80\n", {}, "serve: unknown key"),
        ('[store]\nkind = "postgres"\n', {}, "store.kind"),
        ("[server]\nport = 70000\n", {}, "TCP port"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"PACKSCHED_SERVER__PROT": "1"}, "server.prot: unknown key"),
        ("", {"PACKSCHED_SERVER__PORT": "x"}, "server.port: expected int, got str"),
        ("", {"PACKSCHED_SCHEDULER__LABELS": "{ oops"}, "PACKSCHED_SCHEDULER__LABELS"),
        ('[scheduler.min_alloc]\nmem = "lots"\n', {}, "scheduler.min_alloc"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    """A bad or unknown key is reported by its dotted path (and the file it is in)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    assert message in str(info.value)
    if text and "TOML" not in message and not env:
        assert str(path) in str(info.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """A config file that cannot be read is named in the error."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml", environ={})


def test_units_in_scheduler_and_cluster(tmp_path: Path) -> None:
    """min_alloc and sim shapes take people's units; a cluster table without kind is local."""
    path = write(
        tmp_path,
        '[scheduler.min_alloc]\ncpu = "500m"\nmem = "512MiB"\n'
        '[cluster]\nkind = "sim"\nshapes = [{cpu = 8, mem = "32GiB", price = 2.0}]\n',
    )
    config = load_config(path, environ={})
    assert config.scheduler.min_alloc == Resources(cpu=0.5, mem=512 * MiB)
    assert isinstance(config.cluster, SimClusterConfig)
    cluster = build_cluster(config)
    assert isinstance(cluster, SimCluster)
    [shape] = cluster.shapes()
    assert shape.resources.mem == 32 * GiB and shape.price == 2.0
    local = load_config(write(tmp_path, '[cluster]\ncpu = 2\nmem = "1GiB"\n'), environ={})
    assert isinstance(local.cluster, LocalClusterConfig) and local.cluster.cpu == 2


def test_token_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    """With no token configured, one is written to <state_dir>/token (0600) and reused."""
    config = DaemonConfig(state_dir=str(tmp_path))
    token, path = resolve_token(config)
    assert path == tmp_path / "token" and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_token(config) == (token, path)


def test_token_from_config_or_file(tmp_path: Path) -> None:
    """A configured token wins; a token file is read; an empty one is an error."""
    assert resolve_token(load_config(environ={"PACKSCHED_SERVER__TOKEN": "s3cret"}))[0] == "s3cret"
    file = tmp_path / "tok"
    file.write_text("from-file\n")
    file.chmod(0o600)
    config = load_config(environ={"PACKSCHED_SERVER__TOKEN_FILE": str(file)})
    assert resolve_token(config) == ("from-file", file)
    file.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        resolve_token(config)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:9001"),
        ("0.0.0.0", "http://127.0.0.1:9001"),
        ("::", "http://[::1]:9001"),
        ("fd00::5", "http://[fd00::5]:9001"),
        ("sched.example.org", "http://sched.example.org:9001"),
    ],
)
def test_client_url_from_the_daemon_config(tmp_path: Path, host: str, url: str) -> None:
    """A client reaches the configured address; a wildcard listen address on loopback."""
    config = load_config(write(tmp_path, f'[server]\nhost = "{host}"\nport = 9001\n'))
    assert config.client_url() == url


def test_client_url_needs_a_fixed_port(tmp_path: Path) -> None:
    """Port 0 is picked when the daemon starts: the config cannot tell a client where it is."""
    config = load_config(write(tmp_path, "[server]\nport = 0\n"))
    with pytest.raises(ConfigError, match=r"server\.port is 0"):
        config.client_url()


def test_client_token_from_the_daemon_config(tmp_path: Path) -> None:
    """server.token, else server.token_file, else the token the daemon wrote in its state
    directory (None before it has); an unreadable token_file is an error naming the key."""
    state = tmp_path / "state"
    config = DaemonConfig(state_dir=str(state))
    assert config.client_token() is None
    state.mkdir()
    token, _ = resolve_token(config)  # what the daemon does when it starts
    assert config.client_token() == token
    file = tmp_path / "tok"
    file.write_text("from-file\n")
    from_file = load_config(
        environ={"PACKSCHED_STATE_DIR": str(state), "PACKSCHED_SERVER__TOKEN_FILE": str(file)}
    )
    assert from_file.client_token() == "from-file"
    assert load_config(environ={"PACKSCHED_SERVER__TOKEN": "s3cret"}).client_token() == "s3cret"
    file.unlink()
    with pytest.raises(ConfigError, match=r"server\.token_file: cannot read"):
        from_file.client_token()


def test_the_documented_example_loads() -> None:
    """docs/packsched.toml, the documented example, is a valid config."""
    example = Path(__file__).resolve().parent.parent / "docs" / "packsched.toml"
    config = load_config(example, environ={})
    assert config.server.port == 8742 and isinstance(config.cluster, LocalClusterConfig)


def test_client_reads_the_config_file_once_and_only_when_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Client takes its address and token from one read of `$PACKSCHED_CONFIG`, and does not
    read it at all when `$PACKSCHED_URL` and `$PACKSCHED_TOKEN` are set."""
    from packsched.api import Client, client

    reads: list[str] = []

    def counting(path: str) -> DaemonConfig:
        reads.append(path)
        return load_config(path)

    monkeypatch.setattr(client, "load_config", counting)
    for name in ("PACKSCHED_URL", "PACKSCHED_TOKEN", "PACKSCHED_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    path = write(tmp_path, '[server]\nport = 9003\ntoken = "from-file"\n')
    monkeypatch.setenv("PACKSCHED_CONFIG", str(path))
    with Client() as c:
        assert c.url == "http://127.0.0.1:9003"
    assert reads == [str(path)]
    path.write_text("not toml [")
    monkeypatch.setenv("PACKSCHED_URL", "http://10.0.0.5:8742")
    monkeypatch.setenv("PACKSCHED_TOKEN", "from-env")
    with Client() as c:
        assert c.url == "http://10.0.0.5:8742"
    assert reads == [str(path)]
