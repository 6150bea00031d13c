"""The `packsched` command: run the daemon, and talk to it.

Exit codes (scripts may rely on them):

  0  success
  1  a waited-for task did not complete (it failed, errored, was killed or skipped);
     for `serve`: the daemon could not start (address in use, store locked or corrupt)
  2  usage error or invalid input (bad flags, a bad spec, a bad config)
  3  the daemon cannot be reached (or stayed unavailable)
  4  the daemon refused the bearer token
  5  no such task or run
  6  the control is not allowed in the task's current state
  7  timed out waiting
  8  any other error the daemon reported
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec

from .api.client import ApiError, Client, DaemonUnreachableError, UnauthorizedError
from .api.models import WireTaskSpec, decode_error
from .errors import (
    InvalidSpecError,
    InvalidTransition,
    PackschedError,
    StoreError,
    TaskNotFoundError,
)
from .resources import format_bytes
from .task import Task, TaskState

__all__ = ["main"]

OK, NOT_COMPLETE, USAGE, UNREACHABLE, UNAUTHORIZED, NOT_FOUND, CONFLICT, TIMEOUT, OTHER = range(9)
CANNOT_START = NOT_COMPLETE  # `serve` only

_json = msgspec.json.Encoder()
_wire_spec = msgspec.json.Decoder(WireTaskSpec)


class _Exit(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


# -- output helpers --------------------------------------------------------------------------


def table(rows: Sequence[Sequence[object]], header: Sequence[str], out: TextIO) -> None:
    """Print left-aligned columns, the header first."""
    cells = [
        [str(c) for c in header],
        *[["" if c is None else str(c) for c in row] for row in rows],
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _ago(ts: float | None) -> str:
    if not ts:
        return ""
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _exit_code(task: Task) -> str:
    return (
        "" if task.result is None or task.result.exit_code is None else str(task.result.exit_code)
    )


def _task_rows(tasks: Sequence[Task]) -> list[list[object]]:
    return [
        [
            t.id,
            t.state.value,
            t.spec.priority,
            t.spec.display_name(),
            t.spec.run or "",
            t.alloc_id or "",
            t.attempt,
            _exit_code(t),
            *_used(t),
            _ago(t.submitted_at),
        ]
        for t in tasks
    ]


def _used(t: Task) -> tuple[str, str]:
    """Duration and peak memory of the latest attempt, for the task tables."""
    stats = t.result.output.runtime_statistics if t.result else None
    if stats is None:
        return "", ""
    return f"{stats.duration:.2f}s", format_bytes(stats.memory) if stats.memory else ""


_TASK_HEADER = (
    "ID",
    "STATE",
    "PRI",
    "NAME",
    "RUN",
    "ALLOC",
    "TRY",
    "EXIT",
    "TIME",
    "PEAK MEM",
    "SUBMITTED",
)


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(_json.encode(obj).decode() + "\n")


def _show_task(t: Task, out: TextIO) -> None:
    spec = t.spec
    lines = [
        ("id", t.id),
        ("name", spec.display_name()),
        ("state", t.state.value),
        ("command", shlex.join(spec.command)),
        ("resources", spec.resources.describe()),
        ("priority", spec.priority),
        ("attempt", t.attempt),
        ("alloc", t.alloc_id),
        ("run", spec.run),
        ("kind", spec.kind),
        ("labels", ", ".join(f"{k}={v}" for k, v in spec.labels.items()) or None),
        ("after", ", ".join(spec.after) or None),
        ("submitted", _ago(t.submitted_at)),
        ("started", _ago(t.started_at)),
        ("finished", _ago(t.finished_at)),
    ]
    if t.result is not None:
        lines.append(("exit code", t.result.exit_code))
        stats = t.result.output.runtime_statistics
        if stats is not None:
            lines.append(("duration", f"{stats.duration:.3f}s"))
            lines.append(("cpu time", f"{stats.cpu_time:.3f}s"))
            lines.append(("peak memory", format_bytes(stats.memory)))
        for error in t.result.output.errors:
            lines.append((f"error ({error.code})", error.message))
    for key, value in lines:
        if value not in (None, ""):
            out.write(f"{key + ':':<13} {value}\n")
    if t.result is not None and t.result.stderr_tail:
        out.write("stderr (tail):\n" + t.result.stderr_tail.rstrip() + "\n")


# -- commands --------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    url, token = args.url, args.token
    if args.config and (url is None or token is None):
        from .config import load_config

        config = load_config(args.config)
        url = url or config.client_url()
        token = token if token is not None else config.client_token()
    return Client(url, token, retry_timeout=args.retry_timeout)


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    """Run the daemon in the foreground until SIGTERM / SIGINT."""
    import anyio

    from .api.daemon import serve
    from .config import CONFIG_ENV, ConfigError, load_config
    from .log import configure_logging

    overrides: dict[str, Any] = {}
    for flag, key in (
        ("host", "server.host"),
        ("port", "server.port"),
        ("state_dir", "state_dir"),
        ("token_file", "server.token_file"),
        ("store", "store.kind"),
        ("store_path", "store.path"),
        ("cluster", "cluster.kind"),
        ("log_level", "log.level"),
        ("log_format", "log.format"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _Exit(USAGE, f"--set expects KEY=VALUE (e.g. server.port=9000), got {item!r}")
        overrides[key] = value
    try:
        config = load_config(args.config or os.environ.get(CONFIG_ENV), overrides=overrides)
    except ConfigError as exc:
        raise _Exit(USAGE, f"invalid configuration: {exc}") from None
    configure_logging(config.log.level, config.log.format)
    try:
        anyio.run(serve, config)
    except ConfigError as exc:
        raise _Exit(USAGE, f"invalid configuration: {exc}") from None
    except (StoreError, OSError) as exc:
        raise _Exit(CANNOT_START, f"cannot start: {exc}") from None
    return OK


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _Exit(USAGE, f"--{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def cmd_agent(args: argparse.Namespace, out: TextIO) -> int:
    """Run `packsched agent` (see packsched.agent); a missing value is a usage error."""
    from .agent import run_from_args

    try:
        return run_from_args(args)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            raise _Exit(USAGE, exc.code.removeprefix("packsched agent: ")) from None
        raise


def _spec_from_flags(args: argparse.Namespace) -> WireTaskSpec:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise _Exit(USAGE, "submit: give a command after `--`, or --file FILE")
    pairs = {flag: _pairs(getattr(args, flag), flag) for flag in ("label", "env")}
    resources: dict[str, Any] = {
        k: getattr(args, k) for k in ("cpu", "mem", "disk", "gpu") if getattr(args, k) is not None
    }
    raw: dict[str, Any] = {
        "command": command,
        "resources": resources,
        "priority": args.priority,
        "name": args.name,
        "kind": args.kind,
        "run": args.run,
        "cwd": args.cwd,
        "labels": pairs["label"],
        "env": pairs["env"],
        "after": args.after or [],
        "timeout": args.timeout,
        "expected_duration": args.expected_duration,
        "retries": args.retries,
        "hold": args.hold,
        "key": args.key,
    }
    return _wire_spec.decode(_json.encode(raw))


def _specs_from_file(path: str) -> list[WireTaskSpec]:
    stream = sys.stdin if path == "-" else None
    try:
        text = stream.read() if stream else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise _Exit(USAGE, f"cannot read {path}: {exc.strerror}") from None
    specs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            specs.append(_wire_spec.decode(line))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise _Exit(USAGE, f"{path}:{number}: {decode_error(exc)}") from None
    return specs


def cmd_submit(args: argparse.Namespace, out: TextIO) -> int:
    """Submit one task from flags, or many from a JSON-lines file; print their ids."""
    if args.file and args.command and args.command != ["--"]:
        raise _Exit(USAGE, "submit: give either --file or a command, not both")
    try:
        if args.file:
            specs = [
                w.to_spec(f"{args.file}:$[{i}]") for i, w in enumerate(_specs_from_file(args.file))
            ]
        else:
            specs = [_spec_from_flags(args).to_spec("--")]
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _Exit(USAGE, str(decode_error(exc))) from None
    except InvalidSpecError as exc:
        # From flags, `--.resources.mem` reads better as `--mem`.
        message = str(exc).replace("--.resources.", "--").replace("--.", "--")
        raise _Exit(USAGE, message) from None
    with _client(args) as client:
        tasks = client.submit(specs)
        if args.wait:
            tasks = client.wait([t.id for t in tasks])
    if args.json:
        _print_json(tasks, out)
    elif args.wait:
        table(_task_rows(tasks), _TASK_HEADER, out)
    else:
        out.write("".join(f"{t.id}\n" for t in tasks))
    if args.wait and any(t.state != TaskState.COMPLETE for t in tasks):
        return NOT_COMPLETE
    return OK


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    """List tasks, oldest first."""
    labels = _pairs(args.label, "label")
    with _client(args) as client:
        tasks = client.list_tasks(
            state=args.state, label=labels or None, run=args.run, kind=args.kind, limit=args.limit
        )
    if args.json:
        _print_json(tasks, out)
    else:
        table(_task_rows(tasks), _TASK_HEADER, out)
    return OK


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    """Show one or more tasks in full."""
    with _client(args) as client:
        tasks = [client.get(task_id) for task_id in args.ids]
    if args.json:
        _print_json(tasks if len(tasks) > 1 else tasks[0], out)
        return OK
    for i, task in enumerate(tasks):
        if i:
            out.write("\n")
        _show_task(task, out)
    return OK


class _Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.enabled = stream.isatty()
        self.done = self.bad = 0

    def update(self, task: Task) -> None:
        self.done += 1
        self.bad += task.state != TaskState.COMPLETE
        if self.enabled:
            width = 30
            filled = width * self.done // max(1, self.total)
            bar = "#" * filled + "." * (width - filled)
            note = f", {self.bad} not complete" if self.bad else ""
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} settled{note}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def cmd_wait(args: argparse.Namespace, out: TextIO) -> int:
    """Wait for tasks to settle (all, or the first with --first); exit 1 if one did not complete."""
    ids = list(dict.fromkeys(args.ids))
    with _client(args) as client:
        try:
            if args.first:
                tasks = client.wait(ids, timeout=args.timeout, return_when="first")
            else:
                progress = _Progress(len(ids), sys.stderr)
                settled: dict[str, Task] = {}
                try:
                    for task in client.as_completed(ids, timeout=args.timeout):
                        settled[task.id] = task
                        progress.update(task)
                finally:
                    progress.close()
                tasks = [settled[i] for i in ids]
        except TimeoutError as exc:
            raise _Exit(TIMEOUT, str(exc)) from None
    if args.json:
        _print_json(tasks, out)
    else:
        counts: dict[str, int] = {}
        for t in tasks:
            counts[t.state.value] = counts.get(t.state.value, 0) + 1
        bad = [t for t in tasks if t.state != TaskState.COMPLETE]
        if bad:
            table(_task_rows(bad), _TASK_HEADER, out)
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        out.write(f"{len(tasks)} settled: {summary}\n")
    return NOT_COMPLETE if any(t.state != TaskState.COMPLETE for t in tasks) else OK


def _control(action: str) -> Callable[[argparse.Namespace, TextIO], int]:
    def run(args: argparse.Namespace, out: TextIO) -> int:
        with _client(args) as client:
            tasks = [getattr(client, action)(task_id) for task_id in args.ids]
        if args.json:
            _print_json(tasks, out)
        else:
            out.write("".join(f"{t.id} {t.state.value}\n" for t in tasks))
        return OK

    run.__doc__ = f"{action.capitalize()} tasks."
    return run


def cmd_priority(args: argparse.Namespace, out: TextIO) -> int:
    """Change a task's priority."""
    with _client(args) as client:
        task = client.set_priority(args.id, args.priority)
    if args.json:
        _print_json(task, out)
    else:
        out.write(f"{task.id} priority {task.spec.priority}\n")
    return OK


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    """Show tasks by state and the live allocs."""
    with _client(args) as client:
        snap = client.stats(include_tasks=args.json)
    if args.json:
        _print_json(snap, out)
        return OK
    by_state = ", ".join(f"{n} {s.value}" for s, n in snap.tasks_by_state.items() if n)
    out.write(f"tasks: {snap.total_tasks} ({by_state or 'none'})\n")
    out.write(
        f"allocs: {len(snap.live_allocs())} live, {snap.counters.allocs_started} since start; "
    )
    out.write(f"{snap.pending_alloc_requests} requests pending\n")
    live = snap.live_allocs()
    if live:
        out.write("\n")
        rows = [
            [
                a.id,
                a.resources.describe(),
                a.available.describe(),
                len(a.task_ids),
                _ago(a.created_at),
            ]
            for a in live
        ]
        table(rows, ("ALLOC", "RESOURCES", "FREE", "TASKS", "CREATED"), out)
    return OK


