"""The README's examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_real_commands_and_prints_statistics(tmp_path: Path) -> None:
    """examples/quickstart.py runs three real commands on LocalCluster and prints their use."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
    ).stdout
    lines = [line for line in out.splitlines() if "exit=" in line]
    assert len(lines) == 3
    assert "complete" in lines[0] and "peak=" in lines[0]
    assert "error" in lines[2] and "exit=3" in lines[2]


def test_readme_shows_the_quickstart_as_it_is() -> None:
    """The README's Python example is examples/quickstart.py, line for line."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = (EXAMPLES / "quickstart.py").read_text()
    assert code[code.index("import anyio") :] in readme
