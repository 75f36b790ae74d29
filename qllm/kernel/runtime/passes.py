"""A forward pass over the rows of many requests: the unit the kernel computes and preempts.

A :class:`Pass` holds one forward pass of a set of *segments* (a request's new tokens: one row for
a decode step, a chunk of rows for a prefill) and steps through it op by op: attention, then the
layer's MoE as one grouped op (or router, each expert and the shared expert as separate ops), up
to the head. Its state (the residual stream, the routing of the layer in progress, the experts'
partial sums) lives in the pass, so a pass waits at any op without losing anything, exactly as a
request's coroutine frame does. Passes at the same op can be merged into one, and a pass can be
split by segment, at any op: the kernel batches whatever its policy chose.

Every op is row-wise, so a row's result does not depend on which pass it sits in (see
qllm/models/invariance.py for why that holds bit for bit): a request computed in a pass with others
equals its solo run. The grouped MoE op and the per-expert ops do the same arithmetic per row
(experts summed in ascending order), so a pass may switch granularity at any expert.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from qllm.kernel.runtime.ops import MoEGranularity, Op, OpKind, Partial, check_moe_granularity, merge_ready

if TYPE_CHECKING:
    from qllm.kernel.runtime.cache import KVCache
    from qllm.models.base import MoEModel


@dataclass(slots=True, eq=False)
class Segment:
    """One request's rows in a pass: its cache, the positions of its new tokens, whether it wants
    the last row's logits, and who it belongs to (opaque to the executor)."""

    cache: KVCache
    positions: torch.Tensor
    rows: int
    logits: bool = True
    owner: Any = None
    experts: frozenset[int] | None = None  # experts its rows use in the MoE layer in progress


class Stage(enum.IntEnum):
    ATTENTION = 0
    MOE = 1
    ROUTER = 2
    EXPERT = 3
    SHARED = 4
    MLP = 5
    HEAD = 6
    DONE = 7


_NO_ROWS = torch.empty(0)

_ROW_STATE = ("h", "mlp_in", "x", "weights", "indices", "out")
"""Pass fields that hold one row per row of the pass (sliced on split, concatenated on merge)."""


