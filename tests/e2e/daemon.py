"""A real `packsched serve` subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

TOKEN = "e2e-token-0123456789"


def free_port() -> int:
    """A port nothing listens on right now (the daemon binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]], **top: Any) -> Path:
    """Write a TOML config with top-level keys and `[section]` tables."""
    lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
    for name, table in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """One `python -m packsched serve` process; `start()` returns once /livez answers."""

    def __init__(
        self,
        state_dir: Path,
        *,
        cluster: dict[str, Any] | None = None,
        token: str | None = TOKEN,
        **server: Any,
    ) -> None:
        """`token=None` leaves the token out of the config: the daemon generates one into
        `<state_dir>/token`."""
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir / "daemon.log"
        self.config_path = write_config(
            state_dir / "packsched.toml",
            {
                "server": {"port": self.port, **({"token": token} if token else {}), **server},
                "store": {"kind": "sqlite", "path": str(state_dir / "packsched.db")},
                "cluster": cluster or {"kind": "sim"},
                "scheduler": {"drain_timeout": 0.002},
                "log": {"format": "json", "level": "info"},
            },
            state_dir=str(state_dir),
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, *, config_from_env: bool = False) -> Daemon:
        """Start the process without waiting for it to listen; the config file is named by
        `--config`, or by `$PACKSCHED_CONFIG` alone with `config_from_env`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSCHED_")}
        argv = [sys.executable, "-m", "packsched", "serve"]
        if config_from_env:
            env["PACKSCHED_CONFIG"] = str(self.config_path)
        else:
            argv += ["--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def start(self, timeout: float = 30.0, *, config_from_env: bool = False) -> Daemon:
        """Spawn the daemon and wait until it answers /livez."""
        self.spawn(config_from_env=config_from_env)
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/livez", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon did not start within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send a signal to the daemon."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end; return its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait_exit(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http(self, token: str | None = TOKEN) -> httpx.Client:
        """A raw HTTP client for the daemon, with the token unless told otherwise."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)
