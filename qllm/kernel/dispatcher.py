"""The dispatcher actor: its mailbox, its run loop, and the step: schedule, run, postprocess.

Its mailbox receives arrivals, cancellations and the stop. Each step:

1. **schedule** (:class:`~qllm.kernel.scheduler.Scheduler`): admit waiting requests the policy
   lets start, ask the policy for a :class:`~qllm.kernel.scheduler.Batch` of requests at one op,
   and let the :class:`~qllm.kernel.runner.Runner` form their pass;
2. **run** (:class:`~qllm.kernel.runner.Runner`): the pass's next op on the compute thread, which
   returns a :class:`~qllm.kernel.runner.StepResult`;
3. **postprocess**: record the step's stats and op costs, and hand the requests their pass let
   go to the :class:`~qllm.kernel.output.OutputProcessor`, which resumes their programs (tokens,
   text, stream chunks) until they ask for their next pass or end with a result.

**Decisions cost microseconds.** When the policy declares its choice steady (:meth:`Policy.steady`)
and the pass holds every live request, the pass advances without asking again until something
changes: an arrival, a cancellation, a request leaving its pass. In ``thread`` compute mode the
worker then runs the pass's ops back to back, with no hand-off between them.

**A request that arrives waits at most one expert.** :meth:`post` raises the runner's interrupt,
which the worker polls between ops and between the experts of a grouped MoE op, which then stops
early (the rest of that layer is one grouped op again, run when the policy chooses it, so the
policy can run the newcomer first). Cancellations always raise it; an arrival raises it when the
policy says it should (:meth:`Policy.interrupts`): a best-effort newcomer that would not run
before the pass in flight ends leaves it running whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qllm.kernel.costs import OpCosts
from qllm.kernel.messages import Cancel, Stop
from qllm.kernel.output import OutputProcessor
from qllm.kernel.request import Request, RequestResult, RequestStatus
from qllm.kernel.runner import Resume, Runner, StepResult
from qllm.kernel.scheduler import Scheduler
from qllm.kernel.stats import TRACERS, KernelStats
from qllm.kernel.tenants import TenantLedger
from qllm.logging import Throttled, get_logger

if TYPE_CHECKING:
    from qllm.kernel.compute import Compute
    from qllm.kernel.output import Outcome
    from qllm.kernel.runtime.ops import MoEGranularity
    from qllm.kernel.runtime.passes import Pass
    from qllm.kernel.tensors import TensorManager
    from qllm.models.base import MoEModel
    from qllm.policies.api import Policy

log = get_logger()


class Dispatcher:
    """Owns every live request; the only place that advances request programs and passes."""

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
        moe_granularity: MoEGranularity = "layer",  # EngineConfig checks it before the model loads
        on_finish: Callable[[RequestResult], None] | None = None,
        tenants: TenantLedger | None = None,
    ):
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.moe_granularity = moe_granularity
        self.on_finish = on_finish
        self.stats = KernelStats()
        self.costs = OpCosts()  # the cost model policies read through KernelView.costs
        self.tenants = tenants or TenantLedger()  # op time charged to tenants (KernelView.tenants)
        self.scheduler = Scheduler(
            model,
            policy,
            fallback,
            tensors,
            stats=self.stats,
            costs=self.costs,
            max_batch=max_batch,
            tenants=self.tenants,
        )
        self.runner = Runner(model, compute, moe_granularity=moe_granularity)
        self.output = OutputProcessor(model, prefill_chunk=prefill_chunk)
        self.mailbox: asyncio.Queue[Request | Cancel | Stop] = asyncio.Queue()
        self.failures = Throttled(log)  # a client can make requests fail at will: bound the log
        # The pass that advances without a decision; anything that changes the live requests or
        # their passes drops it, so that the next step decides again.
        self._steady_pass: Pass | None = None

    # ---------------------------------------------------------------- mailbox
    def post(self, message: Request | Cancel | Stop) -> None:
        self.mailbox.put_nowait(message)
        runner = self.runner
        if not runner.interrupt_requested:
            runner.interrupt_requested = not isinstance(message, Request) or self.scheduler.interrupts(
                message
            )

    def stop(self) -> None:
        self.post(Stop())

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.live)

    async def run(self) -> None:
        stopping = False
        try:
            while True:
                if not self.busy or stopping:
                    if stopping and not self.busy:
                        return
                    self.runner.idle()
                    if self.mailbox.empty():
                        self.runner.compute.idle()
                    stopping |= self._handle(await self.mailbox.get())
                self.runner.interrupt_requested = False
                while not self.mailbox.empty():
                    stopping |= self._handle(self.mailbox.get_nowait())
                await self._step()
        finally:
            for request in [*self.scheduler.waiting, *self.scheduler.live.values()]:
                self._finish(request, RequestStatus.FINISHED_ABORTED, "engine stopped")

    def _handle(self, message: Request | Cancel | Stop) -> bool:
        """Take one message; True for the stop."""
        self._steady_pass = None
        if isinstance(message, Stop):
            return True
        if isinstance(message, Cancel):
            request = self.scheduler.find(message.request_id)
            if request is not None:
                # The mailbox is read between steps only, so a cancelled request has no op computing.
                self._finish(request, RequestStatus.FINISHED_ABORTED, message.reason)
        else:
            self.scheduler.arrive(message)
        return False

    # ---------------------------------------------------------------- the step
    async def _step(self) -> None:
        group = self._steady_pass
        if group is None or group.done:
            self._steady_pass = None
            group = self._schedule()
            if group is None:
                await asyncio.sleep(0)  # let the loop run (arrivals, cancellations) before retrying
                return
        steady = self._steady_pass is group
        max_ops = 1 if not steady or self.runner.compute.mode == "loop" else 1 << 30
        result = await self.runner.run(group, max_ops)
        self._postprocess(group, result)

    def _schedule(self) -> Pass | None:
        """Admit, decide, and form the chosen requests' pass (None: nothing to run)."""
        for request in self.scheduler.admissions():
            self._apply(request, self.output.start(request))
        batch = self.scheduler.schedule()
        if batch is None:
            return None
        try:
            group, leaving = self.runner.form(batch.requests)
        except Exception as exc:  # starting a pass embeds its tokens: a failure fails its requests
            for request in batch.requests:
                self._fail(request, exc)
            return None
        self._resume(leaving)
        leaving = self.runner.settle(group)
        if leaving is not None:  # nothing left to compute for these requests in this pass
            self._resume(leaving)
            return None
        if batch.steady:
            self._steady_pass = group
        return group

    def _postprocess(self, group: Pass, result: StepResult) -> None:
        members = group.owners
        for timing in result.timings:
            if timing.whole:  # only whole MoE ops tell a MoE op's cost
                self.costs.record(timing.kind, timing.rows, timing.seconds)
        # Each tenant pays for its rows of the pass (prefill chunks and decode rows alike).
        self.tenants.charge(
            ((s.owner.account, s.rows) for s in group.segments if s.owner.account is not None),
            sum(t.seconds for t in result.timings),
        )
        self.stats.record_step(result, len(members))
        for tracer in TRACERS:
            tracer.stepped(self, members, result)
        if result.error is not None:
            self._steady_pass = None
            message = f"{type(result.error).__name__}: {result.error}"
            self.failures.error(
                "batch_failed",
                message[:200],
                op=repr(group.pending),
                requests=[r.id for r in members],
                error=message[:1000],
                exc_info=result.error,
            )
            for request in self.runner.disband(group):
                self._finish(request, RequestStatus.FINISHED_ERROR, message)
        else:
            leaving = self.runner.settle(group)
            if leaving is not None:
                self._steady_pass = None
                self._resume(leaving)
        if self._steady_pass is not group:
            self.scheduler.after_step()

    # ---------------------------------------------------------------- requests' ends
    def _resume(self, leaving: list[Resume]) -> None:
        """Requests out of their pass resume their programs, in the pass's order."""
        self._steady_pass = None
        for resume in leaving:
            request = resume.request
            request.join(None)
            if request.finish_time is None:
                self.scheduler.passed(request)
                before = len(request.token_ids)
                self._apply(request, self.output.advance(request, resume.logits))
                if request.account is not None:
                    request.account.tokens += len(request.token_ids) - before

    def _apply(self, request: Request, outcome: Outcome | None) -> None:
        if outcome is None:
            return
        if outcome.error is not None:
            self._fail(request, outcome.error)
        else:
            self._finish(request, outcome.status)

    def _fail(self, request: Request, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        # One line per distinct error every few seconds, with a traceback (never local
        # variables: they would hold the prompt), and never the request's content.
        self.failures.error(
            "request_failed", error[:200], request_id=request.id, error=error[:1000], exc_info=exc
        )
        self._finish(request, RequestStatus.FINISHED_ERROR, error)

    def _finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        if request.finish_time is not None:
            return
        self._steady_pass = None
        self._resume(self.runner.leave(request))
        self.output.close(request, status, error)
        self.scheduler.remove(request)
        if request.account is not None:
            self.tenants.leave(request.account)
        result = self.output.result(request)
        self.output.deliver(request, result)
        for tracer in TRACERS:
            tracer.finished(self, result)
        if self.on_finish is not None:
            self.on_finish(result)

    # ---------------------------------------------------------------- introspection
    @property
    def progress(self) -> int:
        """Increases with every batched op completed."""
        return self.stats.progress

    def queues(self) -> dict[str, int]:
        """Requests waiting, admitted, and in the pass computing now."""
        return {
            "waiting": len(self.scheduler.waiting),
            "admitted": len(self.scheduler.live),
            "in_flight": len(self.runner.in_flight),
        }

    def snapshot(self) -> dict[str, Any]:
        """The kernel's settings, counters, op times and cost model (JSON-able)."""
        counters = self.stats.snapshot()
        return {
            "batches": counters["batches"],
            "ops": counters["ops"],
            "rows": counters["rows"],
            "policy_errors": counters["policy_errors"],
            "compute": self.runner.compute.mode,
            "moe_granularity": self.moe_granularity,
            "decisions": counters["decisions"],
            "overhead": counters["overhead"],
            "max_batch": self.max_batch,
            "prefill_chunk": self.prefill_chunk,
            "op_times": counters["op_times"],
            "op_costs": self.costs.snapshot(),
        }
