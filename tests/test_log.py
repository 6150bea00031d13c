"""Daemon logging: JSON lines with the ids bound, console rendering on a terminal."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from packsched.log import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = False
    structlog.reset_defaults()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_carry_bound_ids() -> None:
    """In JSON format every line is one object with the event, level, time and bound ids."""
    out = io.StringIO()
    configure_logging("info", "auto", stream=out)  # not a terminal: JSON
    get_logger("packsched.test", task_id="0123456789abcdef").info("task held", alloc_id="a-1")
    get_logger("packsched.test").debug("too detailed")
    logging.getLogger("uvicorn.error").info("from the stdlib")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["event"] == "task held" and lines[0]["level"] == "info"
    assert lines[0]["task_id"] == "0123456789abcdef" and lines[0]["alloc_id"] == "a-1"
    assert "timestamp" in lines[0]
    assert lines[1]["event"] == "from the stdlib" and lines[1]["logger"] == "uvicorn.error"
    assert len(lines) == 2


def test_console_on_a_terminal() -> None:
    """On a terminal, `auto` renders for people, not JSON."""
    out = _Terminal()
    configure_logging("debug", "auto", stream=out)
    get_logger("packsched.test").debug("hello", task_id="x")
    text = out.getvalue()
    assert "hello" in text and "task_id" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
