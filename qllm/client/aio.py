"""The asyncio client of ``qllm serve``: one connection, requests multiplexed on it by id."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Sequence
from typing import Any

from qllm import protocol as p
from qllm.client.errors import ConnectionLost, RequestTimeout, error_for
from qllm.client.stream import Pending, Stream, StreamContext
from qllm.errors import InvalidRequest, QllmError
from qllm.framing import frame_id, skip_payload
from qllm.paths import client_socket_path, fallback_socket_dir, socket_dir_problem, socket_path_problem
from qllm.spec import RequestSpec, build_spec, checked

# Errors about one frame of ours: the connection goes on (any other connection error closes it).
_FRAME_ERRORS = frozenset({p.BAD_FRAME, p.PROTOCOL_ERROR, "invalid_request"})


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
        self._pending = Pending()
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
        if (problem := socket_path_problem(self.path)) is not None:
            raise ConnectionLost(problem)
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
                self._pending.deliver(rid, message)  # frames of a request given up on are dropped
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
        rid = frame_id(await skip_payload(self._reader, size))
        if rid is None:
            raise error
        self._pending.deliver(rid, error)
        self._pending.close(rid)
        return b""

    def _fail(self, failure: QllmError) -> None:
        if self._failure is None:
            self._failure = failure
        self._pending.fail_all(failure)

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
        queue = self._pending.open(rid)
        try:
            await self._send(message_type(id=rid, **fields))
        except BaseException:
            self._pending.close(rid)
            raise
        return Stream(self, rid, self._pending, queue, self.timeout if timeout is None else timeout)

    # ------------------------------------------------------------------ requests
    async def submit(
        self,
        prompt: str | Sequence[int],
        spec: RequestSpec | None = None,
        *,
        stream: bool = False,
        chat: bool = False,
        timeout: float | None = None,
        **fields: Any,
    ) -> Stream:
        """Send a generate request; returns its :class:`Stream` at once.

        What it asks for is ``spec``, or built from ``fields``, the spec's fields as keywords
        (``max_tokens=16, priority="ls"``; see :mod:`qllm.spec`). It is checked before it is sent:
        a bad value raises the ``invalid_request`` error the server would. ``timeout`` bounds the
        wait for each frame of the reply (default: the client's)."""
        if spec is not None and fields:
            raise TypeError("pass a spec or its fields as keywords, not both")
        try:
            spec = build_spec(fields) if spec is None else checked(spec)
        except InvalidRequest as exc:
            raise error_for(exc.code, str(exc)) from None
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        return await self._open(p.Generate, timeout, prompt=prompt, spec=spec, stream=stream, chat=chat)

    async def generate(
        self, prompt: str | Sequence[int], spec: RequestSpec | None = None, **kw: Any
    ) -> p.Final:
        """Generate and wait for the result (a :class:`~qllm.protocol.Final`); see :meth:`submit`."""
        request = await self.submit(prompt, spec, **kw, stream=False)
        try:
            return await request.final()
        except asyncio.CancelledError:
            with contextlib.suppress(QllmError, OSError):
                await request.cancel()
            raise

    def stream(
        self, prompt: str | Sequence[int], spec: RequestSpec | None = None, **kw: Any
    ) -> StreamContext:
        """``async with client.stream(...) as s: async for chunk in s: ...``; then ``s.result``."""
        return StreamContext(self, prompt, spec, kw)

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
        message = await request.reply()
        if isinstance(message, p.Error):
            raise error_for(message.code, message.message)
        return message
