"""The exceptions a client raises: one class per wire error code (see docs/protocol.md)."""

from __future__ import annotations

from qllm import protocol as p
from qllm.errors import EngineClosed, InvalidRequest, QllmError, RequestFailed, TenantOverQuota


class ServerError(QllmError):
    """An error the server reported with a code this client does not know."""

    def __init__(self, message: str = "", *, code: str | None = None, result: p.Final | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.result = result  # the request's final frame, when there was one


class PromptTooLong(ServerError, InvalidRequest):
    code = p.PROMPT_TOO_LONG


class MaxTokensTooLarge(ServerError, InvalidRequest):
    code = p.MAX_TOKENS_TOO_LARGE


class TooManyRequests(ServerError):
    code = p.TOO_MANY_REQUESTS


class Forbidden(ServerError, PermissionError):
    code = p.FORBIDDEN


class TooManyConnections(ServerError):
    """The server (or its limit for this user) holds as many connections as it allows."""

    code = p.TOO_MANY_CONNECTIONS


class ServerTimeout(ServerError, TimeoutError):
    """The server closed the connection: idle too long, or a frame took too long to arrive."""

    code = p.TIMEOUT


class ServerShutdown(ServerError, EngineClosed):
    """The server shut down before the request finished (``.result`` holds what was generated)."""

    code = p.SHUTDOWN


class ConnectionLost(QllmError, ConnectionError):
    """The connection closed before the reply came."""

    code = "connection_lost"


class RequestTimeout(QllmError, TimeoutError):
    """No reply within the timeout; the request was cancelled on the server."""

    code = "timeout"


def _subclass(base: type[QllmError]) -> type[ServerError]:
    return type(base.__name__, (ServerError, base), {"code": base.code, "__module__": "qllm.client"})


ERRORS: dict[str, type[QllmError]] = {
    "invalid_request": _subclass(InvalidRequest),
    "engine_closed": _subclass(EngineClosed),
    "request_failed": _subclass(RequestFailed),
    "tenant_over_quota": _subclass(TenantOverQuota),
    p.PROMPT_TOO_LONG: PromptTooLong,
    p.MAX_TOKENS_TOO_LARGE: MaxTokensTooLarge,
    p.TOO_MANY_REQUESTS: TooManyRequests,
    p.FORBIDDEN: Forbidden,
    p.TOO_MANY_CONNECTIONS: TooManyConnections,
    p.TIMEOUT: ServerTimeout,
    p.SHUTDOWN: ServerShutdown,
    p.BAD_FRAME: p.ProtocolError,
    p.PROTOCOL_ERROR: p.ProtocolError,
    p.DUPLICATE_ID: p.ProtocolError,
    p.FRAME_TOO_LARGE: p.FrameTooLarge,
    p.UNSUPPORTED_PROTOCOL: p.UnsupportedProtocol,
}
"""Exception class raised for each wire error code; any other code raises :class:`ServerError`."""


def error_for(code: str, message: str, result: p.Final | None = None) -> QllmError:
    """The exception for a wire error ``code``."""
    cls = ERRORS.get(code, ServerError)
    if issubclass(cls, p.ProtocolError):
        return cls(message, code=code)
    return cls(message, code=code, result=result)
