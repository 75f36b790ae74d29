"""The blocking client of ``qllm serve``: the :class:`~qllm.client.AsyncClient` API run on a
private event loop thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from qllm import protocol as p
from qllm.client.aio import AsyncClient

if TYPE_CHECKING:
    from qllm.client.stream import Stream
    from qllm.spec import RequestSpec

T = TypeVar("T")


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

    def generate(self, prompt: str | Sequence[int], spec: RequestSpec | None = None, **kw: Any) -> p.Final:
        """Generate and wait for the result; see :meth:`AsyncClient.submit` for the options."""
        return self._call(self._client.generate(prompt, spec, **kw))

    def stream(self, prompt: str | Sequence[int], spec: RequestSpec | None = None, **kw: Any) -> SyncStream:
        """An iterator of chunks (``with client.stream(...) as s: for chunk in s: ...``)."""
        return SyncStream(self._call, self._call(self._client.submit(prompt, spec, **kw, stream=True)))

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

    def __init__(self, call: Callable[[Coroutine[Any, Any, Any]], Any], stream: Stream):
        self._call = call  # runs a coroutine on the client's loop and waits for it
        self._stream = stream
        self.id = stream.id

    @property
    def result(self) -> p.Final | None:
        return self._stream.result

    def __iter__(self) -> Iterator[p.Chunk]:
        return self

    def __next__(self) -> p.Chunk:
        try:
            return self._call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def final(self) -> p.Final:
        return self._call(self._stream.final())

    def cancel(self) -> None:
        self._call(self._stream.cancel())

    def close(self) -> None:
        self._call(self._stream.__aexit__(None, None, None))

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
