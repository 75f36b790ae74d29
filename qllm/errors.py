"""Typed errors of the public API. Each carries a stable ``code`` (also used on the wire)."""

from __future__ import annotations


class QllmError(Exception):
    """Base of every error qllm raises on purpose."""

    code = "internal"


class InvalidRequest(QllmError, ValueError):
    """A request's parameters are invalid (the message says which and why)."""

    code = "invalid_request"


class EngineClosed(QllmError):
    """The engine is not running (not started, draining or stopped)."""

    code = "engine_closed"


class RequestFailed(QllmError):
    """The request failed while computing (the message carries the cause)."""

    code = "request_failed"


class PolicyError(QllmError, ValueError):
    """A policy name or class could not be loaded."""

    code = "bad_policy"
