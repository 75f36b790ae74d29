"""One request of a client connection: the queue its replies arrive on, and its :class:`Stream`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from qllm import protocol as p
from qllm.client.errors import RequestTimeout, error_for
from qllm.errors import QllmError

if TYPE_CHECKING:
    from qllm.client.aio import AsyncClient
    from qllm.spec import RequestSpec

Reply = p.Message | BaseException  # a frame for the request, or why none will come


class Pending:
    """The requests of one connection that await replies: a queue per id. A request leaves when
    it has its last frame or is given up on; frames for an id not here are dropped."""

    def __init__(self) -> None:
        self._queues: dict[int, asyncio.Queue[Reply]] = {}

    def open(self, rid: int) -> asyncio.Queue[Reply]:
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._queues[rid] = queue
        return queue

    def close(self, rid: int) -> asyncio.Queue[Reply] | None:
        return self._queues.pop(rid, None)

    def __contains__(self, rid: int) -> bool:
        return rid in self._queues

    def deliver(self, rid: int, item: Reply) -> None:
        queue = self._queues.get(rid)
        if queue is not None:
            queue.put_nowait(item)

    def fail_all(self, failure: BaseException) -> None:
        """Every pending request ends with ``failure``; none is pending after."""
        for queue in self._queues.values():
            queue.put_nowait(failure)
        self._queues.clear()


def _raise_for(final: p.Final) -> p.Final:
    """A final frame, or its exception: anything but a cancel this client asked for raises."""
    if final.error is not None and final.error.code != "cancelled":
        raise error_for(final.error.code, final.error.message, final)
    return final


class Stream:
    """One submitted request: iterate it for :class:`~qllm.protocol.Chunk` s (streaming requests);
    :meth:`final` waits for its result. As a context manager, leaving early cancels it."""

    def __init__(
        self,
        client: AsyncClient,
        rid: int,
        pending: Pending,
        queue: asyncio.Queue[Reply],
        timeout: float | None,
    ):
        self.client = client
        self.id = rid
        self.result: p.Final | None = None
        self._pending = pending
        self._queue = queue
        self._timeout = timeout

    async def _next_message(self) -> p.Message:
        try:
            async with asyncio.timeout(self._timeout):
                item = await self._queue.get()
        except TimeoutError:
            await self.cancel()
            self._pending.close(self.id)
            raise RequestTimeout(f"no reply to request {self.id} within {self._timeout} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def reply(self) -> p.Message:
        """The one frame that answers a request other than ``generate`` (stats, health)."""
        message = await self._next_message()
        self._pending.close(self.id)
        return message

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
        self._pending.close(self.id)
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
        return self.result is not None or self.id not in self._pending

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
            self._pending.close(self.id)


class StreamContext:
    """What :meth:`AsyncClient.stream` returns: submit on entry, cancel on an early exit."""

    def __init__(
        self,
        client: AsyncClient,
        prompt: str | Sequence[int],
        spec: RequestSpec | None,
        kw: dict[str, Any],
    ):
        self._client, self._prompt, self._spec, self._kw = client, prompt, spec, kw
        self._stream: Stream | None = None

    async def __aenter__(self) -> Stream:
        self._stream = await self._client.submit(self._prompt, self._spec, **self._kw, stream=True)
        return self._stream

    async def __aexit__(self, *exc: object) -> None:
        await self._stream.__aexit__(*exc)

    def __aiter__(self) -> AsyncIterator[p.Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[p.Chunk]:
        async with self as stream:
            async for chunk in stream:
                yield chunk
