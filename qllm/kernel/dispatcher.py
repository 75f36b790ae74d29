"""The dispatcher actor: collects pending ops, asks the policy, runs one batch at a time.

Its mailbox receives arrivals and cancellations. Between two batches it drains the mailbox, so a
request that arrives while an op computes is considered at the very next decision: an LS request
waits at most one op. Requests are generators (see :mod:`qllm.generation`): the dispatcher resumes
each with its op's result until it yields its next op, a token, or finishes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog

from qllm.generation import decode, finish_text, generation_steps, stop_index
from qllm.kernel.compute import Compute
from qllm.kernel.costs import OpCosts
from qllm.kernel.request import Request, RequestResult, RequestStatus
from qllm.kernel.tensors import TensorManager
from qllm.kernel.view import CostView, KernelView, MemoryView, RequestView
from qllm.logging import Throttled
from qllm.models.base import MoEModel
from qllm.ops import OpKind, Token
from qllm.policies import Policy

log = structlog.get_logger()


@dataclass(frozen=True)
class StreamChunk:
    """One generated token: its id, the text it added, and its index in the output."""

    token_id: int
    text: str
    index: int


@dataclass(frozen=True)
class _Cancel:
    request_id: str
    reason: str


_STOP = object()


class OpTimes:
    """Wall time of batched ops by kind (count, total, max), hand-off to the compute thread included."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.total: dict[str, float] = {}
        self.max: dict[str, float] = {}

    def record(self, kind: OpKind, seconds: float) -> None:
        name = kind.name.lower()
        self.count[name] = self.count.get(name, 0) + 1
        self.total[name] = self.total.get(name, 0.0) + seconds
        self.max[name] = max(self.max.get(name, 0.0), seconds)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            name: {"count": n, "mean_s": self.total[name] / n, "max_s": self.max[name]}
            for name, n in self.count.items()
        }


