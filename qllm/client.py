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

Requests are multiplexed on one connection, so one client serves many concurrent tasks. Errors
the server reports raise the exception of their wire ``code`` (see :data:`ERRORS`); a request
cancelled by this client ends normally with status ``aborted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from qllm import protocol as p
from qllm.errors import EngineClosed, InvalidRequest, QllmError, RequestFailed
from qllm.server.config import client_socket_path, fallback_socket_dir, socket_dir_problem

Result = p.Final
"""What a finished request returns: ``status``, ``token_ids``, ``text``, ``usage``, ``timings``,
``preemptions`` (see docs/protocol.md)."""

T = TypeVar("T")


# Errors ----------------------------------------------------------------------------------------


class ServerError(QllmError):
    """An error the server reported with a code this client does not know."""

    def __init__(self, message: str = "", *, code: str | None = None, result: p.Final | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.result = result  # the request's final frame, when there was one


class PromptTooLong(ServerError, InvalidRequest):
    code = p.PROMPT_TOO_LONG


class MaxTokensTooLarge(ServerError, InvalidRequest):
    code = p.MAX_TOKENS_TOO_LARGE


class TooManyRequests(ServerError):
    code = p.TOO_MANY_REQUESTS


class Forbidden(ServerError, PermissionError):
    code = p.FORBIDDEN


class TooManyConnections(ServerError):
    """The server (or its limit for this user) holds as many connections as it allows."""

    code = p.TOO_MANY_CONNECTIONS


class ServerTimeout(ServerError, TimeoutError):
    """The server closed the connection: idle too long, or a frame took too long to arrive."""

    code = p.TIMEOUT


class ServerShutdown(ServerError, EngineClosed):
    """The server shut down before the request finished (``.result`` holds what was generated)."""

    code = p.SHUTDOWN


class ConnectionLost(QllmError, ConnectionError):
    """The connection closed before the reply came."""

    code = "connection_lost"


class RequestTimeout(QllmError, TimeoutError):
    """No reply within the timeout; the request was cancelled on the server."""

    code = "timeout"


def _subclass(base: type[QllmError]) -> type[ServerError]:
    return type(base.__name__, (ServerError, base), {"code": base.code, "__module__": __name__})


ERRORS: dict[str, type[QllmError]] = {
    "invalid_request": _subclass(InvalidRequest),
    "engine_closed": _subclass(EngineClosed),
    "request_failed": _subclass(RequestFailed),
    p.PROMPT_TOO_LONG: PromptTooLong,
    p.MAX_TOKENS_TOO_LARGE: MaxTokensTooLarge,
    p.TOO_MANY_REQUESTS: TooManyRequests,
    p.FORBIDDEN: Forbidden,
    p.TOO_MANY_CONNECTIONS: TooManyConnections,
    p.TIMEOUT: ServerTimeout,
    p.SHUTDOWN: ServerShutdown,
    p.BAD_FRAME: p.ProtocolError,
    p.PROTOCOL_ERROR: p.ProtocolError,
    p.DUPLICATE_ID: p.ProtocolError,
    p.FRAME_TOO_LARGE: p.FrameTooLarge,
    p.UNSUPPORTED_PROTOCOL: p.UnsupportedProtocol,
}
"""Exception class raised for each wire error code; any other code raises :class:`ServerError`."""


def error_for(code: str, message: str, result: p.Final | None = None) -> QllmError:
    """The exception for a wire error ``code``."""
    cls = ERRORS.get(code, ServerError)
    if issubclass(cls, p.ProtocolError):
        return cls(message, code=code)
    return cls(message, code=code, result=result)


_FRAME_ERRORS = frozenset({p.BAD_FRAME, p.PROTOCOL_ERROR, "invalid_request"})


def _raise_for(final: p.Final) -> p.Final:
    """A final frame, or its exception: anything but a cancel this client asked for raises."""
    if final.error is not None and final.error.code != "cancelled":
        raise error_for(final.error.code, final.error.message, final)
    return final


# Async client ----------------------------------------------------------------------------------


class Stream:
    """One submitted request: iterate it for :class:`~qllm.protocol.Chunk` s (streaming requests);
    :meth:`final` waits for its result. As a context manager, leaving early cancels it."""

    def __init__(self, client: AsyncClient, rid: int, queue: asyncio.Queue, timeout: float | None):
        self.client = client
        self.id = rid
        self.result: p.Final | None = None
        self._queue = queue
        self._timeout = timeout

    async def _next_message(self) -> p.Message:
        try:
            async with asyncio.timeout(self._timeout):
                item = await self._queue.get()
        except TimeoutError:
            await self.cancel()
            self.client._pending.pop(self.id, None)
            raise RequestTimeout(f"no reply to request {self.id} within {self._timeout} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> p.Chunk:
        if self.result is not None:
            raise StopAsyncIteration
        message = await self._next_message()
        if isinstance(message, p.Chunk):
            return message
        self._finish(message)
        raise StopAsyncIteration

    def _finish(self, message: p.Message) -> None:
        self.client._pending.pop(self.id, None)
        if isinstance(message, p.Final):
            self.result = message
            _raise_for(message)
        elif isinstance(message, p.Error):
            raise error_for(message.code, message.message)
        else:
            raise p.ProtocolError(f"unexpected {type(message).__name__} for request {self.id}")

    async def final(self) -> p.Final:
        """Wait for the final frame (skipping chunks not yet read) and return it."""
        while self.result is None:
            message = await self._next_message()
            if not isinstance(message, p.Chunk):
                self._finish(message)
        return _raise_for(self.result)

    @property
    def done(self) -> bool:
        return self.result is not None or self.id not in self.client._pending

    async def cancel(self) -> None:
        """Ask the server to cancel; the request still ends with a final frame (``aborted``)."""
        if not self.done:
            await self.client.cancel(self.id)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.done:
            with contextlib.suppress(QllmError, OSError):
                await self.cancel()
            self.client._pending.pop(self.id, None)


class AsyncClient:
    """Connection to a ``qllm serve`` socket; safe to share among tasks of one event loop."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        name: str = "qllm.client",
    ):
        self.path = str(path) if path is not None else str(client_socket_path())
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self.welcome: p.Welcome | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._failure: QllmError | None = None
        self._max_frame = p.MAX_FRAME_BYTES

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> p.Welcome:
        """Open the connection and exchange hellos; returns the server's welcome (also ``.welcome``)."""
        directory = os.path.dirname(self.path)
        if directory == str(fallback_socket_dir(os.getuid())):  # in /tmp: anyone may have made it
            problem = socket_dir_problem(fallback_socket_dir(os.getuid()), os.getuid())
            if problem is not None and os.path.lexists(directory):
                raise ConnectionLost(problem)
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._reader, self._writer = await asyncio.open_unix_connection(self.path)
                self._writer.write(p.encode_frame(p.Hello(client=self.name)))
                payload = await p.read_frame(self._reader, self._max_frame)
        except TimeoutError:
            await self.close()
            raise RequestTimeout(f"no welcome from {self.path} within {self.connect_timeout} s") from None
        except FileNotFoundError:
            raise ConnectionLost(f"no qllm server socket at {self.path} (is `qllm serve` running?)") from None
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            await self.close()
            raise ConnectionLost(f"cannot talk to {self.path}: {exc}") from None
        if payload is None:
            await self.close()
            raise ConnectionLost(f"{self.path} closed the connection during the hello")
        message = p.decode_server(payload)
        if isinstance(message, p.Error):
            await self.close()
            raise error_for(message.code, message.message)
        if not isinstance(message, p.Welcome):
            await self.close()
            raise p.ProtocolError(f"expected a welcome, got {type(message).__name__}")
        self.welcome = message
        self._max_frame = max(message.max_frame_bytes, p.MAX_FRAME_BYTES)
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="qllm-client-reader"
        )
        return message

    async def close(self) -> None:
        """Close the connection; pending requests raise :class:`ConnectionLost`."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None
        self._fail(ConnectionLost("the client was closed"))

    async def _read_loop(self) -> None:
        failure: QllmError = ConnectionLost("the server closed the connection")
        try:
            while (payload := await self._read_payload()) is not None:
                if not payload:  # an oversized frame, already reported to its request
                    continue
                message = p.decode_server(payload)
                rid = getattr(message, "id", None)
                if rid is None:
                    # An error about the connection. The server closes it after any but these
                    # (which concern one frame of ours); the close then reports this error.
                    if isinstance(message, p.Error) and message.code not in _FRAME_ERRORS:
                        failure = error_for(message.code, message.message)
                    continue
                queue = self._pending.get(rid)
                if queue is not None:  # frames of a request given up on are dropped
                    queue.put_nowait(message)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            failure = ConnectionLost(f"connection to {self.path} lost: {exc}")
        except p.ProtocolError as exc:
            failure = exc
        self._fail(failure)

    async def _read_payload(self) -> bytes | None:
        """The next frame's payload; None at the end of the stream. A frame above this client's
        limit is skipped and, if its first bytes name a pending request, fails only that request
        with :class:`~qllm.protocol.FrameTooLarge` (b"" is returned)."""
        try:
            header = await self._reader.readexactly(p.HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise
        (size,) = p.HEADER.unpack(header)
        if size <= self._max_frame:
            return await self._reader.readexactly(size)
        error = p.FrameTooLarge(
            f"the server sent a frame of {size} bytes; this client accepts {self._max_frame}"
        )
        rid = p.frame_id(await p.skip_payload(self._reader, size))
        if rid is None:
            raise error
        queue = self._pending.pop(rid, None)
        if queue is not None:
            queue.put_nowait(error)
        return b""

    def _fail(self, failure: QllmError) -> None:
        if self._failure is None:
            self._failure = failure
        for queue in self._pending.values():
            queue.put_nowait(failure)
        self._pending.clear()

    async def _send(self, message: p.Message) -> None:
        if self._failure is not None:
            raise self._failure
        if self._writer is None:
            raise ConnectionLost("not connected; call connect() first")
        try:
            self._writer.write(p.encode_frame(message))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"connection to {self.path} lost: {exc}") from None

    async def _open(self, message_type: type[p.Message], timeout: float | None, **fields: Any) -> Stream:
        rid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = queue
        try:
            await self._send(message_type(id=rid, **fields))
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return Stream(self, rid, queue, self.timeout if timeout is None else timeout)

    # ------------------------------------------------------------------ requests
    async def submit(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        priority: str = "be",
        rank: int = 0,
        ttft_deadline: float | None = None,
        stream: bool = False,
        chat: bool = False,
        timeout: float | None = None,
    ) -> Stream:
        """Send a generate request; returns its :class:`Stream` at once.

        ``timeout`` bounds the wait for each frame of the reply (default: the client's).
        """
        return await self._open(
            p.Generate,
            timeout,
            prompt=prompt if isinstance(prompt, str) else list(prompt),
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=[stop] if isinstance(stop, str) else list(stop),
            ignore_eos=ignore_eos,
            priority=priority,
            rank=rank,
            ttft_deadline=ttft_deadline,
            stream=stream,
            chat=chat,
        )

    async def generate(self, prompt: str | Sequence[int], **kw: Any) -> p.Final:
        """Generate and wait for the result (a :class:`~qllm.protocol.Final`); see :meth:`submit`."""
        request = await self.submit(prompt, **kw, stream=False)
        try:
            return await request.final()
        except asyncio.CancelledError:
            with contextlib.suppress(QllmError, OSError):
                await request.cancel()
            raise

    def stream(self, prompt: str | Sequence[int], **kw: Any) -> _StreamContext:
        """``async with client.stream(...) as s: async for chunk in s: ...``; then ``s.result``."""
        return _StreamContext(self, prompt, kw)

    async def cancel(self, request_id: int) -> None:
        """Cancel a live request of this client (its final frame says ``aborted``)."""
        await self._send(p.Cancel(id=request_id))

    async def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The server's statistics: engine counters, memory, per-class metrics, server fields."""
        reply = await self._reply(p.Stats, timeout)
        return reply.stats

    async def health(self, timeout: float | None = None) -> p.HealthReply:
        """Whether the server serves (``status`` ``ok`` or ``draining``), its model and policy."""
        return await self._reply(p.Health, timeout)

    async def _reply(self, message_type: type[p.Message], timeout: float | None) -> Any:
        request = await self._open(message_type, timeout)
        message = await request._next_message()
        self._pending.pop(request.id, None)
        if isinstance(message, p.Error):
            raise error_for(message.code, message.message)
        return message


class _StreamContext:
    """What :meth:`AsyncClient.stream` returns: submit on entry, cancel on an early exit."""

    def __init__(self, client: AsyncClient, prompt: str | Sequence[int], kw: dict[str, Any]):
        self._client, self._prompt, self._kw = client, prompt, kw
        self._stream: Stream | None = None

    async def __aenter__(self) -> Stream:
        self._stream = await self._client.submit(self._prompt, **self._kw, stream=True)
        return self._stream

    async def __aexit__(self, *exc: object) -> None:
        await self._stream.__aexit__(*exc)

    def __aiter__(self) -> AsyncIterator[p.Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[p.Chunk]:
        async with self as stream:
            async for chunk in stream:
                yield chunk


# Blocking client -------------------------------------------------------------------------------


class Client:
    """Blocking client: the :class:`AsyncClient` API on a private event loop thread."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
    ):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qllm-client-loop", daemon=True)
        self._thread.start()
        self._client = AsyncClient(path, timeout=timeout, connect_timeout=connect_timeout)
        try:
            self.welcome: p.Welcome = self._call(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def path(self) -> str:
        return self._client.path

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | Sequence[int], **kw: Any) -> p.Final:
        """Generate and wait for the result; see :meth:`AsyncClient.submit` for the options."""
        return self._call(self._client.generate(prompt, **kw))

    def stream(self, prompt: str | Sequence[int], **kw: Any) -> SyncStream:
        """An iterator of chunks (``with client.stream(...) as s: for chunk in s: ...``)."""
        return SyncStream(self, self._call(self._client.submit(prompt, **kw, stream=True)))

    def cancel(self, request_id: int) -> None:
        self._call(self._client.cancel(request_id))

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        return self._call(self._client.stats(timeout))

    def health(self, timeout: float | None = None) -> p.HealthReply:
        return self._call(self._client.health(timeout))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self._client.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncStream:
    """Blocking view of a :class:`Stream`; closing it before the end cancels the request."""

    def __init__(self, client: Client, stream: Stream):
        self._client = client
        self._stream = stream
        self.id = stream.id

    @property
    def result(self) -> p.Final | None:
        return self._stream.result

    def __iter__(self) -> Iterator[p.Chunk]:
        return self

    def __next__(self) -> p.Chunk:
        try:
            return self._client._call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def final(self) -> p.Final:
        return self._client._call(self._stream.final())

    def cancel(self) -> None:
        self._client._call(self._stream.cancel())

    def close(self) -> None:
        self._client._call(self._stream.__aexit__(None, None, None))

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
