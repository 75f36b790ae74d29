"""Systems under test: a qllm engine in this process, or a ``qllm serve`` reached over its socket.

A system replays a workload (items submitted at their arrival times by a feeder) and returns one
:class:`~qllm.bench.stats.Record` per item, times relative to the start of the replay. The peer,
transformers' continuous batching, lives in :mod:`qllm.bench.peer` with the same interface.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from qllm.bench.stats import Record
from qllm.bench.trace import Item

if TYPE_CHECKING:
    import httpx

    from qllm.client import AsyncClient, Stream
    from qllm.kernel.request import RequestResult
    from qllm.models import MoEModel

OnDone = Callable[[], None] | None
Handle = TypeVar("Handle")
Outcome = TypeVar("Outcome")
CONNECT_TIMEOUT_S = 300.0
"""How long to wait for a server's welcome: `qllm serve` opens its socket before its model is loaded."""


class System(Protocol):
    name: str
    kind: str  # "engine" | "serve" | "peer"
    policy: str | None

    async def run(
        self, items: Sequence[Item], *, slo_s: float | None, timeout: float | None, on_done: OnDone = None
    ) -> list[Record]:
        """Replay ``items``; requests still running ``timeout`` s after the last arrival are cancelled."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


async def replay(
    items: Sequence[Item],
    clock: Callable[[], float],
    submit: Callable[[Item, float], Coroutine[Any, Any, tuple[Handle, Coroutine[Any, Any, Outcome]]]],
    cancel: Callable[[Handle], object],  # may return an awaitable
    timeout: float | None,
    on_done: OnDone,
) -> tuple[float, list[Outcome]]:
    """Submit each item at ``t0 + arrival_s`` (``submit(item, t0)`` gives a handle to cancel it by
    and a coroutine of its outcome); cancel what is still running ``timeout`` s after the last
    arrival. Returns t0 and the outcomes in item order."""
    t0 = clock()
    tasks: list[asyncio.Task[Outcome]] = []
    handles: list[Handle] = []
    async with asyncio.TaskGroup() as tg:
        for item in items:
            delay = t0 + item.arrival_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            handle, outcome = await submit(item, t0)
            handles.append(handle)
            task = tg.create_task(outcome)
            if on_done is not None:
                task.add_done_callback(lambda _: on_done())
            tasks.append(task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                cancelled = cancel(handles[tasks.index(task)])
                if inspect.isawaitable(cancelled):
                    await cancelled
    return t0, [t.result() for t in tasks]


class EngineSystem:
    """A fresh :class:`qllm.Engine` with one policy per replay, on a model loaded once."""

    kind = "engine"

    def __init__(
        self,
        model: MoEModel,
        policy: str,
        *,
        max_batch: int,
        prefill_chunk: int,
        moe_granularity: str = "layer",
        ranks: int = 1,
        threads: int | None = None,
        window: int = 4,
    ):
        """``ranks`` > 1: each replay's engine splits the experts across that many ranks (``threads``
        each, ``window`` calls ahead); every rank loads the model by ``model_name`` (caller-set)."""
        self.model = model
        self.policy = policy
        self.name = policy if ranks == 1 else f"{policy}@ep{ranks}"
        self.ranks, self.threads, self.window = ranks, threads, window
        self.model_name: str | None = None
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.moe_granularity = moe_granularity
        self.last_stats: dict[str, Any] | None = None  # the kernel's counters of the last replay

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "policy": self.policy,
            "moe_granularity": self.moe_granularity,
            "expert_parallel": self.ranks,
            "threads_per_rank": self.threads,
            "expert_window": self.window if self.ranks > 1 else None,
        }

    async def run(
        self,
        items: Sequence[Item],
        *,
        slo_s: float | None = None,
        timeout: float | None = None,
        on_done: OnDone = None,
    ) -> list[Record]:
        import torch

        from qllm.engine import Engine

        threads = torch.get_num_threads()
        split = {"expert_parallel": self.ranks, "threads": self.threads, "expert_window": self.window}
        split = split if self.ranks > 1 else {}
        try:
            engine = Engine(
                model=self.model_name if split else self.model,
                policy=self.policy,
                max_batch=self.max_batch,
                prefill_chunk=self.prefill_chunk,
                moe_granularity=self.moe_granularity,
                **split,
            )
            return await self._replay(engine, items, slo_s, timeout, on_done)
        finally:
            torch.set_num_threads(threads)  # an expert-parallel engine set its own, process-wide

    async def _replay(
        self, engine: Any, items: Sequence[Item], slo_s: float | None, timeout: float | None, on_done: OnDone
    ) -> list[Record]:
        async def submit(item: Item, t0: float):
            handle = engine.submit(
                list(item.prompt),
                max_tokens=item.output_len,
                ignore_eos=True,
                priority=item.cls,
                ttft_deadline=slo_s if item.cls == "ls" else None,
            )
            return handle, handle.result()

        async with engine:
            t0, results = await replay(items, time.monotonic, submit, lambda h: h.cancel(), timeout, on_done)
            stats = engine.stats()
            kernel = stats["kernel"]
        self.last_stats = {
            "expert_parallel": stats["expert_parallel"],
            "batches": kernel["batches"],
            "rows": kernel["rows"],
            "rows_per_batch": kernel["rows"] / kernel["batches"] if kernel["batches"] else None,
            "op_times": kernel["op_times"],
            "op_costs": kernel["op_costs"],
        }
        return [_engine_record(r, t0) for r in results]

    async def close(self) -> None:
        pass


def _engine_record(r: RequestResult, t0: float) -> Record:
    def rel(t: float | None) -> float | None:
        return None if t is None else t - t0

    times = r.token_times
    return Record(
        cls=r.priority,
        arrival=r.arrival - t0,
        first_scheduled=rel(r.first_scheduled),
        first_token=rel(r.first_token),
        finished=rel(r.finished) if r.status == "length" else None,
        prompt_tokens=r.prompt_tokens,
        output_tokens=len(r.token_ids),
        preemptions=r.preemptions,
        inter_token_s=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
    )


class ServeSystem:
    """A running ``qllm serve``: requests go through :class:`qllm.client.AsyncClient`, so every time
    is taken on this side of the socket and includes the wire."""

    kind = "serve"

    def __init__(self, path: str, client: AsyncClient, policy: str, model: str):
        self.path = path
        self.client = client
        self.policy = policy
        self.model = model
        self.name = f"serve:{policy}"

    @classmethod
    async def connect(cls, path: str) -> ServeSystem:
        from qllm.client import AsyncClient

        client = AsyncClient(path, connect_timeout=CONNECT_TIMEOUT_S)
        welcome = await client.connect()
        return cls(path, client, welcome.policy, welcome.model)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "policy": self.policy,
            "socket": self.path,
            "model": self.model,
        }

    async def run(
        self,
        items: Sequence[Item],
        *,
        slo_s: float | None = None,
        timeout: float | None = None,
        on_done: OnDone = None,
    ) -> list[Record]:
        async def submit(item: Item, t0: float):
            arrival = time.monotonic()
            stream = await self.client.submit(
                item.prompt if isinstance(item.prompt, str) else list(item.prompt),
                max_tokens=item.output_len,
                ignore_eos=True,
                priority=item.cls,
                ttft_deadline=slo_s if item.cls == "ls" else None,
                stream=True,
            )
            return stream, _collect(stream, item, arrival, t0)

        _, records = await replay(items, time.monotonic, submit, lambda s: s.cancel(), timeout, on_done)
        return records

    async def close(self) -> None:
        await self.client.close()


async def _collect(stream: Stream, item: Item, arrival: float, t0: float) -> Record:
    from qllm.errors import QllmError

    chunk_times: list[float] = []
    final = None
    try:
        async for _chunk in stream:
            chunk_times.append(time.monotonic())
        final = stream.result
    except QllmError as exc:
        final = getattr(exc, "result", None)
    end = time.monotonic()
    ok = final is not None and final.status == "length"
    queue = final.timings.queue if final is not None else None
    tokens = len(final.token_ids) if final is not None else 0
    return Record(
        cls=item.cls,
        arrival=arrival - t0,
        first_scheduled=None if queue is None else arrival - t0 + queue,
        first_token=chunk_times[0] - t0 if chunk_times else None,
        finished=end - t0 if ok else None,
        prompt_tokens=final.usage.prompt_tokens if final is not None else item.prompt_len,
        output_tokens=tokens,
        preemptions=final.preemptions if final is not None else 0,
        inter_token_s=(chunk_times[-1] - chunk_times[0]) / (tokens - 1) if ok and tokens > 1 else None,
    )


class HttpSystem:
    """A running ``qllm serve`` reached over its HTTP API (``http://HOST:PORT`` or the path of its
    HTTP Unix socket), with streaming completions; times are taken on this side, wire included."""

    kind = "serve"

    def __init__(self, target: str, client: httpx.AsyncClient, policy: str, model: str):
        self.target = target
        self.client = client
        self.policy = policy
        self.model = model
        self.name = f"http:{policy}"

    @classmethod
    async def connect(cls, target: str) -> HttpSystem:
        import httpx

        if target.startswith(("http://", "https://")):
            client = httpx.AsyncClient(base_url=target, timeout=None)
        else:
            transport = httpx.AsyncHTTPTransport(uds=target)
            client = httpx.AsyncClient(transport=transport, base_url="http://qllm", timeout=None)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            health = (await client.get("/health")).json()
        return cls(target, client, health.get("policy", "?"), health.get("model", "?"))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "policy": self.policy,
            "http": self.target,
            "model": self.model,
        }

    async def run(
        self,
        items: Sequence[Item],
        *,
        slo_s: float | None = None,
        timeout: float | None = None,
        on_done: OnDone = None,
    ) -> list[Record]:
        async def submit(item: Item, t0: float):
            box: dict[str, httpx.Response] = {}  # holds the response once it streams, for a cancel
            return box, self._one(item, time.monotonic(), t0, box)

        async def cancel(box: dict[str, httpx.Response]) -> None:
            if "response" in box:
                await box["response"].aclose()  # the server cancels a request whose client left

        _, records = await replay(items, time.monotonic, submit, cancel, timeout, on_done)
        return records

    async def _one(self, item: Item, arrival: float, t0: float, box: dict[str, httpx.Response]) -> Record:
        import json

        import httpx

        body = {
            "prompt": item.prompt if isinstance(item.prompt, str) else list(item.prompt),
            "max_tokens": item.output_len,
            "ignore_eos": True,
            "priority": item.cls,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunk_times: list[float] = []
        usage = None
        finish = None
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                box["response"] = response
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices", ()):
                        if choice.get("text"):
                            chunk_times.append(time.monotonic())
                        finish = choice.get("finish_reason") or finish
        except (httpx.HTTPError, httpx.StreamError):
            pass  # cancelled by closing the stream
        return completion_record(item, arrival, t0, chunk_times, usage, finish)

    async def close(self) -> None:
        await self.client.aclose()


def completion_record(
    item: Item,
    arrival: float,
    t0: float,
    token_times: list[float],
    usage: dict[str, int] | None,
    finish: str | None,
) -> Record:
    """The record of one streamed OpenAI completion that ended now: ``token_times`` are when its
    tokens arrived, ``usage`` and ``finish`` what its last events said. Only a request that
    generated all its tokens (``finish_reason`` "length") counts as finished."""
    end = time.monotonic()
    ok = finish == "length"
    tokens = usage["completion_tokens"] if usage else len(token_times)
    return Record(
        cls=item.cls,
        arrival=arrival - t0,
        first_scheduled=None,
        first_token=token_times[0] - t0 if token_times else None,
        finished=end - t0 if ok else None,
        prompt_tokens=usage["prompt_tokens"] if usage else item.prompt_len,
        output_tokens=tokens,
        inter_token_s=(token_times[-1] - token_times[0]) / (tokens - 1) if ok and tokens > 1 else None,
    )
