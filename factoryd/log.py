"""structlog set-up: JSON lines to stdout for journald, or a console renderer for people."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from factoryd.errors import ConfigError

LogFormat = Literal["json", "console"]


def configure_logging(level: str = "info", fmt: LogFormat = "json") -> None:
    """Configure structlog (and stdlib logging, which uvicorn and aiomqtt use) once at start-up."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigError(f"log.level: unknown log level {level!r} (debug, info, warning, error)")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # No fixed file: each logger writes to sys.stdout as it is when the logger is made, so a
        # replaced stdout (tests, CLI runners) is never written to after it was closed.
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    # Alembic narrates every migration context at INFO; only its warnings matter to an operator.
    logging.getLogger("alembic").setLevel(max(numeric, logging.WARNING))