def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    """List runs, or show (or --kill) one."""
    with _client(args) as client:
        if args.run is None:
            runs = client.runs()
            if args.json:
                _print_json(runs, out)
            else:
                rows = [
                    [
                        r.run,
                        r.state.value,
                        r.total,
                        ", ".join(f"{n} {s}" for s, n in r.counts.items()),
                        _ago(r.submitted_at),
                    ]
                    for r in runs
                ]
                table(rows, ("RUN", "STATE", "TASKS", "BY STATE", "SUBMITTED"), out)
            return OK
        if args.kill:
            killed = client.kill_run(args.run)
            if args.json:
                _print_json(killed, out)
            else:
                out.write(
                    f"run {args.run}: killed {len(killed.killed)} tasks; now {killed.summary.state.value}\n"
                )
            return OK
        detail = client.run(args.run)
    if args.json:
        _print_json(detail, out)
    else:
        s = detail.summary
        out.write(f"run {s.run}: {s.state.value}, {s.total} tasks\n\n")
        table(_task_rows(detail.tasks), _TASK_HEADER, out)
    return OK


# -- the parser ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packsched",
        description="An asyncio bin-packing scheduler daemon, and a client for it.",
        epilog="exit codes: 0 ok, 1 a task did not complete, 2 usage or invalid input, "
        "3 daemon unreachable, 4 bad token, 5 not found, 6 not allowed in this state, "
        "7 timed out, 8 other daemon error",
    )
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help="the daemon (default $PACKSCHED_URL, else http://127.0.0.1:8742)"
    )
    common.add_argument(
        "--token", help="bearer token (default $PACKSCHED_TOKEN, else <state_dir>/token)"
    )
    common.add_argument(
        "--config",
        metavar="FILE",
        help="the daemon's TOML config, to find its address and token when --url / --token "
        "are not given (default $PACKSCHED_CONFIG)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument(
        "--retry-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="retry an unreachable daemon this long (default 10)",
    )

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument("--config", metavar="FILE", help="TOML config file (default $PACKSCHED_CONFIG)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8742; 0 picks a free one)")
    p.add_argument("--state-dir", help="token, SQLite log (default ~/.local/state/packsched)")
    p.add_argument("--token-file", help="read the bearer token from this file")
    p.add_argument("--store", choices=["sqlite", "memory"])
    p.add_argument("--store-path", help="the SQLite file (default <state_dir>/packsched.db)")
    p.add_argument("--cluster", choices=["local", "sim", "process", "slurm"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["json", "console", "auto"])
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key, e.g. scheduler.max_pending_allocs=10",
    )
    p.set_defaults(func=cmd_serve)

    from .agent import build_parser as add_agent_options

    p = sub.add_parser("agent", help="run inside a remote alloc: execute a daemon's tasks")
    add_agent_options(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "submit",
        parents=[common],
        help="submit tasks",
        usage="%(prog)s [options] -- COMMAND [ARG ...]",
    )
    p.add_argument("--cpu", help="cores, e.g. 2 or 500m")
    p.add_argument("--mem", help="memory, e.g. 4GiB")
    p.add_argument("--disk", help="disk, e.g. 10GiB")
    p.add_argument("--gpu", help="GPUs")
    p.add_argument("--priority", type=int, default=0, help="lower runs first (default 0)")
    p.add_argument(
        "--after", action="append", metavar="ID", help="run after this task completes (repeatable)"
    )
    p.add_argument("--name")
    p.add_argument("--kind", help="groups runs of the same job for statistics (default: name)")
    p.add_argument("--run", help="the pipeline run this task belongs to")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--env", action="append", metavar="KEY=VALUE")
    p.add_argument("--cwd")
    p.add_argument("--timeout", type=float, metavar="S", help="kill the attempt after S seconds")
    p.add_argument("--expected-duration", type=float, metavar="S")
    p.add_argument("--retries", type=int, default=0, help="automatic retries after an error")
    p.add_argument("--hold", action="store_true", help="submit held")
    p.add_argument("--key", help="idempotency key (default: a fresh one)")
    p.add_argument("--file", metavar="FILE", help="JSON lines, one spec per line ('-' for stdin)")
    p.add_argument(
        "--wait", action="store_true", help="wait for the tasks; exit 1 unless all complete"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("ls", parents=[common], help="list tasks")
    p.add_argument("--state", action="append", choices=[s.value for s in TaskState])
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--run")
    p.add_argument("--kind")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", parents=[common], help="show tasks in full")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("wait", parents=[common], help="wait for tasks to settle")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--timeout", type=float, metavar="S")
    p.add_argument("--first", action="store_true", help="return when the first settles")
    p.set_defaults(func=cmd_wait)

    for action, text in (
        ("hold", "keep waiting tasks from starting"),
        ("release", "release held tasks"),
        ("kill", "kill tasks"),
        ("retry", "retry tasks in error"),
    ):
        p = sub.add_parser(action, parents=[common], help=text)
        p.add_argument("ids", nargs="+", metavar="ID")
        p.set_defaults(func=_control(action))

    p = sub.add_parser("priority", parents=[common], help="change a task's priority")
    p.add_argument("id", metavar="ID")
    p.add_argument("priority", type=int)
    p.set_defaults(func=cmd_priority)

    p = sub.add_parser("stats", parents=[common], help="tasks by state and live allocs")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("runs", parents=[common], help="list runs, or show one")
    p.add_argument("run", nargs="?")
    p.add_argument("--kill", action="store_true", help="kill every task of the run")
    p.set_defaults(func=cmd_runs)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the CLI; return the exit code."""
    stdout = out or sys.stdout
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 for --help
        return int(exc.code or 0)
    try:
        code: int = args.func(args, stdout)
        return code
    except _Exit as exc:
        if str(exc):
            print(f"packsched: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except PackschedError as exc:
        print(f"packsched: {exc}", file=sys.stderr)
        return _code_for(exc)


def _code_for(exc: PackschedError) -> int:
    if isinstance(exc, DaemonUnreachableError):
        return UNREACHABLE
    if isinstance(exc, UnauthorizedError):
        return UNAUTHORIZED
    if isinstance(exc, TaskNotFoundError) or (isinstance(exc, ApiError) and exc.status == 404):
        return NOT_FOUND
    if isinstance(exc, InvalidTransition):
        return CONFLICT
    if isinstance(exc, InvalidSpecError) or (
        isinstance(exc, ApiError) and exc.status in (400, 413)
    ):
        return USAGE
    if isinstance(exc, ApiError) and exc.status == 503:
        return UNREACHABLE
    return OTHER
