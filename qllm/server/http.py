"""``qllm serve``'s HTTP front end: the OpenAI-compatible API, ``/health`` and ``/metrics``.

Starlette routes on uvicorn (httptools), on the server's own event loop and engine. uvicorn is
driven through ``startup``/``shutdown`` rather than ``serve``, so that the server keeps its own
signal handling and drain: at SIGTERM the HTTP sockets stop accepting with the native one, new
requests on open connections get 503, live ones finish (or end with an error event) within the
drain, then the connections close. A Unix-socket peer passes the same checks as on the native
socket (allow list, connection caps); a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import uvicorn
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qllm.errors import EngineClosed, QllmError
from qllm.server import openai_api as api
from qllm.server.prometheus import registry

if TYPE_CHECKING:
    from qllm.server.app import Server

log = structlog.get_logger()
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_ID_HEADER = "x-request-id"

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _error(exc: api.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class HttpFront:
    """The HTTP API of one :class:`~qllm.server.Server` on any number of listening sockets."""

    def __init__(self, server: Server):
        self.server = server
        self.live = 0  # HTTP requests submitted and not yet finished
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self.app = AccessLog(
            Starlette(
                routes=[
                    Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"]),
                    Route("/metrics", self.metrics, methods=["GET"]),
                ],
                exception_handlers={404: self._not_found, 405: self._not_allowed},
            )
        )
        self.registry = registry(server.stats_reply)
        self._uvicorn: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self, sockets: list[socket.socket]) -> None:
        config = uvicorn.Config(
            self.app,
            http=_protocol_class(self.server, self._conn_ids),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=int(min(self.server.config.idle_timeout, 3600)),
            timeout_graceful_shutdown=10,
        )
        config.load()
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.lifespan = config.lifespan_class(config)
        self._sockets = sockets
        await self._uvicorn.startup(sockets=sockets)

    def stop_accepting(self) -> None:
        for srv in self._uvicorn.servers if self._uvicorn else ():
            srv.close()

    async def close(self) -> None:
        """After the drain: close every connection once its response is complete."""
        if self._uvicorn is not None:
            await self._uvicorn.shutdown(sockets=self._sockets)

    # ------------------------------------------------------------------ endpoints
    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(api.ApiError(404, f"no route {request.url.path}", "not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error(
            api.ApiError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")
        )

    async def health(self, request: Request) -> Response:
        reply = self.server.health(0)
        body = {"status": reply.status, "model": reply.model, "policy": reply.policy, "live": reply.live}
        return JSONResponse(body, status_code=503 if self.server.draining else 200)

    async def models(self, request: Request) -> Response:
        model = {
            "id": self.server.model_name,
            "object": "model",
            "created": int(time.time() - (time.monotonic() - self.server.started)),
            "owned_by": "qllm",
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=PROMETHEUS_TYPE)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # ------------------------------------------------------------------ generation
    async def _generate(self, request: Request, chat: bool) -> Any:
        try:
            handle, reply, stream = await self._submit(request, chat)
        except api.ApiError as exc:
            return _error(exc)
        self.live += 1
        if stream:
            return EventStream(self._events(handle, reply, stream), handle, self._ended)
        try:
            result = await _until_disconnect(request.receive, handle.result())
        finally:
            self._ended(handle)
        if result is None:  # the client left; nobody reads a reply
            return Response(status_code=499)
        if result.status in ("aborted", "error"):
            return _error(self._failure(result))
        return JSONResponse(reply.full(result))

    def _ended(self, handle: Any) -> None:
        handle.cancel()  # a no-op once it finished
        self.live -= 1

    async def _submit(self, request: Request, chat: bool) -> tuple[Any, api.Reply, api.StreamOptions | None]:
        server = self.server
        cfg = server.config
        body = await _read_body(request, cfg.max_frame_bytes)
        req = api.decode(body, api.ChatRequest if chat else api.CompletionRequest)
        if req.model is not None and req.model != server.model_name:
            raise api.ApiError(
                404,
                f"model {req.model!r} is not served here (this server serves {server.model_name!r})",
                "model_not_found",
            )
        params = api.to_params(req, request.headers.get(api.PRIORITY_HEADER), cfg.max_tokens)
        if server.draining:
            raise api.ApiError(503, "the server is shutting down", "server_shutting_down", "server_error")
        if self.live >= cfg.max_http_requests:
            raise api.ApiError(
                429,
                f"at most {cfg.max_http_requests} live HTTP requests; try again later",
                "too_many_requests",
                "rate_limit_error",
            )
        try:
            if chat:
                messages = api.chat_messages(req)
                chars = sum(len(m["content"]) for m in messages)
                if chars > cfg.max_prompt_chars:
                    raise api.ApiError(
                        413,
                        f"conversation of {chars} characters exceeds the limit of {cfg.max_prompt_chars} characters",
                        "context_length_exceeded",
                    )
                ids = await server.encode_chat(messages)
            else:
                prompt = api.completion_prompt(req)
                if isinstance(prompt, str) and len(prompt) > cfg.max_prompt_chars:
                    raise api.ApiError(
                        413,
                        f"prompt of {len(prompt)} characters exceeds the limit of {cfg.max_prompt_chars} characters",
                        "context_length_exceeded",
                    )
                ids = await server.encode(prompt)
        except ValueError as exc:
            raise api.bad_request(str(exc)) from None
        if len(ids) > cfg.max_prompt_tokens:
            raise api.ApiError(
                413,
                f"prompt of {len(ids)} tokens exceeds the limit of {cfg.max_prompt_tokens}",
                "context_length_exceeded",
            )
        if server.draining:  # began while the prompt was being tokenized
            raise api.ApiError(503, "the server is shutting down", "server_shutting_down", "server_error")
        request_id = request.scope.get("qllm.request_id") or f"h{next(self._ids)}"
        try:
            handle = server.engine.submit(
                ids,
                **params,
                request_id=f"http.{request_id}.{next(self._ids)}",
                client=request.scope.get("qllm.conn", "http"),
            )
        except EngineClosed as exc:
            raise api.ApiError(503, str(exc), "server_shutting_down", "server_error") from None
        except QllmError as exc:
            raise api.bad_request(str(exc), exc.code) from None
        options = req.stream_options or api.StreamOptions()
        return handle, api.Reply(chat, server.model_name), options if req.stream else None

    def _failure(self, result: Any) -> api.ApiError:
        if result.status == "error":
            return api.ApiError(500, result.error or "the request failed", "request_failed", "server_error")
        if self.server.draining:
            return api.ApiError(
                503, result.error or "the server is shutting down", "server_shutting_down", "server_error"
            )
        return api.ApiError(500, result.error or "the request was cancelled", "cancelled", "server_error")

    async def _events(
        self, handle: Any, reply: api.Reply, options: api.StreamOptions
    ) -> AsyncIterator[bytes]:
        """The server-sent events of a streaming request, ending with ``data: [DONE]``."""
        if reply.chat:
            yield _sse(reply.chunk(None, role=True))
        streamed = []
        async for chunk in handle:
            streamed.append(chunk.text)
            yield _sse(reply.chunk(chunk.text))
        result = await handle.result()
        sent = "".join(streamed)
        if len(result.text) > len(sent) and result.text.startswith(sent):
            # Text held back while a character was incomplete: the stream adds up to the full text.
            yield _sse(reply.chunk(result.text[len(sent) :]))
        if result.status in ("aborted", "error"):
            yield _sse(self._failure(result).body())
        else:
            yield _sse(reply.chunk(None, finish=api.FINISH_REASONS.get(result.status, "stop")))
            if options.include_usage:
                yield _sse(reply.usage_chunk(result))
        yield b"data: [DONE]\n\n"


_json = msgspec.json.Encoder()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body; a 413 as soon as it grows past ``limit`` bytes (never buffered whole)."""
    too_large = api.ApiError(413, f"request body over {limit} bytes", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


async def _until_disconnect(receive: Receive, work: Awaitable[Any]) -> Any:
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

    def __init__(self, events: AsyncIterator[bytes], handle: Any, ended: Callable[[Any], None]):
        self.events = events
        self.handle = handle
        self.ended = ended

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await _until_disconnect(receive, self._pump(send))
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

    def __init__(self, app: Any):
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


def _protocol_class(server: Server, conn_ids: itertools.count) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with the native socket's admission: a Unix peer's credentials
    against the allow list, and the connection caps (a TCP peer has no credentials: with an
    allow list set it is refused)."""

    class Protocol(HttpToolsProtocol):
        refused = False
        creds: Any = None
        name = "http"

        def connection_made(self, transport: Any) -> None:
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
