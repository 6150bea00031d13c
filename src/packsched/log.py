"""Logging for the daemon: structlog, JSON lines for machines, a readable console for people.

Library code gets its logger with `get_logger(__name__)` and binds the ids a line is about
(`log.bind(task_id=...)`); only the daemon calls `configure_logging`, so that embedding
packsched never reconfigures the host program's logging.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

__all__ = ["configure_logging", "get_logger"]

LogFormat = Literal["json", "console", "auto"]


# Library loggers go through the stdlib logger of their name, whatever the host program did
# with structlog: embedded, packsched is as quiet as the host's logging config says (warnings
# only, by default); under `configure_logging` the root handler renders them as JSON lines.
_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A structlog logger backed by the stdlib logger `name`, with some context bound."""
    logger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return logger.bind(**bound) if bound else logger


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", *, stream: TextIO | None = None
) -> None:
    """Send structlog and stdlib logging (uvicorn, asyncio) to `stream` in one format.

    Args:
        level: the least severe level written (debug, info, warning, error).
        fmt: `json` lines, `console` for people, or `auto`: console on a terminal, else json.
        stream: where to write; stderr by default.
    """
    out = stream or sys.stderr
    numeric = logging.getLevelNamesMapping()[level.upper()]
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # The stdlib loggers of our dependencies go through the same renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # uvicorn's loggers may carry a level or handlers of their own (from a uvicorn.Config made
    # earlier in this process); they follow the daemon's level and format instead.
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    # uvicorn's access log would print every request; the API logs what matters itself.
    logging.getLogger("uvicorn.access").disabled = True
