"""What the dispatcher's mailbox receives besides arrivals (a
:class:`~qllm.kernel.request.Request`): a :class:`Cancel`, or a :class:`Stop`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Cancel:
    """End the live request ``request_id`` as ``aborted`` with ``reason`` (a request that already
    finished is left as it is)."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the dispatcher once no request is live."""
