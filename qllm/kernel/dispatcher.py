"""The dispatcher actor: asks the policy which requests run next, and runs them as one pass.

Its mailbox receives arrivals and cancellations. Each request is a generator of forward passes and
tokens (:func:`qllm.kernel.program.generation_passes`); the compute of a forward pass runs in a
:class:`~qllm.kernel.runtime.passes.Pass` that holds the rows of every request the policy batched together,
stepped one op at a time. At each decision the policy picks requests at one op; the dispatcher
merges the passes they are in (splitting a pass when the policy took only part of it, starting a
new pass for requests between passes) and runs its next op.

**Decisions cost microseconds.** When the policy declares its choice steady (:meth:`Policy.steady`)
and the pass holds every live request, the pass advances without asking again until something
changes: an arrival, a cancellation, a finished pass. In ``thread`` compute mode the worker then
runs the pass's ops back to back, with no hand-off between them.

**A request that arrives waits at most one expert.** :meth:`post` raises a flag that the worker
polls between ops and between the experts of a grouped MoE op, which then stops early (the rest
of that layer is one grouped op again, run when the policy chooses it, so the policy can run the
newcomer first). Cancellations always raise it; an arrival raises it when the policy says it
should (:meth:`Policy.interrupts`): a best-effort newcomer that would not run before the pass in
flight ends leaves it running whole.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from qllm.kernel.compute import Compute
from qllm.kernel.costs import OpCosts
from qllm.kernel.program import generation_passes
from qllm.kernel.request import Request, RequestResult, RequestStatus
from qllm.kernel.runtime.ops import Op, OpKind, Token
from qllm.kernel.runtime.passes import Partial, Pass
from qllm.kernel.tensors import TensorManager
from qllm.kernel.view import CostView, KernelView, MemoryView, RequestView
from qllm.logging import Throttled
from qllm.models.base import MoEModel
from qllm.policies import Policy
from qllm.text import finish_text, stop_index

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
_LAST_RESORT = Policy()
"""Decides when both the policy and the fallback fail: the op furthest behind, every request at it."""
_BOUNDARY = Op(OpKind.ATTENTION, 0, torch.empty(0))
"""What a request between forward passes waits on: the first op of its next pass."""


class Overhead:
    """Wall time outside ops: from the end of one batched op to the start of the next, while the
    kernel stays busy (decisions, resuming generators, hand-off to the compute thread)."""

    def __init__(self, size: int = 4096) -> None:
        self.samples: deque[float] = deque(maxlen=size)  # the most recent gaps
        self.count = 0

    def extend(self, gaps: list[float]) -> None:
        self.samples.extend(gaps)
        self.count += len(gaps)

    def snapshot(self) -> dict[str, float | int | None]:
        ordered = sorted(self.samples)
        n = len(ordered)
        return {
            "count": self.count,
            "median_s": ordered[n // 2] if n else None,
            "p99_s": ordered[min(n - 1, int(0.99 * n))] if n else None,
        }


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
    """Owns every live request; the only place that advances request generators and passes."""

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
        moe_granularity: str = "layer",  # checked by the Engine, before the model loads
        on_finish: Any = None,
    ):
        self.model = model
        self.policy = policy
        self.fallback = fallback
        self.tensors = tensors
        self.compute = compute
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.moe_granularity = moe_granularity
        self.on_finish = on_finish
        self.mailbox: asyncio.Queue = asyncio.Queue()
        self.waiting: list[Request] = []
        self.live: dict[str, Request] = {}
        self.views: dict[str, RequestView] = {}
        self.in_flight: Sequence[Any] = ()
        self.progress = 0
        self.batches = 0
        self.ops = 0
        self.rows = 0
        self.policy_errors = 0
        self.decisions = 0
        self.op_times = OpTimes()
        self.overhead = Overhead()
        self.failures = Throttled(log)  # a client can make requests fail at will: bound the log
        self.costs = OpCosts()  # the cost model policies read through KernelView.costs
        self._cost_view = CostView(self.costs)
        self._steady: Pass | None = None  # the pass that advances without a decision
        self._changed = True  # something happened since the last decision
        self._interrupt = False  # a message arrived: the worker stops at the next op or expert
        self._last_end: float | None = None  # perf_counter() at the end of the last op (None: idle since)

    # ---------------------------------------------------------------- mailbox
    def post(self, message: Any) -> None:
        self.mailbox.put_nowait(message)
        if not self._interrupt:
            # A policy whose hook fails is interrupted by every arrival, as before the hook existed.
            self._interrupt = not isinstance(message, Request) or self._ask(
                "interrupts", True, RequestView(message)
            )

    def stop(self) -> None:
        self.post(_STOP)

    def _interrupted(self) -> bool:
        return self._interrupt

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
                    self._last_end = None  # waiting for work: the gap to the next op is idle time
                    if self.mailbox.empty():
                        self.compute.idle()
                    message = await self.mailbox.get()
                    stopping |= self._handle(message)
                self._interrupt = False
                while not self.mailbox.empty():
                    stopping |= self._handle(self.mailbox.get_nowait())
                await self._step()
        finally:
            for request in [*self.waiting, *self.live.values()]:
                self._finish(request, RequestStatus.FINISHED_ABORTED, "engine stopped")

    def _handle(self, message: Any) -> bool:
        self._changed = True
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
        request.cache = self.model.new_cache(self.tensors.pool)
        request.steps = generation_passes(
            self.model, request.prompt_ids, request.params, prefill_chunk=self.prefill_chunk
        )
        self.tensors.register(request.id, request.cache)
        self.live[request.id] = request
        self._changed = True
        self._advance(request, None)

    def _cancel(self, request_id: str, reason: str) -> None:
        request = self.live.get(request_id) or next((r for r in self.waiting if r.id == request_id), None)
        if request is None:
            return
        # The mailbox is read between batches only, so a cancelled request never has an op computing.
        self._finish(request, RequestStatus.FINISHED_ABORTED, reason)

    def _leave_pass(self, request: Request) -> None:
        """Take ``request``'s rows out of its pass; the others stay together, where they were."""
        group = request.group
        request.join(None)
        if group is None or group.done:
            return
        others = [i for i, s in enumerate(group.segments) if s.owner is not request]
        if self._steady is group:
            self._steady = None
        if others:
            rest, _ = group.split(others)
            for segment in rest.segments:
                segment.owner.join(rest, segment)
            self._settle(rest)

    def _finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        if request.finish_time is not None:
            return
        self._changed = True
        self._leave_pass(request)
        request.status = status
        request.error = (
            error if status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR) else None
        )
        request.finish_time = time.monotonic()
        if request.steps is not None:
            request.steps.close()
        request.pending = None
        request.forward = None
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
        """Resume the request's generator until it asks for its next forward pass or finishes."""
        steps = request.steps
        try:
            while True:
                item = steps.send(result)
                if isinstance(item, Token):
                    self._emit(request, item.token_id, item.text)
                    result = None
                    continue
                request.forward = item
                request.pending = _BOUNDARY
                request.at_boundary = True
                return
        except StopIteration as stop:
            status = (
                RequestStatus.FINISHED_LENGTH if stop.value == "length" else RequestStatus.FINISHED_STOPPED
            )
            self._finish(request, status)
        except Exception as exc:
            self._fail(request, exc)

    def _fail(self, request: Request, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        # One line per distinct error every few seconds, with a traceback (never local
        # variables: they would hold the prompt), and never the request's content.
        self.failures.error(
            "request_failed", error[:200], request_id=request.id, error=error[:1000], exc_info=exc
        )
        self._finish(request, RequestStatus.FINISHED_ERROR, error)

    def _emit(self, request: Request, token_id: int, text: str) -> None:
        """Record ``token_id`` and stream the text it adds (``text``: the whole output so far)."""
        now = time.monotonic()
        if request.first_token is None:
            request.first_token = now
        request.token_times.append(now)
        request.token_ids.append(token_id)
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
        views = self.views
        live = [views[rid] for rid in self.live]
        return KernelView(
            now=time.monotonic(),
            ready=live,  # every admitted request waits on an op: its pass's or its next pass's first
            waiting=[views[r.id] for r in self.waiting],
            live=list(live),
            max_batch=self.max_batch,
            memory=MemoryView.of(self.tensors),
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

    def _select(self, view: KernelView) -> list[Request]:
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
            batch = self._validate(self.fallback.select(view), view) or self._validate(
                _LAST_RESORT.select(view), view
            )
        return batch or []

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

    def _ask(self, method: str, default: bool, *args: Any) -> bool:
        """A yes/no hook of the policy; ``default`` when it raises. Unlike :meth:`_call_policy` the
        fallback is not asked: a broken policy is then asked at every op and sees every arrival."""
        try:
            return bool(getattr(self.policy, method)(*args))
        except Exception:
            self.policy_errors += 1
            log.exception("policy_error", policy=self.policy.name, method=method)
            return default

    async def _step(self) -> None:
        group = None if self._changed else self._steady
        if group is None or group.done:
            self._steady = None
            self._admit_waiting()
            group = self._decide()
            if group is None:
                await asyncio.sleep(0)  # let the loop run (arrivals, cancellations) before retrying
                return
        self._changed = False
        await self._execute(group)

    def _decide(self) -> Pass | None:
        """Ask the policy; the chosen requests become one pass (None: nothing to run)."""
        batch = self._select(self._view())
        if not batch:
            return None
        self.decisions += 1
        self._account_preemption(batch, time.monotonic())
        self.tensors.before_run([r.id for r in batch])
        try:
            group = self._form(batch)
        except Exception as exc:  # starting a pass embeds its tokens: a failure fails its requests
            for request in batch:
                self._fail(request, exc)
            return None
        if self._settle(group):  # nothing left to compute for these requests in this pass
            return None
        if len(group.segments) == len(self.live) and self._ask(
            "steady", False, [self.views[r.id] for r in batch]
        ):
            self._steady = group
        return group

    def _form(self, batch: list[Request]) -> Pass:
        """One pass of the batch's rows: their passes merged (split where only part of one was
        chosen), with a new pass for requests between passes."""
        groups: dict[int, tuple[Pass, list[Request]]] = {}
        fresh: list[Request] = []
        for request in batch:
            if request.group is None:
                fresh.append(request)
            else:
                groups.setdefault(id(request.group), (request.group, []))[1].append(request)
        parts = []
        for group, members in groups.values():
            if len(members) == len(group.segments):
                parts.append(group)
                continue
            chosen = {id(m) for m in members}
            kept, rest = group.split([i for i, s in enumerate(group.segments) if id(s.owner) in chosen])
            for segment in rest.segments:
                segment.owner.join(rest, segment)
            self._settle(rest)
            parts.append(kept)
        if fresh:
            parts.append(
                Pass.start(
                    self.model,
                    [(r.cache, r.forward.token_ids, r.forward.logits, r) for r in fresh],
                    moe_granularity=self.moe_granularity,
                )
            )
        group = Pass.merge(parts)
        for segment in group.segments:
            if segment.owner.group is not group:
                segment.owner.join(group, segment)
        return group

    async def _execute(self, group: Pass) -> None:
        """Run the pass's next op; a steady pass keeps going (in ``thread`` mode, op after op on the
        worker) until it completes or a message arrives."""
        steady = self._steady is group
        max_ops = 1 if not steady or self.compute.mode == "loop" else 1 << 30
        times: list[tuple[Op, float, bool]] = []
        gaps: list[float] = []
        model, stop = self.model, self._interrupted

        def work() -> None:
            op = group.pending
            while True:
                start = time.perf_counter()
                if self._last_end is not None:
                    gaps.append(start - self._last_end)
                (result,) = model.run([op], stop)
                self._last_end = end = time.perf_counter()
                times.append((op, end - start, result.__class__ is Partial))
                op = group.advance(result)
                if op is None or len(times) >= max_ops or self._interrupt or group.through:
                    return

        self.in_flight = group.segments
        # Only what arrives while the op computes stops it: a message posted during the decision
        # (a policy callback that submits) is read at the next decision like any other.
        self._interrupt = False
        error: BaseException | None = None
        try:
            await self.compute(work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            self.in_flight = ()
        members = len(group.segments)
        for op, seconds, partial in times:
            kind, rows = op.kind, op.rows
            self.op_times.record(kind, seconds)
            if not partial and op.partial is None:  # only whole MoE ops tell a MoE op's cost
                self.costs.record(kind, rows, seconds)
            self.rows += rows
        self.overhead.extend(gaps)
        self.batches += len(times)
        self.ops += len(times) * members
        self.progress += len(times)
        if error is not None:
            self._steady = None
            message = f"{type(error).__name__}: {error}"
            self.failures.error(
                "batch_failed",
                message[:200],
                op=repr(group.pending),
                requests=[s.owner.id for s in group.segments],
                error=message[:1000],
                exc_info=error,
            )
            owners = group.owners
            for request in owners:
                request.join(None)
            for request in owners:
                self._finish(request, RequestStatus.FINISHED_ERROR, message)
        elif group.done:
            self._complete(group)
        elif group.through:
            self._release(group)
        if self._steady is not group:
            self._after_decision()

    def _complete(self, group: Pass) -> None:
        """The pass is through: hand each request its logits (it samples, emits, asks for more)."""
        self._changed = True
        if self._steady is group:
            self._steady = None
        for segment, logits in zip(group.segments, group.logits):
            request = segment.owner
            request.join(None)
            if request.finish_time is None:
                self._advance(request, logits)

    def _settle(self, group: Pass) -> bool:
        """A pass that split off with nothing left to compute (a prefill chunk past its last
        expert, or at the head without wanting logits) lets its requests go; True if it did."""
        if group.done:
            self._complete(group)
            return True
        if group.through:
            self._release(group)
            return True
        return False

    def _release(self, group: Pass) -> None:
        """Requests through with a pass before its head (prefill chunks that want no logits) leave
        it: they start their next pass while the others compute the head."""
        self._changed = True
        self._steady = None
        kept, through = group.split([i for i, s in enumerate(group.segments) if s.logits])
        for segment in kept.segments:
            segment.owner.join(kept, segment)
        for segment in through.segments:
            segment.owner.join(None)
            self._advance(segment.owner, None)

    def _after_decision(self) -> None:
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