class Dispatcher:
    """Owns every live request; the only place that advances request generators."""

    def __init__(
        self,
        model: MoEModel,
        policy: Policy,
        fallback: Policy,
        tensors: TensorManager,
        compute: Compute,
        *,
        max_batch: int,
        prefill_chunk: int,
        on_finish: Any = None,
    ):
        self.model = model
        self.policy = policy
        self.fallback = fallback
        self.tensors = tensors
        self.compute = compute
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.on_finish = on_finish
        self.mailbox: asyncio.Queue = asyncio.Queue()
        self.waiting: list[Request] = []
        self.live: dict[str, Request] = {}
        self.views: dict[str, RequestView] = {}
        self.in_flight: set[str] = set()
        self.progress = 0
        self.batches = 0
        self.ops = 0
        self.rows = 0
        self.policy_errors = 0
        self.op_times = OpTimes()
        self.failures = Throttled(log)  # a client can make requests fail at will: bound the log
        self.costs = OpCosts()  # the cost model policies read through KernelView.costs
        self._cost_view = CostView(self.costs)

    # ---------------------------------------------------------------- mailbox
    def post(self, message: Any) -> None:
        self.mailbox.put_nowait(message)

    def stop(self) -> None:
        self.post(_STOP)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.live)

    async def run(self) -> None:
        stopping = False
        try:
            while True:
                if not self.busy or stopping:
                    if stopping and not self.busy:
                        return
                    message = await self.mailbox.get()
                    stopping |= self._handle(message)
                while not self.mailbox.empty():
                    stopping |= self._handle(self.mailbox.get_nowait())
                await self._step()
        finally:
            for request in [*self.waiting, *self.live.values()]:
                self._finish(request, RequestStatus.FINISHED_ABORTED, "engine stopped")

    def _handle(self, message: Any) -> bool:
        if message is _STOP:
            return True
        if isinstance(message, _Cancel):
            self._cancel(message.request_id, message.reason)
        else:
            self._arrive(message)
        return False

    # ---------------------------------------------------------------- lifecycle
    def _arrive(self, request: Request) -> None:
        self.views[request.id] = RequestView(request)
        self.waiting.append(request)
        self._call_policy("on_arrival", self.views[request.id], self._view())

    def _admit(self, request: Request) -> None:
        request.cache = self.model.new_cache()
        request.steps = generation_steps(
            self.model, request.prompt_ids, request.params, request.cache, prefill_chunk=self.prefill_chunk
        )
        self.tensors.register(request.id, request.cache)
        self.live[request.id] = request
        self._advance(request, None)

    def _cancel(self, request_id: str, reason: str) -> None:
        request = self.live.get(request_id) or next((r for r in self.waiting if r.id == request_id), None)
        if request is None:
            return
        # The mailbox is read between batches only, so a cancelled request never has an op computing.
        self._finish(request, RequestStatus.FINISHED_ABORTED, reason)

    def _finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        if request.finish_time is not None:
            return
        request.status = status
        request.error = (
            error if status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR) else None
        )
        request.finish_time = time.monotonic()
        if request.steps is not None:
            request.steps.close()
        request.pending = None
        self.live.pop(request.id, None)
        if request in self.waiting:
            self.waiting.remove(request)
        self.tensors.release(request.id)
        request.cache = None
        view = self.views.pop(request.id, None)
        if view is not None:
            self._call_policy("on_finish", view, self._view())
        result = self._result(request)
        request.events.put_nowait(None)
        if not request.done.done():
            request.done.set_result(result)
        if self.on_finish is not None:
            self.on_finish(result)

    def _result(self, request: Request) -> RequestResult:
        return RequestResult(
            id=request.id,
            token_ids=list(request.token_ids),
            text=finish_text(self.model, request.token_ids, request.params.stop),
            status=request.status.label,
            priority=str(request.priority_class),
            prompt_tokens=len(request.prompt_ids),
            arrival=request.arrival,
            first_scheduled=request.first_scheduled,
            first_token=request.first_token,
            finished=request.finish_time,
            token_times=list(request.token_times),
            preemptions=request.preemptions,
            error=request.error,
        )

    # ---------------------------------------------------------------- stepping
    def _advance(self, request: Request, result: Any) -> None:
        """Resume the request's generator until it yields its next op or finishes."""
        steps = request.steps
        try:
            while True:
                item = steps.send(result)
                if isinstance(item, Token):
                    self._emit(request, item.token_id)
                    result = None
                    continue
                request.pending = item
                # Every forward pass (a decode step or a prefill chunk) starts with layer 0's attention.
                request.at_boundary = item.kind is OpKind.ATTENTION and item.layer == 0
                return
        except StopIteration as stop:
            status = (
                RequestStatus.FINISHED_LENGTH if stop.value == "length" else RequestStatus.FINISHED_STOPPED
            )
            self._finish(request, status)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            # One line per distinct error every few seconds, with a traceback (never local
            # variables: they would hold the prompt), and never the request's content.
            self.failures.error(
                "request_failed", error[:200], request_id=request.id, error=error[:1000], exc_info=True
            )
            self._finish(request, RequestStatus.FINISHED_ERROR, error)

    def _emit(self, request: Request, token_id: int) -> None:
        now = time.monotonic()
        if request.first_token is None:
            request.first_token = now
        request.token_times.append(now)
        request.token_ids.append(token_id)
        text = decode(self.model, request.token_ids)
        stops = request.params.stop
        cut = stop_index(text, stops) if stops else None
        if cut is not None:
            text = text[:cut]
        elif text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            text = text[: len(request.streamed_text)]
        delta = text[len(request.streamed_text) :] if text.startswith(request.streamed_text) else ""
        request.streamed_text += delta
        request.events.put_nowait(StreamChunk(token_id, delta, len(request.token_ids) - 1))

    def _view(self) -> KernelView:
        ready = [self.views[r.id] for r in self.live.values() if r.pending is not None]
        return KernelView(
            now=time.monotonic(),
            ready=ready,
            waiting=[self.views[r.id] for r in self.waiting],
            live=[self.views[rid] for rid in self.live],
            max_batch=self.max_batch,
            memory=MemoryView(
                self.tensors.budget_bytes, self.tensors.resident_bytes, self.tensors.offloaded_bytes
            ),
            costs=self._cost_view,
        )

    def _call_policy(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.policy, method)(*args)
        except Exception:
            self.policy_errors += 1
            log.exception("policy_error", policy=self.policy.name, method=method)
            return getattr(self.fallback, method)(*args)

    def _admit_waiting(self) -> None:
        """Offer waiting requests to the policy by its precedence, then clients in turn, then
        arrival; stop at the first refusal (so an LS request never queues behind BE requests that
        cannot start yet, nor one client's request behind another client's backlog)."""
        if not self.waiting:
            return
        for request in self._admission_order():
            if not self._call_policy("admit", self.views[request.id], self._view()) and self.live:
                return
            self.waiting.remove(request)
            self._admit(request)

    def _admission_order(self) -> list[Request]:
        ordered = sorted(self.waiting, key=lambda r: (self._precedence(r), r.arrival, r.seq))
        # A client's turn: how many of its requests are live or ahead of this one.
        held = Counter(r.client for r in self.live.values())
        turns = {}
        for r in ordered:
            turns[r.id] = held[r.client]
            held[r.client] += 1
        return sorted(ordered, key=lambda r: (self._precedence(r), turns[r.id]))

    def _select(self) -> list[Request]:
        view = self._view()
        if not view.ready:
            return []
        chosen = self._call_policy("select", view)
        try:
            chosen = list(chosen)
        except Exception:  # not a collection of views at all (or a lazy one that raised)
            chosen = [chosen]
        batch = self._validate(chosen, view)
        if batch is None:
            self.policy_errors += 1
            log.error(
                "policy_bad_batch", policy=self.policy.name, batch=[getattr(r, "id", r) for r in chosen]
            )
            batch = self._validate(self.fallback.select(view), view) or []
        return batch

    def _validate(self, chosen: Any, view: KernelView) -> list[Request] | None:
        if not chosen:
            return None
        ids = [getattr(r, "id", None) for r in chosen]
        requests = [self.live.get(rid) if isinstance(rid, str) else None for rid in ids]
        if any(r is None or r.pending is None for r in requests) or len(set(ids)) != len(ids):
            return None
        if len({r.pending.key for r in requests}) != 1 or len(requests) > self.max_batch:
            return None
        return requests

    async def _step(self) -> None:
        self._admit_waiting()
        batch = self._select()
        if not batch:
            return
        now = time.monotonic()
        self._account_preemption(batch, now)
        ids = [r.id for r in batch]
        self.tensors.before_run(ids)
        ops = [r.pending for r in batch]
        self.in_flight = set(ids)
        started = time.perf_counter()
        try:
            results = await self.compute(self.model.run, ops)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            results = None
            error = f"{type(exc).__name__}: {exc}"
            self.failures.error(
                "batch_failed", error[:200], op=repr(ops[0]), requests=ids, error=error[:1000], exc_info=True
            )
        finally:
            self.in_flight = set()
        seconds = time.perf_counter() - started
        rows = sum(op.rows for op in ops)
        self.op_times.record(ops[0].kind, seconds)
        if results is not None:
            self.costs.record(ops[0].kind, rows, seconds)
        self.batches += 1
        self.ops += len(ops)
        self.rows += rows
        self.progress += 1
        for i, request in enumerate(batch):
            request.ops_done += 1
            if results is None:
                self._finish(request, RequestStatus.FINISHED_ERROR, error)
            else:
                self._advance(request, results[i])
        self.tensors.enforce({r.id for r in self.live.values() if r.status is RequestStatus.RUNNING})
        if self.tensors.has_offloaded:  # bring back what the policy will likely run next
            view = self._view()
            upcoming = self._call_policy("order", view.ready, view)[: self.max_batch]
            self.tensors.prefetch([r.id for r in upcoming])

    def _precedence(self, request: Request) -> tuple:
        view = self.views[request.id]
        try:
            return tuple(self.policy.precedence(view))
        except Exception:
            self.policy_errors += 1
            log.exception("policy_error", policy=self.policy.name, method="precedence")
            return tuple(self.fallback.precedence(view))

    def _account_preemption(self, batch: list[Request], now: float) -> None:
        """Batch members run; running requests outranked by the batch are suspended (preempted)."""
        precedence = self._precedence
        lead = min(precedence(r) for r in batch)
        members = set(map(id, batch))
        for request in self.live.values():
            if id(request) in members:
                if request.first_scheduled is None:
                    request.first_scheduled = now
                request.status = RequestStatus.RUNNING
            elif request.status is RequestStatus.RUNNING and precedence(request) > lead:
                request.status = RequestStatus.SUSPENDED
                request.preemptions += 1
