"""structlog set-up: JSON lines when stderr is not a terminal (journald), readable text on one.

qllm is quiet as a library: its modules log through :func:`get_logger`, which drops every event
until logging is configured, by :func:`configure` (``qllm serve`` and the other commands call it)
or by the application's own ``structlog.configure``.
"""

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
    route_stdlib_logging(max(LEVELS[level], logging.WARNING) if level != "debug" else logging.DEBUG)


def get_logger() -> LibraryLogger:
    """The logger of a qllm module (``log = get_logger()``): structlog's, silent until logging is
    configured."""
    return LibraryLogger()


def _drop(*args: Any, **kwargs: Any) -> None:
    return None


class LibraryLogger:
    """A structlog logger that drops every event while structlog is unconfigured: structlog's
    defaults print to stdout, which belongs to the application that uses qllm. Once configured,
    each call goes to ``structlog.get_logger()`` as the configuration stands at that moment."""

    __slots__ = ("_context",)

    def __init__(self, **context: Any):
        self._context = context

    def bind(self, **values: Any) -> LibraryLogger:
        return LibraryLogger(**self._context, **values)

    def __getattr__(self, name: str) -> Any:
        if not structlog.is_configured():
            return _drop
        return getattr(structlog.get_logger(**self._context), name)


def cut(text: str, limit: int = 1024) -> str:
    """``text`` at most ``limit`` characters long: its head and tail around an ellipsis, so that a
    message quoting client input stays bounded and keeps what follows the quote."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return text[: limit - tail - 1] + "…" + text[len(text) - tail :]


class StructlogHandler(logging.Handler):
    """Sends the records of the standard library's loggers (uvicorn's, asyncio's, other
    libraries') through structlog, so that every line has qllm's format: one ``library_log``
    event with the ``logger``, its ``message`` (cut to 1024 characters) and any traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = cut(record.getMessage())
        except Exception:  # a record whose arguments do not fit its format
            message = cut(str(record.msg))
        level = "error" if record.levelno >= logging.ERROR else "warning"
        if record.levelno < logging.WARNING:
            level = "info" if record.levelno >= logging.INFO else "debug"
        fields: dict[str, Any] = {"logger": record.name, "message": message}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        getattr(structlog.get_logger(), level)("library_log", **fields)


def route_stdlib_logging(level: int = logging.WARNING) -> None:
    """Route the root logger, and so every library logger that propagates to it, through
    :class:`StructlogHandler` at ``level`` (and Python's warnings with them). Libraries' info
    lines are left out unless qllm logs at debug: qllm's own lines say what they would."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StructlogHandler):
            root.removeHandler(handler)
    root.addHandler(StructlogHandler())
    root.setLevel(level)
    logging.captureWarnings(True)


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
