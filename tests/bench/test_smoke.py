"""Each benchmark runs alone on a tiny size and prints its table (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--no-write", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_trace_replays_both_policies_and_prints_json() -> None:
    """trace.py replays a synthetic trace with packsched and the reference policy."""
    out = _run("trace.py", "--tasks", "120")
    assert "reference design" in out
    report = json.loads(out.strip().splitlines()[-1])
    synthetic = report["traces"]["synthetic (120 tasks)"]
    assert synthetic["packsched"]["tasks"] == 120
    assert synthetic["reference"]["tasks"] == 120


def test_trace_accepts_a_csv(tmp_path: Path) -> None:
    """trace.py --trace replays a user's CSV, with units in the mem column."""
    path = tmp_path / "mine.csv"
    path.write_text("arrival,duration,cpu,mem\n0,60,1,2GiB\n5,30,2,1073741824\n")
    out = _run("trace.py", "--trace", str(path))
    report = json.loads(out.strip().splitlines()[-1])
    assert report["traces"]["mine.csv"]["packsched"]["tasks"] == 2


def test_trace_rejects_a_bad_csv_naming_row_and_column(tmp_path: Path) -> None:
    """A bad cell is reported with its row and column, and the run fails."""
    path = tmp_path / "bad.csv"
    path.write_text("arrival,duration,cpu,mem\n0,-1,1,2GiB\n")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "trace.py"), "--no-write", "--trace", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "row 2" in proc.stderr and "duration" in proc.stderr


def test_throughput_prints_its_table() -> None:
    """throughput.py pushes zero-duration tasks through the Scheduler (peers skipped here)."""
    out = _run("throughput.py", "--no-dask", "--no-ray")
    assert "packsched, 8 cpus" in out
    assert "skipped: --no-dask" in out


def test_scale_prints_its_table() -> None:
    """scale.py times a placement pass and measures RSS per waiting task."""
    out = _run("scale.py")
    assert "place: one pass" in out
    assert "RSS per waiting task" in out
