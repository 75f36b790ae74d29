"""The runner: forms the pass of a batch and runs its ops on the compute thread.

A batch's requests may be in several passes, or between passes. :meth:`Runner.form` merges their
passes into one (splitting a pass of which the batch took only part, starting a new pass for
requests between passes); :meth:`Runner.run` runs that pass's next op, or op after op for a steady
pass, on the compute thread and returns a :class:`StepResult`. Requests that a pass lets go come
back as :class:`Resume` values, for the output processor to resume their programs.

Two values cross to the compute thread. The op loop reads :attr:`Runner.interrupt_requested`,
which the event loop raises when a message arrives (a :class:`~qllm.kernel.runtime.ops.StopFlag`,
which a grouped MoE op's C kernel reads too), and stops at the next op or expert. The end of the
last op, from which the next gap is measured, is passed in and returned in the result: the worker
writes nothing the event loop reads while it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qllm.kernel.runtime.ops import Partial, StopFlag
from qllm.kernel.runtime.passes import Pass

if TYPE_CHECKING:
    import torch

    from qllm.kernel.compute import Compute
    from qllm.kernel.request import Request
    from qllm.kernel.runtime.ops import MoEGranularity, OpKind
    from qllm.kernel.runtime.passes import Segment
    from qllm.models.base import MoEModel


@dataclass(frozen=True, slots=True)
class OpTiming:
    """One batched op the worker ran, and how long the model took to compute it."""

    kind: OpKind
    layer: int
    expert: int
    rows: int
    start: float  # time.perf_counter() when it started
    seconds: float
    whole: bool  # neither stopped early nor a resumed part: its time is the op's cost


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one run of a pass did: the ops it ran, the gaps before them while the kernel was busy
    (from the end of the previous op), the end of its last op, and the error that ended it."""

    timings: list[OpTiming]
    gaps: list[float]
    last_end: float | None
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """A request its pass let go: resume its program with ``logits`` (None when the pass wanted
    none: a prefill chunk before the last)."""

    request: Request
    logits: torch.Tensor | None


class Runner:
    """Owns pass forming and the compute thread's op loop."""

    def __init__(self, model: MoEModel, compute: Compute, *, moe_granularity: MoEGranularity = "layer"):
        self.model = model
        self.compute = compute
        self.moe_granularity = moe_granularity
        self.in_flight: Sequence[Segment] = ()  # the segments of the pass computing now
        self._stop = StopFlag()  # a message arrived: stop at the next op or expert
        self._last_end: float | None = None  # perf_counter() at the end of the last op (None: idle since)

    def idle(self) -> None:
        """The kernel waits for work: the gap to its next op is idle time, not overhead."""
        self._last_end = None

    # ---------------------------------------------------------------- passes
    def form(self, requests: Sequence[Request]) -> tuple[Pass, list[Resume]]:
        """One pass of the requests' rows: their passes merged (split where only part of one was
        chosen), with a new pass for requests between passes; and the requests that a split-off
        part let go. Requests move to their new passes only once every pass is built, so a
        failure leaves them where they were."""
        groups: dict[int, tuple[Pass, list[Request]]] = {}
        fresh: list[Request] = []
        for request in requests:
            if request.group is None:
                fresh.append(request)
            else:
                groups.setdefault(id(request.group), (request.group, []))[1].append(request)
        parts, rests = [], []
        for group, members in groups.values():
            if len(members) == len(group.segments):
                parts.append(group)
                continue
            chosen = {id(m) for m in members}
            kept, rest = group.split([i for i, s in enumerate(group.segments) if id(s.owner) in chosen])
            parts.append(kept)
            rests.append(rest)
        if fresh:
            parts.append(
                Pass.start(
                    self.model,
                    [(r.cache, r.forward.token_ids, r.forward.logits, r) for r in fresh],
                    moe_granularity=self.moe_granularity,
                )
            )
        # A part split off between the experts of the last layer may be done at once (its rows
        # route to no remaining expert and want no logits): it leaves like the rest, rather than
        # join a pass at another op.
        done = [p for p in parts if p.done]
        if done and len(done) < len(parts):
            parts = [p for p in parts if not p.done]
            rests += done
        group = Pass.merge(parts)
        leaving: list[Resume] = []
        for rest in rests:
            _join(rest)
            leaving += self.settle(rest) or []
        for segment in group.segments:
            if segment.owner.group is not group:
                segment.owner.join(group, segment)
        return group, leaving

    def settle(self, group: Pass) -> list[Resume] | None:
        """The requests a pass lets go: all of them when it is done (each with its logits), those
        through with it at its head otherwise (prefill chunks that want no logits: they start
        their next pass while the others compute the head). None when all still have work in it."""
        if group.done:
            return [Resume(s.owner, logits) for s, logits in zip(group.segments, group.logits)]
        if group.through:
            kept, through = group.split([i for i, s in enumerate(group.segments) if s.logits])
            _join(kept)
            return [Resume(s.owner, None) for s in through.segments]
        return None

    def leave(self, request: Request) -> list[Resume]:
        """Take ``request``'s rows out of its pass; the others stay together, where they were
        (and those the remaining pass lets go come back)."""
        group = request.group
        request.join(None)
        if group is None or group.done:
            return []
        others = [i for i, s in enumerate(group.segments) if s.owner is not request]
        if not others:
            return []
        rest, _ = group.split(others)
        _join(rest)
        return self.settle(rest) or []

    def disband(self, group: Pass) -> list[Request]:
        """Every request leaves ``group`` (its compute failed); returns them."""
        owners = group.owners
        for request in owners:
            request.join(None)
        return owners

    # ---------------------------------------------------------------- compute
    async def run(self, group: Pass, max_ops: int) -> StepResult:
        """Run ``group``'s next op, and up to ``max_ops`` in all until it is through or a message
        arrives, on the compute thread."""
        self.in_flight = group.segments
        # Only what arrives while the op computes stops it: a message posted during the decision
        # (a policy callback that submits) is read at the next decision like any other.
        self.interrupt_requested = False
        try:
            result = await self.compute(self._work, group, max_ops, self._last_end)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result = StepResult([], [], self._last_end, exc)
        finally:
            self.in_flight = ()
        self._last_end = result.last_end
        return result

    @property
    def interrupt_requested(self) -> bool:
        """A message arrived: the running op stops at its next op or expert."""
        return self._stop()

    @interrupt_requested.setter
    def interrupt_requested(self, value: bool) -> None:
        self._stop.set(value)

    def _work(self, group: Pass, max_ops: int, last_end: float | None) -> StepResult:
        """The op loop, on the compute thread."""
        timings: list[OpTiming] = []
        gaps: list[float] = []
        run, stop = self.model.run, self._stop
        op = group.pending
        try:
            while True:
                start = time.perf_counter()
                if last_end is not None:
                    gaps.append(start - last_end)
                (result,) = run([op], stop)
                last_end = end = time.perf_counter()
                whole = result.__class__ is not Partial and op.partial is None
                timings.append(OpTiming(op.kind, op.layer, op.expert, op.rows, start, end - start, whole))
                op = group.advance(result)
                if op is None or len(timings) >= max_ops or stop() or group.through:
                    return StepResult(timings, gaps, last_end)
        except Exception as exc:
            return StepResult(timings, gaps, last_end, exc)


def _join(group: Pass) -> None:
    """Each segment's request moves to ``group``."""
    for segment in group.segments:
        segment.owner.join(group, segment)
