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


class TenantOverQuota(QllmError):
    """The request's tenant is at one of its quotas (live requests, KV bytes) and the engine
    refuses new requests over a quota rather than queueing them (``quota_action = "reject"``;
    HTTP 429). Try again once some of the tenant's requests have finished."""

    code = "tenant_over_quota"


class ExpertParallelError(QllmError):
    """Expert parallel failed: a rank could not start or load, the ranks disagree on batch
    invariance, or a worker died, hung past the timeout or failed an expert (the message names the
    rank). Requests computing at the time end with this error, and the server reports itself
    unhealthy."""

    code = "expert_parallel"
