"""bench/packing.py runs alone on small sizes and prints its tables (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "packing.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quick_run_prints_every_table_with_cpsat_or_skipped() -> None:
    """--quick prints the family table and both CP-SAT tables, with a status or 'skipped'."""
    proc = _run("--quick", "--no-write", "--cpsat-seconds", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for family in ("uniform random", "anti-correlated cpu/mem", "triplets (optimum n/3)"):
        assert out.count(family) == 3
    # spar's Alibaba sample is either packed or reported as skipped, in all three tables.
    assert out.count("alibaba 2018") == 3
    assert "within 5 %" in out
    cpsat_rows = [line for line in out.splitlines() if "OPTIMAL" in line or "FEASIBLE" in line]
    assert cpsat_rows or "skipped: ortools is not installed" in out
    assert "scenario" in out  # the place() table comes last


def test_instances_file_prints_allocs_and_cpsat(tmp_path: Path) -> None:
    """--instances prints one JSON line with every packer's allocs and CP-SAT's (or null)."""
    path = tmp_path / "mine.json"
    demands = [{"cpu": 3, "mem": 2 << 30}] * 5 + [{"cpu": 1, "mem": 6 << 30}] * 5
    path.write_text(json.dumps({"capacity": {"cpu": 4, "mem": 8 << 30}, "demands": demands}))
    proc = _run("--instances", str(path), "--cpsat-seconds", "2")
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["lower_bound"] == 5
    assert line["packsched"] == 5
    assert "ffd" in line and "ray" in line
    if line["cpsat_status"].startswith("skipped"):
        assert line["cpsat"] is None
    else:
        assert line["cpsat"] == 5 and line["cpsat_status"].startswith("OPTIMAL")


def test_instances_file_with_a_demand_too_big_names_it(tmp_path: Path) -> None:
    """A demand that fits no alloc is reported with its JSON path, and the run fails."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"capacity": {"cpu": 4}, "demands": [{"cpu": 1}, {"cpu": 8}]}))
    proc = _run("--instances", str(path))
    assert proc.returncode != 0
    assert "$.demands[1]" in proc.stderr
