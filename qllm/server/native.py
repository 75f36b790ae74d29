"""One client connection of ``qllm serve``: reads frames, runs its requests, writes replies.

The connection is an actor. Its reader decodes frames and starts one task per ``generate`` (see
:mod:`qllm.server.relay`); one writer task owns the socket's write side (see :mod:`qllm.server.outbox`, which
also pauses the reader while the client leaves too many replies unread). All of them live in the
connection's TaskGroup. The reader closes a connection that sends nothing for ``idle_timeout``
while none of its requests is live, or takes longer than ``frame_timeout`` to finish a frame it
started. When the client goes away its live requests are cancelled; a client that only shuts down
its sending side still gets every reply. When the server shuts down the connection keeps reading
(so cancels still arrive) until its last request has sent its final frame, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from qllm import protocol as p
from qllm.logging import Throttled, get_logger
from qllm.server.config import ServerConfig
from qllm.server.listener import Credentials
from qllm.server.outbox import Outbox
from qllm.server.relay import refusal, relay

if TYPE_CHECKING:
    from qllm.engine import Engine, RequestHandle

log = get_logger()


class Host(Protocol):
    """What a connection needs of the server that accepted it (the server implements it; this
    module never imports the server)."""

    engine: Engine
    config: ServerConfig
    errors: Throttled
    draining: bool

    def admit(self, conn: Connection) -> p.Error | None: ...
    def release(self, conn: Connection) -> None: ...
    def welcome(self) -> p.Welcome: ...
    def health(self, rid: int) -> p.HealthReply: ...
    def stats_reply(self) -> dict[str, Any]: ...
    async def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]: ...


LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
TOKENIZE_AHEAD = 2  # a connection's generates being tokenized at once; the reader waits for a slot


class _Closed(Exception):
    """The reader gives up on the connection (a timeout); ``message`` goes to the client."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _HelloProbe(msgspec.Struct):
    type: Any = None
    protocol: Any = None


