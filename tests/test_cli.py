"""The `packsched` command against a real daemon running real commands on this machine."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from packsched import Resources, TaskSpec, TaskState
from packsched.api import Client
from packsched.cli import main

from .e2e.daemon import TOKEN, Daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    state = tmp_path_factory.mktemp("cli")
    cluster = {
        "kind": "local",
        "cpu": 2,
        "mem": "2GiB",
        "disk": "2GiB",
        "work_root": str(state / "work"),
    }
    d = Daemon(state, cluster=cluster).start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()


def run(daemon: Daemon, *argv: str, token: str = TOKEN) -> tuple[int, str]:
    out = io.StringIO()
    code = main([argv[0], "--url", daemon.url, "--token", token, *argv[1:]], out=out)
    return code, out.getvalue()


def test_submit_wait_show_ls(daemon: Daemon) -> None:
    """submit prints the id; wait exits 0 when it completed; show and ls display it."""
    code, out = run(
        daemon, "submit", "--cpu", "500m", "--mem", "64MiB", "--name", "hello", "--", "echo", "hi"
    )
    assert code == 0
    task_id = out.strip()
    code, out = run(daemon, "wait", task_id)
    assert code == 0 and "1 complete" in out
    code, out = run(daemon, "show", task_id)
    assert code == 0 and "state:        complete" in out and "echo hi" in out
    code, out = run(daemon, "ls")
    assert code == 0 and task_id in out and out.startswith("ID ")
    code, out = run(daemon, "ls", "--json", "--state", "complete")
    assert task_id in [t["id"] for t in json.loads(out)]


def test_wait_exits_1_when_a_task_fails(daemon: Daemon) -> None:
    """A task that exits non-zero makes wait (and submit --wait) exit 1 and show the error."""
    code, out = run(
        daemon, "submit", "--mem", "64MiB", "--wait", "--", "sh", "-c", "echo boom >&2; exit 4"
    )
    assert code == 1 and "error" in out
    task_id = out.splitlines()[1].split()[0]
    code, out = run(daemon, "show", task_id)
    assert "exit code:    4" in out and "boom" in out


def test_controls_and_their_exit_codes(daemon: Daemon) -> None:
    """hold, priority, kill; a control not allowed exits 6, an unknown id 5, a timeout 7."""
    code, out = run(daemon, "submit", "--hold", "--mem", "64MiB", "--", "true")
    task_id = out.strip()
    assert run(daemon, "wait", task_id, "--timeout", "0.1")[0] == 7
    code, out = run(daemon, "priority", task_id, "-3")
    assert code == 0 and "priority -3" in out
    code, out = run(daemon, "kill", task_id)
    assert code == 0 and out.split() == [task_id, "killed"]
    assert run(daemon, "release", task_id)[0] == 6
    assert run(daemon, "show", "0123456789abcdef")[0] == 5
    assert run(daemon, "wait", task_id)[0] == 1


def test_submit_from_a_jsonl_file_and_runs(daemon: Daemon, tmp_path: Path) -> None:
    """--file submits one spec per line; runs lists the run with its derived state."""
    lines = [
        json.dumps({"command": ["true"], "resources": {"mem": "32MiB"}, "run": "r-file"})
        for _ in range(3)
    ]
    path = tmp_path / "specs.jsonl"
    path.write_text("# three tasks\n" + "\n".join(lines) + "\n")
    code, out = run(daemon, "submit", "--file", str(path), "--wait")
    assert code == 0
    code, out = run(daemon, "runs")
    assert code == 0 and "r-file" in out and "done" in out
    code, out = run(daemon, "runs", "r-file", "--json")
    assert json.loads(out)["summary"]["total"] == 3
    code, out = run(daemon, "stats")
    assert code == 0 and out.startswith("tasks: ")


def test_usage_and_connection_errors(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad input exits 2 naming the flag, a wrong token 4, an unreachable daemon 3."""
    assert run(daemon, "submit", "--mem", "-1", "--", "true")[0] == 2
    assert "--mem" in capsys.readouterr().err
    assert run(daemon, "submit", "--label", "novalue", "--", "true")[0] == 2
    assert run(daemon, "submit")[0] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"command": ["true"], "resources": {"cpu": "lots"}}\n')
    assert run(daemon, "submit", "--file", str(bad))[0] == 2
    assert "resources.cpu" in capsys.readouterr().err
    assert run(daemon, "ls", token="wrong")[0] == 4
    out = io.StringIO()
    assert main(["ls", "--url", "http://127.0.0.1:9", "--retry-timeout", "0"], out=out) == 3
    assert "cannot reach" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_clients_find_the_daemon_from_its_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the state directory and port set only in a TOML file (and the token generated
    there by the daemon), `serve`, the CLI and the Python Client all find each other from
    `$PACKSCHED_CONFIG`, or the CLI from `--config`."""
    for name in ("PACKSCHED_URL", "PACKSCHED_TOKEN", "PACKSCHED_STATE_DIR", "PACKSCHED_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    d = Daemon(tmp_path, token=None).start(config_from_env=True)
    try:
        out = io.StringIO()
        assert main(["stats", "--config", str(d.config_path), "--json"], out=out) == 0
        assert json.loads(out.getvalue())["total_tasks"] == 0
        monkeypatch.setenv("PACKSCHED_CONFIG", str(d.config_path))
        assert main(["stats"], out=io.StringIO()) == 0
        with Client() as client:
            [task] = client.submit([TaskSpec(command=["true"], resources=Resources(cpu=0.1))])
            assert client.wait([task.id], timeout=30)[0].state is TaskState.COMPLETE
    finally:
        assert d.stop() == 0, d.log()


def test_a_config_without_a_fixed_port_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Port 0 is picked at start: the CLI says why it cannot find the daemon from the file."""
    config = tmp_path / "packsched.toml"
    config.write_text("[server]\nport = 0\n")
    assert main(["stats", "--config", str(config)], out=io.StringIO()) == 2
    assert "server.port is 0" in capsys.readouterr().err


def test_serve_refuses_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """serve with a bad config exits 2 and names the key."""
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = 'x'\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "server.port: expected int, got str" in capsys.readouterr().err
    assert main(["serve", "--set", "nonsense"]) == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    """The wait progress bar draws on a terminal and stays silent in a pipe."""
    from packsched import Task, TaskSpec, TaskState
    from packsched.cli import _Progress

    tasks = [
        Task(id=f"{i:016x}", spec=TaskSpec(command=["true"]), state=state)
        for i, state in enumerate([TaskState.COMPLETE, TaskState.ERROR])
    ]
    tty, pipe = _Terminal(), io.StringIO()
    for stream in (tty, pipe):
        bar = _Progress(2, stream)
        for task in tasks:
            bar.update(task)
        bar.close()
    assert "2/2 settled, 1 not complete" in tty.getvalue() and tty.getvalue().endswith("\n")
    assert pipe.getvalue() == ""


def test_serve_exits_1_when_the_port_is_taken(tmp_path: Path) -> None:
    """serve on an address already in use exits 1 and says why."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "packsched",
                "serve",
                "--port",
                str(port),
                "--cluster",
                "sim",
                "--store",
                "memory",
                "--state-dir",
                str(tmp_path),
                "--log-format",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert "cannot start" in proc.stderr and "in use" in proc.stderr
