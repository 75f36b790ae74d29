"""One HTTP connection of ``qllm serve``: uvicorn's httptools protocol with who may connect, bounds
on the request line and headers, timeouts while a request arrives and while the connection idles,
and errors in the OpenAI shape where uvicorn would answer in plain text.

A connection is in one phase at a time, with one timer:

    idle --first byte of a request--> head --headers complete--> body --body complete--> busy
      ^                                                                                  |
      +---------------------------------- response complete ----------------------------+

``idle`` ends after ``http_idle_timeout`` (the connection closes quietly), ``head`` after
``http_header_timeout`` and ``body`` after ``http_body_timeout`` (each answered with a 408);
``busy`` (the request is being served) has no timer of its own.
"""

from __future__ import annotations

import asyncio
import http
import itertools
import json
import socket
from typing import TYPE_CHECKING, Literal

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from qllm import protocol as p
from qllm.logging import cut, get_logger
from qllm.server.openai_api import ApiError

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application

    from qllm.server.app import Server
    from qllm.server.limits import TcpLimits
    from qllm.server.listener import Credentials

log = get_logger()
Phase = Literal["idle", "head", "body", "busy"]
MAX_LINGERING = 64  # connections answered with an error kept open at once to let clients read it
LINGER_S = 1.0  # how long such a connection waits for its client to close first
LINGER_BYTES = 1 << 20  # how much it reads and drops meanwhile
STATUS_KEY = "qllm.status"  # scope key: the status the client got when the protocol answered


def error_response(error: ApiError) -> bytes:
    """A complete HTTP/1.1 response carrying ``error`` that closes the connection."""
    payload = json.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + payload


class Rejected(Exception):
    """Raised from a parser callback to stop parsing a request that breaks a bound."""

    def __init__(self, error: ApiError):
        super().__init__(str(error))
        self.error = error


