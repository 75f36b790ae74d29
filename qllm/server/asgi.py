"""ASGI and uvicorn plumbing of the HTTP front end (:mod:`qllm.server.http`): a server-sent event
stream that cancels its request when the client leaves, the access log, and uvicorn's HTTP
protocol with the native socket's admission checks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from qllm.engine import RequestHandle
    from qllm.server.app import Server
    from qllm.server.listener import Credentials

log = structlog.get_logger()
REQUEST_ID_HEADER = "x-request-id"

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]
T = TypeVar("T")


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if the client disconnects first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """An ASGI response streaming server-sent events; the request is cancelled when the client
    disconnects (noticed while waiting for tokens, not only at the next write)."""

    def __init__(
        self, events: AsyncIterator[bytes], handle: RequestHandle, ended: Callable[[RequestHandle], None]
    ):
        self.events = events
        self.handle = handle
        self.ended = ended

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await until_disconnect(receive, self._pump(send))
        except OSError:  # the client went away while we wrote
            pass
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()
            self.ended(self.handle)

    async def _pump(self, send: Send) -> None:
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class AccessLog:
    """ASGI middleware: one ``http_request`` log line per request (method, path, status, request
    id, duration), never its content. The request id is the client's ``X-Request-Id`` or a new
    one, and is returned in that header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        given = dict(scope.get("headers") or ()).get(REQUEST_ID_HEADER.encode())
        request_id = given.decode("latin-1")[:128] if given else uuid.uuid4().hex[:16]
        scope["qllm.request_id"] = request_id
        status = 500

        async def send_logged(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or ())
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            log.info(
                "http_request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                request_id=request_id,
                duration_ms=round((time.perf_counter() - start) * 1e3, 3),
            )


def protocol_class(server: Server, conn_ids: itertools.count) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with the native socket's admission: a Unix peer's credentials
    against the allow list, and the connection caps (a TCP peer has no credentials: with an
    allow list set it is refused)."""

    class Protocol(HttpToolsProtocol):
        refused = False
        creds: Credentials | None = None
        name = "http"

        def connection_made(self, transport: asyncio.Transport) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                try:
                    self.creds = server.credentials(sock)
                except OSError:
                    self.creds = None
            self.name = f"h{next(conn_ids)}"
            error = server.limits.admit(self, self.creds)
            if error is not None:
                self.refused = True
                status = "403 Forbidden" if error.code == "forbidden" else "503 Service Unavailable"
                body = json.dumps(
                    {
                        "error": {
                            "message": error.message,
                            "type": "server_error",
                            "code": error.code,
                            "param": None,
                        }
                    }
                ).encode()
                head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
                transport.write(head.encode() + body)
                transport.close()
                return
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

        def eof_received(self) -> None:
            if not self.refused:
                super().eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.refused:
                return
            server.limits.release(self, self.creds)
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["qllm.conn"] = self.name  # type: ignore[typeddict-unknown-key]

    return Protocol
