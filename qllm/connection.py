"""One client connection of ``qllm serve``: reads frames, runs its requests, writes replies.

The connection is an actor. Its reader decodes frames and submits requests to the engine; one
forwarder task per request turns the engine's chunks and result into frames; one writer task owns
the socket's write side and drains a mailbox of encoded frames. All of them live in the
connection's TaskGroup. When the client goes away its live requests are cancelled; when the server
shuts down the connection keeps reading (so cancels still arrive) until its last request has sent
its final frame, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from qllm import protocol as p
from qllm.errors import QllmError
from qllm.listener import Credentials, allowed

if TYPE_CHECKING:
    from qllm.server import Server

log = structlog.get_logger()

_CLOSE = object()  # the writer's sentinel: flush and close
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
# A token is rarely longer than this many characters; longer prompts are refused before tokenizing.
MAX_CHARS_PER_TOKEN = 32


def final_frame(rid: int, result: Any, error: p.ErrorInfo | None) -> p.Final:
    """The wire form of an engine ``RequestResult``."""
    arrival = result.arrival
    return p.Final(
        id=rid,
        status=result.status,
        token_ids=list(result.token_ids),
        text=result.text,
        priority=result.priority,
        usage=p.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
        timings=p.Timings(
            queue=None if result.first_scheduled is None else result.first_scheduled - arrival,
            ttft=None if result.first_token is None else result.first_token - arrival,
            turnaround=result.finished - arrival,
        ),
        preemptions=result.preemptions,
        error=error,
    )


class Connection:
    def __init__(
        self,
        server: Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        name: str,
        credentials: Callable[[Any], Credentials],
    ):
        self.server = server
        self.engine = server.engine
        self.config = server.config
        self.reader = reader
        self.writer = writer
        self.name = name
        self._credentials = credentials
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._live: dict[int, Any] = {}  # wire id -> engine RequestHandle
        self._cancel_asked: set[int] = set()
        self._tasks: asyncio.TaskGroup | None = None
        self._reader_task: asyncio.Task | None = None
        self._reading = True
        self._closing = False
        self._gone = False  # the client stopped sending (EOF, reset, bad framing) or cannot be written
        self._broken = False  # writing failed: drop what is queued
        self._closed = False
        self._refused = False  # closed on a protocol violation: linger so the client reads why
        self.log = log.bind(conn=name)

    @property
    def live(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Serve the connection until the client leaves or the server has shut it down."""
        try:
            if not self._peer_allowed():
                await self._linger()
                return
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                tg.create_task(self._write_loop(), name=f"{self.name}-writer")
                self._reader_task = tg.create_task(self._read_loop(), name=f"{self.name}-reader")
            if self._refused:
                await self._linger()
        except asyncio.CancelledError:
            # Cut off (a client that does not read, at shutdown): drop what is unsent.
            self.writer.transport.abort()
            raise
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(LINGER_SECONDS):
                    await self.writer.wait_closed()
            self.log.debug("connection_closed")

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
        self._closing = True
        self._maybe_stop_reading()

    def _maybe_stop_reading(self) -> None:
        if self._closing and not self._live and self._reader_task is not None:
            self._reader_task.cancel()

    def _maybe_close(self) -> None:
        if not self._reading and not self._live and not self._closed:
            self._closed = True
            self._outbox.put_nowait(_CLOSE)

    def _peer_allowed(self) -> bool:
        cfg = self.config
        if not cfg.allow_uids and not cfg.allow_gids:
            return True
        try:
            creds = self._credentials(self.writer.get_extra_info("socket"))
        except OSError as exc:
            self.log.warning("peer_credentials_unavailable", error=str(exc))
            creds = None
        if creds is not None and allowed(creds, cfg.allow_uids, cfg.allow_gids):
            return True
        self.log.warning(
            "connection_refused", uid=getattr(creds, "uid", None), gid=getattr(creds, "gid", None)
        )
        with contextlib.suppress(OSError):
            self.writer.write(
                p.encode_frame(p.Error(code=p.FORBIDDEN, message="this user may not use the server"))
            )
        return False

    # ------------------------------------------------------------------ writing
    def send(self, message: p.Message) -> None:
        if not self._broken:
            self._outbox.put_nowait(p.encode_frame(message))

    async def _write_loop(self) -> None:
        while (frame := await self._outbox.get()) is not _CLOSE:
            if self._broken:
                continue
            if self.writer.is_closing():  # the transport saw the peer go: writing would only fail
                self._broken = True
                self._client_gone("write_failed")
                continue
            try:
                self.writer.write(frame)
                if self._outbox.empty():
                    await self.writer.drain()
            except (ConnectionError, OSError):
                self._broken = True  # frames still queued are dropped
                self._client_gone("write_failed")
        with contextlib.suppress(ConnectionError, OSError):
            if not self._broken:
                await self.writer.drain()

    # ------------------------------------------------------------------ reading
    async def _read_loop(self) -> None:
        cfg = self.config
        reason = "closed"
        try:
            async with asyncio.timeout(cfg.hello_timeout):
                hello = await self._read_message()
            if hello is None:
                return
            if not isinstance(hello, p.Hello):
                self.send(p.Error(code=p.PROTOCOL_ERROR, message="the first frame must be a hello"))
                self._refused = True
                return
            if hello.protocol != p.PROTOCOL_VERSION:
                self.send(
                    p.Error(
                        code=p.UNSUPPORTED_PROTOCOL,
                        message=f"protocol {hello.protocol} is not supported; this server speaks {p.PROTOCOL_VERSION}",
                    )
                )
                self._refused = True
                return
            self.send(self.server.welcome())
            while (message := await self._read_message()) is not None:
                self._handle(message)
        except TimeoutError:
            self.send(p.Error(code=p.PROTOCOL_ERROR, message=f"no hello within {cfg.hello_timeout} s"))
            reason = "hello_timeout"
        except p.FrameTooLarge as exc:
            self.send(p.Error(code=exc.code, message=str(exc)))
            self._refused = True
            reason = "frame_too_large"
        except asyncio.IncompleteReadError:
            reason = "truncated_frame"
        except (ConnectionError, OSError):
            reason = "reset"
        except asyncio.CancelledError:
            if not self._closing and not self._gone:
                raise
            reason = "shutdown" if self._closing else "write_failed"
        finally:
            self._reading = False
            if not self._closing:
                self._client_gone(reason)
            self._maybe_close()

    async def _read_message(self) -> p.ClientMessage | None:
        """The next well-formed message; a malformed one is answered with an error and skipped."""
        while True:
            payload = await p.read_frame(self.reader, self.config.max_frame_bytes)
            if payload is None:
                return None
            try:
                return p.decode_client(payload)
            except p.ProtocolError as exc:
                # The error answers for the frame's id, unless that id is live: then it concerns
                # the connection, so that the live request still ends with its own final frame.
                rid = exc.request_id if exc.request_id not in self._live else None
                code = exc.code if rid is not None else p.BAD_FRAME
                self.send(p.Error(id=rid, code=code, message=str(exc)))

    def _client_gone(self, reason: str) -> None:
        """The client left: cancel its live requests (their memory is freed by the engine).

        Frames already queued are still written while the socket takes them, so a client that
        only shut down its sending side still reads the replies to what it sent.
        """
        if self._gone:
            return
        self._gone = True
        if self._live:
            self.log.info("client_gone", reason=reason, cancelling=len(self._live))
        for handle in self._live.values():
            handle.cancel()
        if self._reader_task is not None and self._reading:
            self._reader_task.cancel()

    # ------------------------------------------------------------------ requests
    def _handle(self, message: p.ClientMessage) -> None:
        match message:
            case p.Generate():
                self._generate(message)
            case p.Cancel(id=rid):
                handle = self._live.get(rid)
                if handle is not None:
                    self._cancel_asked.add(rid)
                    handle.cancel()
            case p.Stats(id=rid):
                stats = self.engine.stats()
                stats["server"] = self.server.stats()
                try:
                    self.send(p.StatsReply(id=rid, stats=stats))
                except (TypeError, ValueError) as exc:  # a stats value msgpack cannot carry
                    self.send(p.Error(id=rid, code="internal", message=f"stats not encodable: {exc}"))
            case p.Health(id=rid):
                self.send(self.server.health(rid))
            case p.Hello():
                self.send(p.Error(code=p.PROTOCOL_ERROR, message="hello was already received"))

    def _reject(self, rid: int, code: str, message: str) -> None:
        self.send(p.Error(id=rid, code=code, message=message))

    def _generate(self, msg: p.Generate) -> None:
        cfg = self.config
        rid = msg.id
        if rid in self._live:
            return self._reject(rid, p.DUPLICATE_ID, f"request id {rid} is already live on this connection")
        if len(self._live) >= cfg.max_requests_per_connection:
            return self._reject(
                rid,
                p.TOO_MANY_REQUESTS,
                f"at most {cfg.max_requests_per_connection} live requests per connection",
            )
        if self._closing or self.server.draining:
            return self._reject(rid, "engine_closed", "the server is shutting down")
        if msg.max_tokens > cfg.max_tokens:
            return self._reject(
                rid,
                p.MAX_TOKENS_TOO_LARGE,
                f"max_tokens={msg.max_tokens} exceeds the limit of {cfg.max_tokens}",
            )
        prompt = msg.prompt
        if isinstance(prompt, str) and len(prompt) > cfg.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
            return self._reject(
                rid,
                p.PROMPT_TOO_LONG,
                f"prompt of {len(prompt)} characters exceeds the limit of {cfg.max_prompt_tokens} tokens",
            )
        try:
            ids = self.server.encode(prompt, chat=msg.chat)
        except ValueError as exc:
            return self._reject(rid, "invalid_request", str(exc))
        if len(ids) > cfg.max_prompt_tokens:
            return self._reject(
                rid,
                p.PROMPT_TOO_LONG,
                f"prompt of {len(ids)} tokens exceeds the limit of {cfg.max_prompt_tokens}",
            )
        try:
            handle = self.engine.submit(
                ids,
                max_tokens=msg.max_tokens,
                temperature=msg.temperature,
                top_k=msg.top_k,
                top_p=msg.top_p,
                seed=msg.seed,
                stop=tuple(msg.stop),
                ignore_eos=msg.ignore_eos,
                priority=msg.priority,
                rank=msg.rank,
                ttft_deadline=msg.ttft_deadline,
                request_id=f"{self.name}.{rid}",
            )
        except QllmError as exc:
            return self._reject(rid, exc.code, str(exc))
        self._live[rid] = handle
        self._tasks.create_task(self._forward(rid, handle, msg.stream), name=f"{self.name}.{rid}")

    async def _forward(self, rid: int, handle: Any, stream: bool) -> None:
        """Relay one request's chunks (if streaming) and its final frame."""
        try:
            if stream:
                async for chunk in handle:
                    self.send(p.Chunk(id=rid, index=chunk.index, token_ids=[chunk.token_id], text=chunk.text))
            result = await handle.result()
            self.send(final_frame(rid, result, self._error_of(rid, result)))
        except asyncio.CancelledError:
            handle.cancel()
            raise
        finally:
            self._live.pop(rid, None)
            self._cancel_asked.discard(rid)
            self._maybe_stop_reading()
            self._maybe_close()

    def _error_of(self, rid: int, result: Any) -> p.ErrorInfo | None:
        if result.status == "error":
            return p.ErrorInfo(code="request_failed", message=result.error or "")
        if result.status != "aborted":
            return None
        if rid in self._cancel_asked:
            return p.ErrorInfo(code="cancelled", message="cancelled by the client")
        if self.server.draining:
            return p.ErrorInfo(code=p.SHUTDOWN, message=result.error or "the server is shutting down")
        return p.ErrorInfo(code="cancelled", message=result.error or "cancelled")