def protocol_class(server: Server, tcp: TcpLimits, conn_ids: itertools.count) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol for ``server``'s HTTP sockets: a Unix peer passes the native
    socket's admission (credentials, connection caps), a TCP peer ``tcp``'s caps by address."""
    cfg = server.config
    lingering = 0

    class Connection(HttpToolsProtocol):
        refused = False  # not admitted: it never counted
        closing = False  # answered with an error: what comes in is dropped
        lingers = False
        _dropped = 0
        creds: Credentials | None = None
        address: str | None = None  # the TCP peer's address; None on a Unix socket
        name = "http"
        phase: Phase = "idle"
        _timer: asyncio.TimerHandle | None = None
        _in_head = False
        _head_bytes = 0  # of the head, counted by chunk (a header still arriving included)
        _header_bytes = 0  # of the complete headers

        # ------------------------------------------------------------ admission
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.name = f"h{next(conn_ids)}"
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                try:
                    self.creds = server.credentials(sock)
                except OSError:
                    self.creds = None
                error = server.limits.admit(self, self.creds)
            else:
                peer = transport.get_extra_info("peername")
                self.address = str(peer[0]) if isinstance(peer, tuple) else "unknown"
                if cfg.allow_uids or cfg.allow_gids:  # a TCP peer has no credentials to check
                    message = "an allow list is set: TCP peers may not use the server"
                    error = p.Error(code=p.FORBIDDEN, message=message)
                else:
                    error = tcp.admit(self, self.address)
            if error is not None:
                forbidden = error.code == "forbidden"
                refusal = ApiError(
                    403 if forbidden else 503,
                    error.message,
                    error.code,
                    "permission_error" if forbidden else "server_error",
                )
                self._refuse(transport, refusal)
                return
            super().connection_made(transport)
            self._enter("idle")

        def _refuse(self, transport: asyncio.Transport, error: ApiError) -> None:
            self.refused = True
            self.transport = transport
            self._close_after(error)

        def _close_after(self, error: ApiError) -> None:
            """Answer ``error`` and close. The close waits for the client's (up to ``LINGER_S``,
            ``LINGER_BYTES`` read and dropped, ``MAX_LINGERING`` connections at once): closing
            with its request unread would reset the connection before the client reads why."""
            nonlocal lingering
            self._cancel_timer()
            self.closing = True
            transport = self.transport
            transport.write(error_response(error))
            if lingering >= MAX_LINGERING or not transport.can_write_eof():
                transport.close()
                return
            lingering += 1
            self.lingers = True
            transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, transport.close)

        def connection_lost(self, exc: Exception | None) -> None:
            nonlocal lingering
            self._cancel_timer()
            if self.lingers:
                lingering -= 1
            if self.refused:
                return
            if self.address is None:
                server.limits.release(self, self.creds)
            else:
                tcp.release(self)
            super().connection_lost(exc)

        def shed(self) -> None:
            """Close this idle connection: a new client needs its slot."""
            if not self.transport.is_closing():
                self.transport.close()

        # ------------------------------------------------------------ phases and timers
        def _enter(self, phase: Phase) -> None:
            self._cancel_timer()
            self.phase = phase
            timeout = {
                "idle": cfg.http_idle_timeout,
                "head": cfg.http_header_timeout,
                "body": cfg.http_body_timeout,
            }.get(phase)
            if timeout is not None:
                self._timer = self.loop.call_later(timeout, self._expired, phase, timeout)
            if self.address is not None:
                if phase == "idle":
                    tcp.idle(self)
                else:
                    tcp.busy(self)

        def _cancel_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self, phase: Phase, timeout: float) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if phase == "idle":
                self.transport.close()
                return
            part = "headers" if phase == "head" else "body"
            message = f"the request {part} did not arrive within {timeout:g} s"
            self._reject(ApiError(408, message, "request_timeout"))

        def _reject(self, error: ApiError) -> None:
            """Answer ``error`` where no response has begun, and close the connection. A request
            whose app waits for its body sees a disconnect, and the access log ``error``'s status."""
            cycle: RequestResponseCycle | None = self.cycle
            if cycle is not None and not cycle.response_complete:
                if cycle.response_started:
                    self.transport.close()
                    return
                cycle.scope[STATUS_KEY] = error.status  # type: ignore[typeddict-unknown-key]
                cycle.disconnected = True
                cycle.message_event.set()
            else:  # no app has the request: this is its one log line
                log.info(
                    "http_request",
                    method=self._method(),
                    path=cut(self.url.decode("latin-1"), 256) if self._in_head else None,
                    status=error.status,
                    code=error.code,
                    conn=self.name,
                )
            self._close_after(error)

        def _method(self) -> str | None:
            try:
                return self.parser.get_method().decode("ascii") if self._in_head and self.url else None
            except (httptools.HttpParserError, UnicodeDecodeError, AttributeError):
                return None

        # ------------------------------------------------------------ bytes in
        def data_received(self, data: bytes) -> None:
            if self.closing:  # dropped until the client closes
                self._dropped += len(data)
                if self._dropped > LINGER_BYTES:
                    self.transport.close()
                return
            was_in_head = self._in_head
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                pass  # no protocol upgrades: the request is served as HTTP/1.1
            except httptools.HttpParserError as exc:
                rejected = exc.__context__ if isinstance(exc.__context__, Rejected) else None
                if rejected is not None:
                    self._reject(rejected.error)
                else:
                    message = f"malformed HTTP request: {cut(str(exc), 128)}"
                    self._reject(ApiError(400, message, "invalid_http"))
                return
            if was_in_head and self._in_head:
                # A header still arriving is in no callback yet: bound the bytes buffered for it.
                self._head_bytes += len(data)
                if self._head_bytes > cfg.max_http_url_bytes + cfg.max_http_header_bytes:
                    self._reject(self._too_large_head())

        def _too_large_head(self) -> ApiError:
            return ApiError(
                431,
                f"the request headers are over {cfg.max_http_header_bytes} bytes",
                "request_header_fields_too_large",
            )

        def eof_received(self) -> bool | None:
            if self.closing:
                self.transport.close()
            return None

        # ------------------------------------------------------------ parser callbacks
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["qllm.conn"] = self.name  # type: ignore[typeddict-unknown-key]
            if self.creds is not None:  # a Unix peer: its uid is its requests' default tenant
                self.scope["qllm.tenant"] = str(self.creds.uid)  # type: ignore[typeddict-unknown-key]
            if self.address is not None:
                self.scope["qllm.peer"] = self  # type: ignore[typeddict-unknown-key]
            self._in_head = True
            self._head_bytes = self._header_bytes = 0
            self._enter("head")

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > cfg.max_http_url_bytes:
                message = f"the request target is over {cfg.max_http_url_bytes} bytes"
                raise Rejected(ApiError(414, message, "uri_too_long"))

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value) + 4
            if len(self.headers) >= cfg.max_http_headers:
                message = f"more than {cfg.max_http_headers} request headers"
                raise Rejected(ApiError(431, message, "request_header_fields_too_large"))
            if self._header_bytes > cfg.max_http_header_bytes:
                raise Rejected(self._too_large_head())
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self.parser.should_upgrade() and any(
                name in (b"content-length", b"transfer-encoding") and value not in (b"0", b"")
                for name, value in self.headers
            ):  # the parser stops at an upgrade: the body would never be read
                message = "protocol upgrades are not supported: send the request without Upgrade"
                raise Rejected(ApiError(400, message, "upgrade_not_supported"))
            self._in_head = False
            self._enter("busy")  # until the request starts (it may wait behind a pipelined one)
            super().on_headers_complete()

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
            super()._start_asgi_task(cycle, app)
            if cycle.more_body:
                self._enter("body")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            cycle = self.cycle
            if cycle is not None and cycle.response_complete and not self.pipeline:
                self._enter("idle")  # answered before its body was read: the body is done now
            elif self.phase == "body":
                self._enter("busy")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.timeout_keep_alive_task is not None:  # uvicorn's sign that nothing is pipelined
                self._unset_keepalive_if_required()  # this protocol's own timer replaces it
                if self.phase != "body":  # a body still arriving keeps its own timeout
                    self._enter("idle")

    return Connection