class Pass:
    """One forward pass of several segments (see the module doc). Drive it with :meth:`advance`."""

    __slots__ = (
        "expert_rows",
        "h",
        "indices",
        "layer",
        "logits",
        "mlp_in",
        "model",
        "moe_granularity",
        "ops_run",
        "out",
        "pending",
        "ready",
        "resume",
        "segments",
        "stage",
        "todo",
        "weights",
        "x",
    )

    def __init__(
        self,
        model: MoEModel,
        segments: list[Segment],
        h: torch.Tensor,
        *,
        moe_granularity: MoEGranularity = "layer",
        layer: int = 0,
        stage: Stage = Stage.ATTENTION,
        resume: int = -1,
        next_expert: int = 0,
        mlp_in: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        ready: dict[int, torch.Tensor] | None = None,
    ):
        """A pass of ``segments`` whose residual stream is ``h``, at the start of the forward pass
        or, for the parts of passes split or merged, at ``stage`` of ``layer`` with the state of
        the layer in progress (the routing and partial sums of its MoE; at :attr:`Stage.EXPERT`,
        ``next_expert`` is the first expert still to compute)."""
        self.model = model
        self.segments = segments
        self.moe_granularity = check_moe_granularity(moe_granularity)
        self.layer = layer
        self.stage = stage
        self.h = h
        self.mlp_in = mlp_in
        self.x = x
        self.weights = weights
        self.indices = indices
        self.out = out
        self.ready = ready
        self.todo: list[int] = []  # experts of the layer in progress still to compute, ascending
        self.resume = resume  # a stopped grouped MoE op: the first expert its resumed op computes
        self.expert_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.logits: list[torch.Tensor | None] | None = None
        self.ops_run = 0
        if stage is Stage.EXPERT:
            self._plan_experts(next_expert)
        elif stage is Stage.HEAD and not any(s.logits for s in segments):
            self.stage, self.logits = Stage.DONE, [None] * len(segments)  # nothing to compute
        self.pending: Op | None = self._op()

    @classmethod
    def start(
        cls,
        model: MoEModel,
        parts: Sequence[tuple[KVCache, torch.Tensor, bool, Any]],
        *,
        moe_granularity: MoEGranularity = "layer",
    ) -> Pass:
        """A pass over ``parts``: ``(cache, token_ids, wants_logits, owner)`` each, the tokens
        appended after what the cache holds."""
        segments = []
        for cache, ids, logits, owner in parts:
            start = cache.length()
            positions = torch.arange(start, start + ids.shape[0], device=model.device)
            segments.append(Segment(cache, positions, int(ids.shape[0]), logits, owner))
        ids = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        return cls(model, segments, model.embed(ids), moe_granularity=moe_granularity)

    # ------------------------------------------------------------------ queries
    @property
    def rows(self) -> int:
        return int(self.h.shape[0])

    @property
    def owners(self) -> list[Any]:
        return [s.owner for s in self.segments]

    @property
    def done(self) -> bool:
        return self.pending is None

    @property
    def through(self) -> list[int]:
        """At the head: the segments that want no logits (a prefill chunk), done with this pass."""
        if self.stage is not Stage.HEAD:
            return []
        return [i for i, s in enumerate(self.segments) if not s.logits]

    @property
    def at_start(self) -> bool:
        """Nothing of the pass has run yet (its pending op starts the forward pass)."""
        return self.stage is Stage.ATTENTION and self.layer == 0

    # ------------------------------------------------------------------ stepping
    def advance(self, result: Any) -> Op | None:
        """Take the pending op's result; return the next op (None when the pass is complete)."""
        self.ops_run += 1
        stage = self.stage
        model = self.model
        if stage is Stage.ATTENTION:
            residual = self.h
            self.h = result  # the op added the residual
            self.mlp_in = residual if model.parallel_mlp else self.h
            if model.moe_blocks[self.layer] is None:
                self.stage = Stage.MLP
            else:
                self.stage = Stage.ROUTER if self.moe_granularity == "expert" else Stage.MOE
        elif stage is Stage.MLP:
            self.h = result  # the op added the residual
            self._next_layer()
        elif stage is Stage.MOE:
            if isinstance(result, Partial):  # the rest of the layer: one grouped op again
                self.x, self.weights, self.indices, self.out = (
                    result.x,
                    result.weights,
                    result.indices,
                    result.out,
                )
                self.ready = result.ready or None
                self.resume = result.next_expert
            elif isinstance(result, tuple):
                self._finish_moe(*result)
            else:
                self.h = result  # the op added the residual (no per-request output transform)
                self._next_layer()
        elif stage is Stage.ROUTER:
            self.x, self.weights, self.indices = result
            self.out = torch.zeros_like(self.x)
            self._plan_experts(0)
        elif stage is Stage.EXPERT:
            self.out.index_put_((self.expert_rows[0],), result, accumulate=True)
            self.todo.pop(0)
            self._after_expert()
        elif stage is Stage.SHARED:
            self._finish_moe(self.out, result)
        elif stage is Stage.HEAD:
            rows = iter(result.unbind(0))
            self.logits = [next(rows) if s.logits else None for s in self.segments]
            self.stage = Stage.DONE
        self.pending = self._op()
        return self.pending

    def _plan_experts(self, first: int) -> None:
        self.todo = [e for e in torch.unique(self.indices).tolist() if e >= first]
        if len(self.segments) > 1:  # each request's own next expert is where it stands
            routed, start = self.indices.tolist(), 0
            for s in self.segments:
                s.experts = frozenset(e for row in routed[start : start + s.rows] for e in row)
                start += s.rows
        self.stage = Stage.EXPERT
        self._after_expert()

    def pending_of(self, segment: Segment) -> Op | None:
        """The op ``segment`` waits on. Between the experts of a layer that is its own next expert
        (its rows take no part in the pass's expert ops before it), else the pass's op."""
        if self.stage is not Stage.EXPERT or segment.experts is None or len(self.segments) == 1:
            return self.pending
        current = self.todo[0]
        head = min((e for e in segment.experts if e >= current), default=None)
        if head == current:
            return self.pending
        layer = self.layer
        if head is not None:
            return Op(OpKind.EXPERT, layer, _NO_ROWS, expert=head)
        if self.model.has_shared(self.model.moe_blocks[layer]):
            return Op(OpKind.SHARED, layer, _NO_ROWS)
        if layer + 1 < self.model.num_layers:
            return Op(OpKind.ATTENTION, layer + 1, _NO_ROWS)
        return Op(OpKind.HEAD, -1, _NO_ROWS)

    def _after_expert(self) -> None:
        if self.todo:
            rows, slots = (self.indices == self.todo[0]).nonzero(as_tuple=True)
            self.expert_rows = (rows, slots)
            return
        self.expert_rows = None
        if self.model.has_shared(self.model.moe_blocks[self.layer]):
            self.stage = Stage.SHARED
        else:
            self._finish_moe(self.out, None)

    def _finish_moe(self, out: torch.Tensor, shared: torch.Tensor | None) -> None:
        model = self.model
        layer = self.layer
        out = self._per_segment(model.routed_out_hook, model.moe_blocks[layer], out)
        if shared is not None:
            out = out + shared
        self.h = self.h + self._per_segment(model.mlp_out_hook, model.layers[layer], out)
        self._next_layer()

    def _per_segment(self, hook: Any, module: Any, y: torch.Tensor) -> torch.Tensor:
        """``hook(module, rows)`` applied to each segment's rows by themselves (a family's output
        transform may hold a reduction, whose result could depend on the row count); the identity
        hook is skipped."""
        if hook is None:
            return y
        if len(self.segments) == 1:
            return hook(module, y)
        parts, start = [], 0
        for s in self.segments:
            parts.append(hook(module, y[start : start + s.rows]))
            start += s.rows
        return torch.cat(parts)

    def _next_layer(self) -> None:
        self.mlp_in = None
        self.x = self.weights = self.indices = self.out = self.ready = None  # the layer done's MoE state
        self.resume = -1
        self.layer += 1
        if self.layer < self.model.num_layers:
            self.stage = Stage.ATTENTION
        elif any(s.logits for s in self.segments):
            self.stage = Stage.HEAD
        else:
            self.logits = [None] * len(self.segments)
            self.stage = Stage.DONE

    def _op(self) -> Op | None:
        stage, layer = self.stage, self.layer
        if stage is Stage.ATTENTION:
            if len(self.segments) == 1:
                s = self.segments[0]
                return Op(
                    OpKind.ATTENTION, layer, self.h, cache=s.cache, positions=s.positions, residual=self.h
                )
            return Op(OpKind.ATTENTION, layer, self.h, segments=self.segments, residual=self.h)
        if stage is Stage.MOE:
            residual = self.h if self.model.moe_adds_residual else None
            if self.resume >= 0:
                partial = Partial(self.x, self.weights, self.indices, self.out, self.resume, self.ready)
                return Op(OpKind.MOE, layer, self.x, expert=self.resume, residual=residual, partial=partial)
            return Op(OpKind.MOE, layer, self.mlp_in, residual=residual)
        if stage is Stage.ROUTER:
            return Op(OpKind.ROUTER, layer, self.mlp_in)
        if stage is Stage.EXPERT:
            rows, slots = self.expert_rows
            return Op(
                OpKind.EXPERT, layer, self.x[rows], expert=self.todo[0], weight=self.weights[rows, slots]
            )
        if stage is Stage.SHARED:
            return Op(OpKind.SHARED, layer, self.x)
        if stage is Stage.MLP:
            return Op(OpKind.MLP, layer, self.mlp_in, residual=self.h)  # the dense MLP applies mlp_out itself
        if stage is Stage.HEAD:
            if len(self.segments) == 1:
                return Op(OpKind.HEAD, -1, self.h[-1:])
            last, ends = 0, []
            for s in self.segments:
                last += s.rows
                if s.logits:
                    ends.append(last - 1)
            return Op(OpKind.HEAD, -1, self.h[torch.tensor(ends, device=self.h.device)])
        return None

    # ------------------------------------------------------------------ split and merge
    def split(self, keep: Sequence[int]) -> tuple[Pass, Pass]:
        """Two passes at this pass's op: the segments at indices ``keep`` and the others."""
        keep_set = set(keep)
        rest = [i for i in range(len(self.segments)) if i not in keep_set]
        return self._part(sorted(keep_set)), self._part(rest)

    def _part(self, indices: list[int]) -> Pass:
        starts, start = [], 0
        for s in self.segments:
            starts.append(start)
            start += s.rows
        rows = torch.cat(
            [
                torch.arange(starts[i], starts[i] + self.segments[i].rows, device=self.h.device)
                for i in indices
            ]
        )
        state = {name: None if (value := getattr(self, name)) is None else value[rows] for name in _ROW_STATE}
        if self.ready:
            state["ready"] = {e: t[rows] for e, t in self.ready.items()}
        return Pass(
            self.model,
            [self.segments[i] for i in indices],
            moe_granularity=self.moe_granularity,
            layer=self.layer,
            stage=self.stage,
            resume=self.resume,
            next_expert=self.todo[0] if self.stage is Stage.EXPERT else 0,
            **state,
        )

    @classmethod
    def merge(cls, passes: Sequence[Pass]) -> Pass:
        """One pass of all of ``passes`` (all at the same op), their segments in order."""
        if len(passes) == 1:
            return passes[0]
        first = passes[0]
        if any((p.stage, p.layer, p.resume) != (first.stage, first.layer, first.resume) for p in passes):
            raise ValueError("only passes at the same op merge")
        state = {}
        for name in _ROW_STATE:
            values = [getattr(p, name) for p in passes]
            state[name] = None if values[0] is None else torch.cat(values)
        state["ready"] = merge_ready([p.ready for p in passes]) or None
        return cls(
            first.model,
            [s for p in passes for s in p.segments],
            moe_granularity=first.moe_granularity,
            layer=first.layer,
            stage=first.stage,
            resume=first.resume,
            next_expert=min(p.todo[0] for p in passes) if first.stage is Stage.EXPERT else 0,
            **state,
        )
