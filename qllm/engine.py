"""``qllm.Engine``: the in-process API over the microkernel (see docs/engine.md)."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog
import torch

from qllm.errors import EngineClosed, InvalidRequest
from qllm.kernel.compute import Compute
from qllm.kernel.dispatcher import Dispatcher
from qllm.kernel.messages import Cancel
from qllm.kernel.output import StreamChunk
from qllm.kernel.request import PriorityClass, Request, RequestResult
from qllm.kernel.stats import Metrics
from qllm.kernel.tensors import TensorManager
from qllm.models import load_model
from qllm.models.base import MOE_GRANULARITIES, MoEModel
from qllm.policies import DEFAULT_POLICY, Policy, load_policy
from qllm.policies.fallback import Fallback
from qllm.sampling import SamplingParams
from qllm.text import encode

log = structlog.get_logger()
_ids = itertools.count(1)


class RequestHandle:
    """A submitted request: iterate it for :class:`StreamChunk` s, await :meth:`result` for the end."""

    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self._request = request

    @property
    def id(self) -> str:
        return self._request.id

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[StreamChunk]:
        events = self._request.events
        while (chunk := await events.get()) is not None:
            yield chunk
        events.put_nowait(None)  # a second iteration ends at once

    async def result(self) -> RequestResult:
        """The final result; never raises for a failed or cancelled request (see ``status``)."""
        return await asyncio.shield(self._request.done)

    def cancel(self) -> bool:
        return self._engine.cancel(self.id)


class Engine:
    """Serves concurrent LS/BE requests on one model with expert-level preemption."""

    def __init__(
        self,
        model: Any = "tiny",
        policy: str | type[Policy] | Policy | None = DEFAULT_POLICY,
        *,
        dtype: str | None = None,
        device: str | None = None,
        memory_budget: int | None = None,
        max_batch: int = 32,
        prefill_chunk: int = 128,
        batch_invariant: bool = True,
        compute: str = "thread",
        threads: int | None = None,
        moe_granularity: str = "layer",
        kv_block_size: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if moe_granularity not in MOE_GRANULARITIES:
            raise ValueError(
                f"moe_granularity must be one of {', '.join(MOE_GRANULARITIES)}, got {moe_granularity!r}"
            )
        if memory_budget is not None and memory_budget < 0:
            raise ValueError("memory_budget must be >= 0 bytes")
        if kv_block_size is not None and kv_block_size < 1:
            raise ValueError("kv_block_size must be >= 1 token (or None for growable buffers)")
        if threads is not None:
            if threads < 1:
                raise ValueError("threads must be >= 1")
            torch.set_num_threads(threads)  # process-wide: torch's intra-op thread pool
        self.policy = load_policy(policy)
        if isinstance(model, MoEModel) and device is not None and torch.device(device) != model.device:
            raise ValueError(
                f"the model is loaded on {model.device}, not on {device}; load it there or omit device"
            )
        self.model: MoEModel = load_model(
            model, dtype=dtype, device=device or "cpu", batch_invariant=batch_invariant
        )
        self.metrics = Metrics()
        self._compute = Compute(compute)
        self._tensors = TensorManager(
            self.model.device, memory_budget, block_size=kv_block_size, dtype=self.model.dtype
        )
        self._dispatcher = Dispatcher(
            self.model,
            self.policy,
            Fallback(load_policy(DEFAULT_POLICY)),
            self._tensors,
            self._compute,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            moe_granularity=moe_granularity,
            on_finish=self._finished,
        )
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._requests: dict[str, Request] = {}

    # ---------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._group is not None:
            raise RuntimeError("engine already started")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._task = self._group.create_task(self._dispatcher.run(), name="qllm-dispatcher")
        self._accepting = True
        log.info("engine_started", model=self.model.family, policy=self.policy.name, pid=os.getpid())

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; let live requests finish for up to ``timeout`` s; cancel the rest."""
        self._accepting = False
        pending = [r.done for r in self._requests.values() if not r.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for request in list(self._requests.values()):
            if not request.done.done():
                self._dispatcher.post(Cancel(request.id, "server shutting down"))

    async def stop(self) -> None:
        """Cancel everything still live (each gets an ``aborted`` result) and stop the actors."""
        if self._group is None:
            return
        self._accepting = False
        for request in list(self._requests.values()):
            self._dispatcher.post(Cancel(request.id, "engine stopped"))
        self._dispatcher.stop()
        try:
            await self._group.__aexit__(None, None, None)
        finally:
            self._group = None
            self._compute.close()

    # ---------------------------------------------------------------- requests
    def submit(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        ignore_eos: bool = False,
        priority: str = "be",
        rank: int = 0,
        ttft_deadline: float | None = None,
        request_id: str | None = None,
        chat: bool = False,
        client: str = "",
    ) -> RequestHandle:
        """Accept a request; returns at once. Raises InvalidRequest or EngineClosed.

        ``client`` names who sent it (the server passes its connection): policies share a class's
        compute fairly between clients."""
        if not self._accepting:
            raise EngineClosed("the engine is not accepting requests")
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop=(stop,) if isinstance(stop, str) else tuple(stop),
                ignore_eos=ignore_eos,
            )
            priority_class = PriorityClass(priority)
            prompt_ids = encode(self.model, prompt, chat=chat)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not isinstance(rank, int):
            raise InvalidRequest(f"rank must be an integer, got {rank!r}")
        if ttft_deadline is not None and not ttft_deadline > 0:
            raise InvalidRequest(f"ttft_deadline must be > 0 seconds, got {ttft_deadline!r}")
        request_id = request_id or f"req-{next(_ids)}"
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already live")
        loop = asyncio.get_running_loop()
        request = Request(
            id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            priority_class=priority_class,
            priority=rank,
            ttft_deadline=ttft_deadline,
            client=client,
            events=asyncio.Queue(),
            done=loop.create_future(),
        )
        self._requests[request_id] = request
        self._dispatcher.post(request)
        return RequestHandle(self, request)

    async def generate(self, prompt: str | Sequence[int], **kw: Any) -> RequestResult:
        """Submit and wait for the final result."""
        handle = self.submit(prompt, **kw)
        try:
            return await handle.result()
        except asyncio.CancelledError:
            handle.cancel()
            raise

    async def stream(self, prompt: str | Sequence[int], **kw: Any) -> AsyncIterator[StreamChunk]:
        """Submit and yield chunks as tokens come; leaving the loop early cancels the request."""
        handle = self.submit(prompt, **kw)
        finished = False
        try:
            async for chunk in handle:
                yield chunk
            finished = True
        finally:
            if not finished:
                handle.cancel()

    def cancel(self, request_id: str) -> bool:
        """Cancel a live request; False if no such request is live."""
        request = self._requests.get(request_id)
        if request is None or request.done.done():
            return False
        self._dispatcher.post(Cancel(request_id, "cancelled"))
        return True

    def _finished(self, result: RequestResult) -> None:
        self._requests.pop(result.id, None)
        self.metrics.observe(result)
        log.info(
            "request_finished",
            request_id=result.id,
            priority=result.priority,
            status=result.status,
            ttft_s=None if result.ttft is None else round(result.ttft, 6),
            tokens=len(result.token_ids),
            prompt_tokens=result.prompt_tokens,
            preemptions=result.preemptions,
            turnaround_s=round(result.turnaround, 6),
            error=result.error,
        )

    # ---------------------------------------------------------------- introspection
    @property
    def progress(self) -> int:
        """Increases with every batched op completed."""
        return self._dispatcher.progress

    @property
    def busy(self) -> bool:
        return self._dispatcher.busy or bool(self._requests)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stats(self) -> dict[str, Any]:
        by_class: dict[str, dict[str, int]] = {c.value: {} for c in PriorityClass}
        for request in self._requests.values():
            counts = by_class[request.priority_class.value]
            counts[request.status.label] = counts.get(request.status.label, 0) + 1
        return {
            "model": self.model.family,
            "policy": self.policy.name,
            "accepting": self._accepting,
            "live": by_class,
            "queues": self._dispatcher.queues(),
            "kernel": self._dispatcher.snapshot() | {"batch_invariance": self.model.invariance_summary()},
            "memory": self._tensors.stats(),
            "metrics": self.metrics.snapshot(),
        }

    def reset_stats(self) -> None:
        """Count the kernel's ops, decisions and op times from now on (a benchmark measures one
        phase); ``progress``, the cost model and the per-request metrics go on."""
        self._dispatcher.stats.reset()

    def kv_bytes(self) -> int:
        """KV memory held now: the requests' caches, and with KV blocks the pool's spare ones."""
        return self._tensors.held_bytes
