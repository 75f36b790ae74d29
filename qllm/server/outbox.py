"""The write side of one server connection: encoded frames waiting for the socket, bounded in bytes.

A connection's replies are queued here and written by one task. The queue is bounded by
backpressure rather than by dropping: while the bytes not yet taken by the client (queued here plus
those in the transport's buffer) exceed ``limit``, the connection's reader waits in
:meth:`Outbox.wait_for_room` instead of reading more requests. A client that sends requests but
does not read their replies therefore stops being read, and its requests pile up in its own socket
buffer, not in the server's memory. Frames of requests already running are still queued (their
number is bounded by the per-connection request limit and ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from qllm.logging import get_logger

log = get_logger()


class Outbox:
    """Frames for one connection's writer; see the module docstring for the bound."""

    def __init__(self, writer: asyncio.StreamWriter, limit: int, on_broken: Callable[[], None]):
        self.writer = writer
        self.limit = limit
        self.broken = False  # writing failed: what is queued is dropped
        self._on_broken = on_broken
        self._frames: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in _frames
        self._wakeup = asyncio.Event()  # the writer has frames to write, or should close
        self._room = asyncio.Event()  # the backlog is within the limit
        self._room.set()
        self._closing = False
        # drain() must return below our limit, so that the writer sees the room it made.
        writer.transport.set_write_buffer_limits(high=min(limit, 1 << 16))

    @property
    def backlog(self) -> int:
        """Bytes the client has not taken yet: queued here and in the transport's buffer."""
        transport = self.writer.transport
        buffered = 0 if transport.is_closing() else transport.get_write_buffer_size()
        return self._queued + buffered

    def put(self, frame: bytes) -> None:
        if self.broken or self._closing:
            return
        self._frames.append(frame)
        self._queued += len(frame)
        self._wakeup.set()
        if self.backlog > self.limit:
            self._room.clear()

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wakeup.set()

    async def wait_for_room(self, timeout: float) -> None:
        """Return once the backlog is within the limit; TimeoutError if the client takes nothing
        for ``timeout`` seconds (any progress restarts the wait)."""
        while self.backlog > self.limit and not self.broken:
            self._room.clear()
            before = self.backlog
            try:
                async with asyncio.timeout(timeout):
                    await self._room.wait()
            except TimeoutError:
                if self.backlog >= before:
                    raise

    def _fail(self) -> None:
        self.broken = True
        self._frames.clear()
        self._queued = 0
        self._room.set()
        self._on_broken()

    async def run(self) -> None:
        """The writer task: write frames in order, waiting whenever the transport is full."""
        writer = self.writer
        while True:
            while self._frames:
                frame = self._frames.popleft()
                self._queued -= len(frame)
                if writer.is_closing():  # the transport saw the peer go: writing would only fail
                    self._fail()
                    break
                try:
                    writer.write(frame)
                    await writer.drain()  # waits only while the transport is above its high-water mark
                except (ConnectionError, OSError):
                    self._fail()
                    break
                if self.backlog <= self.limit:
                    self._room.set()
            if self._closing or self.broken:
                break
            self._wakeup.clear()
            await self._wakeup.wait()
        if not self.broken:
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                self.broken = True
