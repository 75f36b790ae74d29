"""Client library for ``qllm serve``: :class:`AsyncClient` and the blocking :class:`Client`.

::

    async with AsyncClient() as client:                 # $QLLM_SOCKET, $XDG_RUNTIME_DIR/qllm.sock, ...
        result = await client.generate("Hello", max_tokens=16, priority="ls")
        print(result.text, result.timings.ttft)
        async with client.stream("Once upon a time", max_tokens=32) as stream:
            async for chunk in stream:
                print(chunk.text, end="")
        print(stream.result.status)

    with Client() as client:
        print(client.generate("Hello").text)

A request's options are the fields of :class:`qllm.spec.RequestSpec` (as keywords, or a ``spec=``),
checked before they are sent. Requests are multiplexed on one connection, so one client serves
many concurrent tasks. Errors the server reports raise the exception of their wire ``code`` (see
:data:`ERRORS`); a request cancelled by this client ends normally with status ``aborted``.

- :mod:`qllm.client.aio`: :class:`AsyncClient`; :mod:`qllm.client.stream`: :class:`Stream`
- :mod:`qllm.client.sync`: :class:`Client`, :class:`SyncStream`
- :mod:`qllm.client.errors`: the exceptions, one per wire error code
"""

from __future__ import annotations

from qllm import protocol as p
from qllm.client.aio import AsyncClient
from qllm.client.errors import (
    ERRORS,
    ConnectionLost,
    Forbidden,
    MaxTokensTooLarge,
    PromptTooLong,
    RequestTimeout,
    ServerError,
    ServerShutdown,
    ServerTimeout,
    TooManyConnections,
    TooManyRequests,
    error_for,
)
from qllm.client.stream import Stream, StreamContext
from qllm.client.sync import Client, SyncStream

Result = p.Final
"""What a finished request returns: ``status``, ``token_ids``, ``text``, ``usage``, ``timings``,
``preemptions`` (see docs/protocol.md)."""

__all__ = [
    "ERRORS",
    "AsyncClient",
    "Client",
    "ConnectionLost",
    "Forbidden",
    "MaxTokensTooLarge",
    "PromptTooLong",
    "RequestTimeout",
    "Result",
    "ServerError",
    "ServerShutdown",
    "ServerTimeout",
    "Stream",
    "StreamContext",
    "SyncStream",
    "TooManyConnections",
    "TooManyRequests",
    "error_for",
]
