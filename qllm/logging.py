"""structlog set-up: JSON lines when stderr is not a terminal (journald), readable text on one."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(
    level: str = "info", format: Literal["auto", "json", "console"] = "auto", stream: TextIO | None = None
) -> None:
    """Route every ``structlog.get_logger()`` of qllm to ``stream`` (stderr) at ``level``."""
    stream = sys.stderr if stream is None else stream
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LEVELS)}")
    as_json = format == "json" or (format == "auto" and not stream.isatty())
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        # Tracebacks never carry local variables: they would put prompts and token ids in the log.
        tracebacks = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        processors += [
            structlog.processors.ExceptionRenderer(tracebacks),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [
            structlog.dev.ConsoleRenderer(
                colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


class Throttled:
    """A logger for events that a client can trigger over and over: each (event, key) is logged at
    most once per ``interval`` seconds; the next line that gets through says how many were held
    back (``suppressed``)."""

    MAX_KEYS = 1024

    def __init__(self, logger: Any, interval: float = 10.0):
        self.logger = logger
        self.interval = interval
        self._seen: dict[tuple[str, Any], list[float | int]] = {}  # -> [last logged at, suppressed]

    def _log(self, level: str, event: str, key: Any, **fields: Any) -> None:
        now = time.monotonic()
        entry = self._seen.get((event, key))
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        suppressed = 0 if entry is None else int(entry[1])
        self._seen[(event, key)] = [now, 0]
        if suppressed:
            fields["suppressed"] = suppressed
        getattr(self.logger, level)(event, **fields)

    def info(self, event: str, key: Any, **fields: Any) -> None:
        self._log("info", event, key, **fields)

    def warning(self, event: str, key: Any, **fields: Any) -> None:
        self._log("warning", event, key, **fields)

    def error(self, event: str, key: Any, **fields: Any) -> None:
        self._log("error", event, key, **fields)
