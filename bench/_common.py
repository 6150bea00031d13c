"""Small helpers shared by the benchmarks: timing, the machine line, and table output."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line naming the machine the numbers come from, and how busy it was."""
    line = (
        f"{platform.platform()}, {os.cpu_count()} cpus, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    if hasattr(os, "getloadavg"):
        line += f", 1-minute load average {os.getloadavg()[0]:.1f}"
    return line


def timed(
    fn: Callable[[], T], repeats: int = 3, *, max_seconds: float | None = None
) -> tuple[T, float]:
    """Run fn `repeats` times; return its last result and the median wall time in seconds.

    With `max_seconds`, stop repeating once that much time has been spent (at least one run),
    so that slow cases do not stretch a benchmark past its time budget.
    """
    times: list[float] = []
    result: T
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if max_seconds is not None and sum(times) >= max_seconds:
            break
    return result, statistics.median(times)


def _cells(rows: Sequence[Sequence[object]]) -> list[list[str]]:
    return [[str(c) for c in row] for row in rows]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned plain-text table: text left, numbers right."""
    body = _cells(rows)
    widths = [max(len(h), *(len(r[k]) for r in body)) for k, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for k, c in enumerate(cells):
            numeric = c[:1].isdigit() or (c[:1] in "-+." and c[1:2].isdigit())
            out.append(c.rjust(widths[k]) if numeric else c.ljust(widths[k]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in body)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table as GitHub markdown."""
    body = _cells(rows)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out.extend("| " + " | ".join(r) + " |" for r in body)
    return "\n".join(out)


def write_markdown(name: str, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write `bench/results/<name>.md`: a title, the machine line, then (heading, text) sections."""
    RESULTS.mkdir(exist_ok=True)
    parts = [f"# {title}", "", f"Machine: {machine()}.", f"Command: `{' '.join(sys.argv)}`."]
    for heading, text in sections:
        if heading:
            parts += ["", f"## {heading}"]
        parts += ["", text]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def ratio(a: float, b: float) -> str:
    """a / b with three decimals, or '-' when b is zero."""
    return f"{a / b:.3f}" if b else "-"
