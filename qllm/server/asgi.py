"""ASGI plumbing of the HTTP front end (:mod:`qllm.server.http`): a server-sent event stream that
cancels its request when the client leaves, the access log, and the Host and Origin checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

from qllm.logging import cut, get_logger
from qllm.server.connection import STATUS_KEY
from qllm.server.openai_api import QUOTE_CHARS, ApiError

if TYPE_CHECKING:
    from qllm.engine import RequestHandle

log = get_logger()
REQUEST_ID_HEADER = "x-request-id"
MAX_LOGGED_PATH = 256  # characters of a request path in the log

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


async def send_error(send: Send, error: ApiError) -> None:
    """Send ``error`` as a whole JSON response."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """ASGI middleware: one ``http_request`` log line per request (method, path cut to
    ``MAX_LOGGED_PATH``, status, request id, duration), never its content. The request id is the
    client's ``X-Request-Id`` or a new one, and is returned in that header. An exception the app
    raises is logged once (``http_request_failed``) and answered with a JSON 500 if it can be."""

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
        started = False

        async def send_logged(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers") or ())
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            log.error("http_request_failed", request_id=request_id, exc_info=True)
            if not started:
                with contextlib.suppress(Exception):
                    await send_error(
                        send_logged, ApiError(500, "internal error", "internal_error", "server_error")
                    )
        finally:
            log.info(
                "http_request",
                method=scope["method"],
                path=cut(scope["path"], MAX_LOGGED_PATH),
                status=scope.get(STATUS_KEY, status),  # the protocol's answer, when it gave one
                request_id=request_id,
                duration_ms=round((time.perf_counter() - start) * 1e3, 3),
            )


def host_name(value: str) -> str:
    """The host of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def origin_name(value: str) -> str:
    """An origin (``scheme://host[:port]``) as compared: lower case, no trailing slash."""
    return value.strip().lower().rstrip("/")


class Guard:
    """ASGI middleware: on TCP (``qllm.peer`` in the scope) the ``Host`` header must name one of
    ``hosts`` (400 otherwise: a page cannot reach the port by DNS rebinding), and a request with
    an ``Origin`` header must come from one of ``origins`` (403 otherwise). ``"*"`` allows any."""

    def __init__(self, app: ASGIApp, hosts: Collection[str], origins: Collection[str]):
        self.app = app
        self.hosts = {host_name(h).rstrip(".") for h in hosts}
        self.origins = {origin_name(o) for o in origins}

    def refusal(self, scope: dict[str, Any]) -> ApiError | None:
        headers = dict(scope.get("headers") or ())
        if "qllm.peer" in scope and "*" not in self.hosts:
            host = headers.get(b"host")
            if host is None:
                return ApiError(400, "a Host header is required", "invalid_host")
            name = host_name(host.decode("latin-1")).rstrip(".")
            if name not in self.hosts:
                quoted = cut(name, QUOTE_CHARS)
                return ApiError(
                    400, f"host {quoted!r} is not served here (see http_allowed_hosts)", "invalid_host"
                )
        origin = headers.get(b"origin")
        if origin is not None and "*" not in self.origins:
            value = origin_name(origin.decode("latin-1"))
            if value not in self.origins:
                quoted = cut(value, QUOTE_CHARS)
                return ApiError(
                    403,
                    f"origin {quoted!r} may not use this server (see http_allowed_origins)",
                    "origin_not_allowed",
                    "permission_error",
                )
        return None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (error := self.refusal(scope)) is not None:
            return await send_error(send, error)
        await self.app(scope, receive, send)
