"""``qllm.Engine``: the in-process API over the microkernel (see docs/engine.md)."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from qllm.errors import EngineClosed, InvalidRequest
from qllm.kernel.compute import Compute
from qllm.kernel.config import EngineConfig, engine_config
from qllm.kernel.dispatcher import Dispatcher
from qllm.kernel.messages import Cancel
from qllm.kernel.output import StreamChunk
from qllm.kernel.request import PriorityClass, Request, RequestResult
from qllm.kernel.slo import class_slo, decode_step_s
from qllm.kernel.stats import Metrics
from qllm.kernel.tenants import TenantLedger
from qllm.kernel.tensors import TensorManager
from qllm.logging import get_logger
from qllm.models import load_model
from qllm.models.base import MoEModel
from qllm.parallel.group import ExpertGroup, start_experts
from qllm.policies import DEFAULT_POLICY, Policy, load_policy
from qllm.policies.fallback import Fallback
from qllm.spec import RequestSpec, build_spec, checked
from qllm.text import encode

log = get_logger()
_ids = itertools.count(1)


class RequestHandle:
    """A submitted request: iterate it for :class:`StreamChunk` s, await :meth:`result` for the end."""

    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self._request = request

    @property
    def id(self) -> str:
        return self._request.id

    @property
    def spec(self) -> RequestSpec:
        """What the request asks for, as the kernel holds it."""
        return self._request.spec

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
        model: str | os.PathLike[str] | MoEModel | tuple[Any, Any] | None = None,
        policy: str | type[Policy] | Policy | None = None,
        config: EngineConfig | None = None,
        **settings: Any,
    ):
        """``model``: a preset name, a model directory, a loaded model or a ``(model, tokenizer)``
        pair; ``policy``: a policy name, class or instance (each None: the config's). ``config``
        and ``settings`` (its fields as keywords, which win) are checked by
        :class:`~qllm.kernel.config.EngineConfig`: ValueError naming the setting."""
        # A name is a setting, checked with the rest; a loaded model or a Policy is taken as it is.
        named = {
            key: value for key, value in {"model": model, "policy": policy}.items() if isinstance(value, str)
        }
        config = engine_config(config, {**settings, **named})
        if config.threads is not None:
            torch.set_num_threads(config.threads)  # process-wide: torch's intra-op thread pool
        self.policy = load_policy(config.policy if policy is None or isinstance(policy, str) else policy)
        model = config.model if model is None or isinstance(model, str) else model
        device = config.device
        if isinstance(model, MoEModel) and device is not None and torch.device(device) != model.device:
            raise ValueError(
                f"the model is loaded on {model.device}, not on {device}; load it there or omit device"
            )
        self.model: MoEModel = load_model(
            model, dtype=config.dtype, device=device or "cpu", batch_invariant=config.batch_invariant
        )
        self.experts: ExpertGroup | None = None  # expert parallel's other ranks (docs/scaling.md)
        if config.expert_parallel > 1:
            self.experts = start_experts(self.model, model, config)
        # The model as the user named it (a preset or a directory; a loaded model: its family), the
        # same name a server reports in its welcome and stats.
        self.model_name = str(model) if isinstance(model, str | os.PathLike) else self.model.family
        self.metrics = Metrics()
        self._slo = config.slo
        self._compute = Compute(config.compute)
        self._tensors = TensorManager(
            self.model.device,
            config.memory_budget,
            block_size=config.kv_block_size,
            dtype=self.model.dtype,
            prefix_chunk=config.prefill_chunk
            if config.prefix_cache and self.model.prefix_cacheable
            else None,
        )
        self._dispatcher = Dispatcher(
            self.model,
            self.policy,
            Fallback(load_policy(DEFAULT_POLICY)),
            self._tensors,
            self._compute,
            max_batch=config.max_batch,
            prefill_chunk=config.prefill_chunk,
            moe_granularity=config.moe_granularity,
            on_finish=self._finished,
            tenants=TenantLedger(config.fairness, config.tenants),
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
        log.info(
            "engine_started",
            model=self.model_name,
            family=self.model.family,
            policy=self.policy.name,
            pid=os.getpid(),
        )

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
            if self.experts is not None:
                await asyncio.to_thread(self.experts.close)

    # ---------------------------------------------------------------- requests
    def submit(
        self,
        prompt: str | Sequence[int],
        spec: RequestSpec | None = None,
        *,
        request_id: str | None = None,
        chat: bool = False,
        **fields: Any,
    ) -> RequestHandle:
        """Accept a request; returns at once. Raises InvalidRequest, EngineClosed, or
        TenantOverQuota (its tenant is at a quota and the engine's ``quota_action`` is ``reject``).

        What it asks for is ``spec``, or built from ``fields``, the spec's fields as keywords
        (``max_tokens=16, priority="ls"``; see :mod:`qllm.spec`). Its ``tenant`` is who it is
        served for (tenants share the engine by weight, docs/tenants.md); its ``client`` names who
        sent it (the server passes its connection): policies share a class's compute fairly
        between clients."""
        if not self._accepting:
            raise EngineClosed("the engine is not accepting requests")
        if spec is not None and fields:
            raise TypeError("pass a spec or its fields as keywords, not both")
        spec = build_spec(fields) if spec is None else checked(spec)
        try:
            prompt_ids = encode(self.model, prompt, chat=chat)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        request_id = request_id or f"req-{next(_ids)}"
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already live")
        loop = asyncio.get_running_loop()
        request = Request(
            id=request_id,
            prompt_ids=prompt_ids,
            spec=spec,
            slo=self._slo_of(spec),
            events=asyncio.Queue(),
            done=loop.create_future(),
        )
        dispatcher = self._dispatcher
        kv_bytes = dispatcher.scheduler.kv_bytes(request.tenant) if dispatcher.tenants.quotas else 0
        dispatcher.tenants.enter(request, kv_bytes)
        self._requests[request_id] = request
        dispatcher.post(request)
        return RequestHandle(self, request)

    def _slo_of(self, spec: RequestSpec) -> tuple[float | None, float | None]:
        """The ``(ttft, tpot)`` SLOs a request is served under: its own, else its class's
        (:mod:`qllm.kernel.slo`)."""
        cls = str(spec.priority)
        step = decode_step_s(self._dispatcher.costs, self.model.num_layers)
        ttft, tpot = class_slo(cls, self._slo.get(cls), step)  # type: ignore[call-overload]
        return (
            spec.ttft_deadline if spec.ttft_deadline is not None else ttft,
            spec.tpot_slo if spec.tpot_slo is not None else tpot,
        )

    async def generate(
        self, prompt: str | Sequence[int], spec: RequestSpec | None = None, **kw: Any
    ) -> RequestResult:
        """Submit and wait for the final result."""
        handle = self.submit(prompt, spec, **kw)
        try:
            return await handle.result()
        except asyncio.CancelledError:
            handle.cancel()
            raise

    async def stream(
        self, prompt: str | Sequence[int], spec: RequestSpec | None = None, **kw: Any
    ) -> AsyncIterator[StreamChunk]:
        """Submit and yield chunks as tokens come; leaving the loop early cancels the request."""
        handle = self.submit(prompt, spec, **kw)
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
            tenant=result.tenant,
            status=result.status,
            ttft_s=None if result.ttft is None else round(result.ttft, 6),
            tokens=len(result.token_ids),
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
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
    def healthy(self) -> bool:
        """False once expert parallel has failed (a rank died, hung or erred): requests cannot be
        computed any more."""
        return self.experts is None or self.experts.healthy

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stats(self) -> dict[str, Any]:
        """A snapshot: ``model`` (the preset or directory as given), ``family`` (its architecture),
        the policy, live requests, queues, kernel, memory and request metrics."""
        by_class: dict[str, dict[str, int]] = {c.value: {} for c in PriorityClass}
        for request in self._requests.values():
            counts = by_class[request.priority_class.value]
            counts[request.status.label] = counts.get(request.status.label, 0) + 1
        return {
            "model": self.model_name,
            "family": self.model.family,
            "policy": self.policy.name,
            "accepting": self._accepting,
            "live": by_class,
            "queues": self._dispatcher.queues(),
            "kernel": self._dispatcher.snapshot() | {"batch_invariance": self.model.invariance_summary()},
            "memory": self._tensors.stats(),
            "prefix": self._tensors.prefix_stats(),
            "metrics": self.metrics.snapshot(),
            "tenants": self._dispatcher.tenants.snapshot(),
            "fairness": self._dispatcher.tenants.summary(),
            "expert_parallel": self.experts.stats() if self.experts is not None else {"ranks": 1},
        }

    def reset_stats(self) -> None:
        """Count the kernel's ops, decisions and op times from now on (a benchmark measures one
        phase); ``progress``, the cost model and the per-request metrics go on."""
        self._dispatcher.stats.reset()

    def kv_bytes(self) -> int:
        """KV memory held now: the requests' caches, and with KV blocks the pool's spare ones."""
        return self._tensors.held_bytes

    def pin_prefix(self, prompt: str | list[int], *, chat: bool = False) -> int:
        """Keep the cached keys and values of ``prompt``'s prefix (a system prompt), cached now or
        once a request computes them, from ever being evicted; returns the tokens pinned: the
        prompt's whole spans (docs/engine.md, "Prefix caching"; 0 without prefix caching).
        ``chat`` as for :meth:`submit`."""
        prefix = self._tensors.prefix
        return 0 if prefix is None else prefix.pin(encode(self.model, prompt, chat=chat))
