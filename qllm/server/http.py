"""``qllm serve``'s HTTP front end: the OpenAI-compatible API, ``/health`` and ``/metrics``.

Starlette routes on uvicorn (httptools), on the server's own event loop and engine (the ASGI and
uvicorn plumbing is :mod:`qllm.server.asgi`). uvicorn is
driven through ``startup``/``shutdown`` rather than ``serve``, so that the server keeps its own
signal handling and drain: at SIGTERM the HTTP sockets stop accepting with the native one, new
requests on open connections get 503, live ones finish (or end with an error event) within the
drain, then the connections close. A Unix-socket peer passes the same checks as on the native
socket (allow list, connection caps), a TCP peer the TCP caps by address and the Host check
(:mod:`qllm.server.connection`, :mod:`qllm.server.asgi`); a client that disconnects cancels its
request. Every error is the OpenAI error object (docs/http.md lists each limit and status).
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
import uvicorn
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qllm.errors import EngineClosed, QllmError, TenantOverQuota
from qllm.logging import cut
from qllm.server import openai_api as api
from qllm.server.asgi import (
    MAX_LOGGED_PATH,
    AccessLog,
    ASGIApp,
    EventStream,
    Guard,
    origin_name,
    until_disconnect,
)
from qllm.server.connection import protocol_class
from qllm.server.limits import TcpLimits, reserve
from qllm.server.listener import parse_host_port
from qllm.server.prometheus import registry
from qllm.spec import PriorityClass

if TYPE_CHECKING:
    from qllm.engine import RequestHandle
    from qllm.kernel.request import RequestResult
    from qllm.server.app import Server
    from qllm.server.config import ServerConfig

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = 499  # logged for a request whose client left before its reply (nginx's code)
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _error(exc: api.ApiError) -> JSONResponse:
    headers = {"connection": "close"} if exc.close else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def allowed_hosts(config: ServerConfig) -> list[str]:
    """The names a TCP request's Host header may give: ``http_allowed_hosts``, and the host
    ``http_listen`` binds to when it names one."""
    hosts = list(config.http_allowed_hosts)
    if config.http_listen:
        host, _ = parse_host_port(config.http_listen)
        if host not in WILDCARD_HOSTS:
            hosts.append(host)
    return hosts


class HttpFront:
    """The HTTP API of one :class:`~qllm.server.Server` on any number of listening sockets."""

    def __init__(self, server: Server):
        self.server = server
        self.live = 0  # HTTP requests submitted and not yet finished
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self.tcp = TcpLimits(server.config)
        self.app = AccessLog(self._guarded(server.config))
        self.registry = registry(server.stats_reply)
        self._uvicorn: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []

    def _guarded(self, config: ServerConfig) -> ASGIApp:
        app: ASGIApp = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
            ],
            exception_handlers={
                404: self._not_found,
                405: self._not_allowed,
                HTTPException: self._http_error,
                Exception: self._internal_error,
            },
        )
        if config.http_allowed_origins:  # browsers of these origins get CORS headers and preflights
            app = CORSMiddleware(
                app,
                allow_origins=[origin_name(o) for o in config.http_allowed_origins],
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type", "x-request-id", api.PRIORITY_HEADER],
                expose_headers=["x-request-id"],
                max_age=600,
            )
        return Guard(app, allowed_hosts(config), config.http_allowed_origins)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, sockets: list[socket.socket]) -> None:
        config = uvicorn.Config(
            self.app,
            http=protocol_class(self.server, self.tcp, self._conn_ids),
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=self.server.config.http_idle_timeout,  # type: ignore[arg-type]
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
        return _error(api.ApiError(404, f"no route {cut(request.url.path, MAX_LOGGED_PATH)}", "not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        path = cut(request.url.path, MAX_LOGGED_PATH)
        return _error(api.ApiError(405, f"{request.method} is not allowed on {path}", "method_not_allowed"))

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 400
        return _error(
            api.ApiError(status, str(getattr(exc, "detail", "")) or "bad request", "invalid_request")
        )

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        return _error(api.ApiError(500, "internal error", "internal_error", "server_error"))

    async def health(self, request: Request) -> Response:
        reply = self.server.health(0)
        body = {"status": reply.status, "model": reply.model, "policy": reply.policy, "live": reply.live}
        return JSONResponse(body, status_code=200 if reply.status == "ok" else 503)

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
    async def _generate(self, request: Request, chat: bool) -> Response | EventStream:
        try:
            handle, reply, stream = await self._submit(request, chat)
        except api.ApiError as exc:
            return _error(exc)
        except ClientDisconnect:  # left mid-body (or timed out: the access log says which)
            return Response(status_code=CLIENT_CLOSED)
        self.live += 1
        if stream:
            return EventStream(self._events(handle, reply, stream), handle, self._ended)
        try:
            result = await until_disconnect(request.receive, handle.result())
        finally:
            self._ended(handle)
        if result is None:  # the client left; nobody reads a reply
            return Response(status_code=CLIENT_CLOSED)
        if result.status in ("aborted", "error"):
            return _error(self._failure(result))
        return JSONResponse(reply.full(result))

    def _ended(self, handle: RequestHandle) -> None:
        handle.cancel()  # a no-op once it finished
        self.live -= 1

    async def _submit(
        self, request: Request, chat: bool
    ) -> tuple[RequestHandle, api.Reply, api.StreamOptions | None]:
        server = self.server
        cfg = server.config
        _check_json(request)
        body = await _read_body(request, cfg.max_frame_bytes)
        req, fields = api.decode(body, api.ChatRequest if chat else api.CompletionRequest)
        if req.model is not None and req.model != server.model_name:
            raise api.ApiError(
                404,
                f"model {cut(req.model, api.QUOTE_CHARS)!r} is not served here (this server serves {server.model_name!r})",
                "model_not_found",
            )
        client = request.scope.get("qllm.conn", "http")  # the connection: shared fairly with others
        spec = api.to_spec(
            req,
            fields,
            request.headers.get(api.PRIORITY_HEADER),
            cfg.max_tokens,
            client,
            tenant_header=request.headers.get(api.TENANT_HEADER),
            default_tenant=request.scope.get("qllm.tenant", ""),  # the Unix peer's uid
        )
        if server.draining:
            raise api.ApiError(503, "the server is shutting down", "server_shutting_down", "server_error")
        self._admit(request, spec.priority)
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
            handle = server.engine.submit(ids, spec=spec, request_id=f"http.{request_id}.{next(self._ids)}")
        except EngineClosed as exc:
            raise api.ApiError(503, str(exc), "server_shutting_down", "server_error") from None
        except TenantOverQuota as exc:
            raise api.ApiError(429, str(exc), exc.code, "rate_limit_error") from None
        except QllmError as exc:
            raise api.bad_request(str(exc), exc.code) from None
        options = req.stream_options or api.StreamOptions()
        return handle, api.Reply(chat, server.model_name), options if req.stream else None

    def _admit(self, request: Request, priority: PriorityClass) -> None:
        """Refuse a request over the live-request cap, or a BE request where the LS reserve is in
        use: the last ``ls_reserved_requests`` live requests, a TCP connection in the reserve."""
        cfg = self.server.config
        limit = cfg.max_http_requests
        if priority != PriorityClass.LS:
            limit -= reserve(cfg.ls_reserved_requests, cfg.max_http_requests)
        if self.live >= limit:
            which = "" if limit == cfg.max_http_requests else " (the rest are kept for LS requests)"
            raise api.ApiError(
                429,
                f"at most {limit} live HTTP requests{which}; try again later",
                "too_many_requests",
                "rate_limit_error",
            )
        peer = request.scope.get("qllm.peer")
        if priority != PriorityClass.LS and peer is not None and self.tcp.ls_only(peer):
            raise api.ApiError(
                503,
                "the server is near its TCP connection cap: this connection carries only LS requests; "
                "try again later",
                "too_many_connections",
                "server_error",
                close=True,
            )

    def _failure(self, result: RequestResult) -> api.ApiError:
        if result.status == "error":
            return api.ApiError(500, result.error or "the request failed", "request_failed", "server_error")
        if self.server.draining:
            return api.ApiError(
                503, result.error or "the server is shutting down", "server_shutting_down", "server_error"
            )
        return api.ApiError(500, result.error or "the request was cancelled", "cancelled", "server_error")

    async def _events(
        self, handle: RequestHandle, reply: api.Reply, options: api.StreamOptions
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


def _check_json(request: Request) -> None:
    """415 unless the body is declared JSON: the content types a browser may send cross-origin
    without asking first (text/plain, forms) are refused."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = cut(media_type, api.QUOTE_CHARS) or "none"
        raise api.ApiError(
            415, f"Content-Type must be application/json, got {shown}", "unsupported_media_type"
        )


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