class Connection:
    def __init__(
        self,
        server: Host,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        name: str,
        credentials: Callable[[socket.socket], Credentials],
    ):
        self.server = server
        self.engine = server.engine
        self.config = server.config
        self.reader = reader
        self.writer = writer
        self.name = name
        self.creds: Credentials | None = None
        self._credentials = credentials
        self._outbox = Outbox(writer, self.config.max_outbox_bytes, lambda: self._client_gone("write_failed"))
        self.requests: dict[int, RequestHandle | None] = {}  # wire id -> its handle (None while tokenizing)
        self.cancel_asked: set[int] = set()
        self._tasks: asyncio.TaskGroup | None = None
        self._reader_task: asyncio.Task | None = None
        self._idle: asyncio.Timeout | None = None  # armed while waiting for a frame to start
        self._slots = asyncio.Semaphore(TOKENIZE_AHEAD)
        self._reading = True
        self.closing = False
        self.gone = False  # the client stopped sending (reset, bad framing) or cannot be written
        self._closed = False
        self._refused = False  # closed on a protocol violation: linger so the client reads why
        self.log = log.bind(conn=name)

    @property
    def live(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Serve the connection until the client leaves or the server has shut it down."""
        try:
            self.creds = self._peer_credentials()
            refused = self.server.admit(self)
            if refused is not None:
                with contextlib.suppress(OSError):
                    self.writer.write(p.encode_frame(refused))
                await self._linger()
                return
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                tg.create_task(self._outbox.run(), name=f"{self.name}-writer")
                self._reader_task = tg.create_task(self._read_loop(), name=f"{self.name}-reader")
            if self._refused:
                await self._linger()
        except asyncio.CancelledError:
            # Cut off (a client that does not read, at shutdown): drop what is unsent.
            self.writer.transport.abort()
            raise
        finally:
            self.server.release(self)
            self.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(LINGER_SECONDS):
                    await self.writer.wait_closed()
            self.log.debug("connection_closed")

    def _peer_credentials(self) -> Credentials | None:
        try:
            return self._credentials(self.writer.get_extra_info("socket"))
        except (OSError, AttributeError) as exc:
            self.log.warning("peer_credentials_unavailable", error=str(exc))
            return None

    async def _linger(self) -> None:
        """Close our side after the last frame and discard what the client still sends, for a
        while, so that the client reads our error frame rather than a connection reset."""
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(LINGER_SECONDS):
                discarded = 0
                while discarded < LINGER_BYTES and (data := await self.reader.read(65536)):
                    discarded += len(data)

    def shutdown(self) -> None:
        """Server shutdown: close once every live request has sent its final frame."""
        self.closing = True
        self._maybe_stop_reading()

    def request_ended(self, rid: int) -> None:
        """A request's last frame is queued (or it never started)."""
        self.requests.pop(rid, None)
        self.cancel_asked.discard(rid)
        self._arm_idle()
        self._maybe_stop_reading()
        self._maybe_close()

    def _maybe_stop_reading(self) -> None:
        if self.closing and not self.requests and self._reader_task is not None:
            self._reader_task.cancel()

    def _maybe_close(self) -> None:
        if not self._reading and not self.requests and not self._closed:
            self._closed = True
            self._outbox.close()

    # ------------------------------------------------------------------ writing
    def send(self, message: p.Message) -> None:
        frame = p.encode_frame(message)
        if len(frame) - p.HEADER.size > self.config.max_frame_bytes:
            # Never send what the client may refuse to read; say so for the request instead.
            self.server.errors.warning("reply_too_large", type(message).__name__, bytes=len(frame))
            rid = getattr(message, "id", None)
            text = f"the reply ({len(frame)} bytes) exceeds max_frame_bytes"
            frame = p.encode_frame(p.Error(id=rid, code="internal", message=text))
        self._outbox.put(frame)

    # ------------------------------------------------------------------ reading
    async def _read_loop(self) -> None:
        reason = "closed"
        try:
            if not await self._hello():
                return
            while True:
                try:
                    await self._outbox.wait_for_room(self.config.idle_timeout)
                except TimeoutError:
                    raise _Closed("write_stalled", "replies left unread too long") from None
                message = await self._read_message()
                if message is None:
                    break
                await self._handle(message)
        except _Closed as exc:
            reason = exc.reason
            self.server.errors.info("connection_timed_out", reason, conn=self.name, reason=reason)
            if reason == "write_stalled":
                self.writer.transport.abort()  # the client reads nothing: an error frame would not get through
            else:
                self.send(p.Error(code=p.TIMEOUT, message=str(exc)))
                self._refused = True
        except p.FrameTooLarge as exc:
            self.send(p.Error(code=exc.code, message=str(exc)))
            self._refused = True
            reason = "frame_too_large"
        except asyncio.IncompleteReadError:
            reason = "truncated_frame"
        except (ConnectionError, OSError):
            reason = "reset"
        except asyncio.CancelledError:
            if not self.closing and not self.gone:
                raise
            reason = "shutdown" if self.closing else "write_failed"
        finally:
            self._reading = False
            if not self.closing and not (reason == "closed" and self._half_closed()):
                self._client_gone(reason)
            self._maybe_close()

    async def _hello(self) -> bool:
        """Read the first frame; True once it was a hello this server speaks (welcome sent)."""
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.hello_timeout):
                payload = await p.read_frame(self.reader, cfg.max_frame_bytes)
        except TimeoutError:
            self.send(p.Error(code=p.PROTOCOL_ERROR, message=f"no hello within {cfg.hello_timeout:g} s"))
            self._refused = True
            return False
        if payload is None:
            return False
        error = _hello_error(payload)
        if error is not None:
            self.send(error)
            self._refused = True
            return False
        self.send(self.server.welcome())
        return True

    async def _read_payload(self) -> bytes | None:
        """The next frame's payload, None at a clean end of stream. Waiting for a frame to start
        is bounded by the idle timer (armed only while no request is live); reading a frame once
        its first byte came by ``frame_timeout``."""
        cfg = self.config
        try:
            async with asyncio.timeout(None) as idle:
                self._idle = idle
                self._arm_idle()
                first = await self.reader.readexactly(1)
        except asyncio.IncompleteReadError:
            return None
        except TimeoutError:
            raise _Closed("idle_timeout", f"idle for {cfg.idle_timeout:g} s") from None
        finally:
            self._idle = None
        try:
            async with asyncio.timeout(cfg.frame_timeout):
                (size,) = p.HEADER.unpack(first + await self.reader.readexactly(p.HEADER.size - 1))
                if size > cfg.max_frame_bytes:
                    raise p.FrameTooLarge(
                        f"frame of {size} bytes exceeds the limit of {cfg.max_frame_bytes} bytes"
                    )
                return await self.reader.readexactly(size)
        except TimeoutError:
            raise _Closed(
                "frame_timeout", f"a frame took longer than {cfg.frame_timeout:g} s to arrive"
            ) from None

    def _arm_idle(self) -> None:
        if self._idle is not None:
            when = None if self.requests else asyncio.get_running_loop().time() + self.config.idle_timeout
            self._idle.reschedule(when)

    async def _read_message(self) -> p.ClientMessage | None:
        """The next well-formed message; a malformed one is answered with an error and skipped."""
        while True:
            payload = await self._read_payload()
            if payload is None:
                return None
            try:
                return p.decode_client(payload)
            except p.ProtocolError as exc:
                # The error answers for the frame's id, unless that id is live: then it concerns
                # the connection, so that the live request still ends with its own final frame.
                rid = exc.request_id if exc.request_id not in self.requests else None
                code = exc.code if rid is not None else p.BAD_FRAME
                self.send(p.Error(id=rid, code=code, message=str(exc)))

    def _half_closed(self) -> bool:
        """Whether the client only shut down its sending side (it still reads): the socket does
        not report a hang-up, which a client that closed or died causes."""
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        return not any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    def _client_gone(self, reason: str) -> None:
        """The client left: cancel its live requests (their memory is freed by the engine)."""
        if self.gone:
            return
        self.gone = True
        if self.requests:
            self.log.info("client_gone", reason=reason, cancelling=len(self.requests))
        for handle in self.requests.values():
            if handle is not None:
                handle.cancel()
        if self._reader_task is not None and self._reading:
            self._reader_task.cancel()

    # ------------------------------------------------------------------ requests
    async def _handle(self, message: p.ClientMessage) -> None:
        match message:
            case p.Generate():
                refused = refusal(self, message)
                if refused is not None:
                    return self.send(refused)
                self.requests[message.id] = None
                self._arm_idle()
                try:
                    await self._slots.acquire()  # released once the prompt is tokenized
                except asyncio.CancelledError:
                    self.requests.pop(message.id, None)  # never started: nothing will end it
                    raise
                self._tasks.create_task(relay(self, message, self._slots), name=f"{self.name}.{message.id}")
            case p.Cancel(id=rid):
                if rid in self.requests:
                    self.cancel_asked.add(rid)
                    handle = self.requests[rid]
                    if handle is not None:
                        handle.cancel()
            case p.Stats(id=rid):
                stats = self.server.stats_reply()
                try:
                    self.send(p.StatsReply(id=rid, stats=stats))
                except (TypeError, ValueError) as exc:  # a stats value msgpack cannot carry
                    self.send(p.Error(id=rid, code="internal", message=f"stats not encodable: {exc}"))
            case p.Health(id=rid):
                self.send(self.server.health(rid))
            case p.Hello():
                self.send(p.Error(code=p.PROTOCOL_ERROR, message="hello was already received"))
        return None


def _hello_error(payload: bytes) -> p.Error | None:
    """Why a first frame is not an acceptable hello (the connection then closes), or None."""
    try:
        hello = p.decode_client(payload)
    except p.ProtocolError as exc:
        hello, why = None, str(exc)
    else:
        why = f"got {hello.__class__.__name__.lower()}"
    if isinstance(hello, p.Hello):
        if hello.protocol == p.PROTOCOL_VERSION:
            return None
        message = f"protocol {hello.protocol} is not supported; this server speaks {p.PROTOCOL_VERSION}"
        return p.Error(code=p.UNSUPPORTED_PROTOCOL, message=message)
    try:
        probe = msgspec.msgpack.decode(payload, type=_HelloProbe)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        probe = None
    if probe is not None and probe.type == "hello" and type(probe.protocol) is not int:
        message = (
            f"hello.protocol must be an integer protocol version (this server speaks {p.PROTOCOL_VERSION}), "
            f"got {type(probe.protocol).__name__}"
        )
        return p.Error(code=p.UNSUPPORTED_PROTOCOL, message=message)
    return p.Error(code=p.PROTOCOL_ERROR, message=f"the first frame must be a hello ({why})")
