"""The executor: computes a batch of ops that share one key, one batched call per step.

:class:`Executor` holds the op runners of :class:`~qllm.models.base.MoEModel`: one per
:class:`~qllm.kernel.runtime.ops.OpKind`, each the forward pass of its part of a layer written
with the family hooks (``attn_norm``, ``qkv``, ``rotary``, ``route``, ``expert`` ...). The rows of
all ops in a call are concatenated and zero-padded to the count the op kind's calibration found
batch-invariant (qllm/models/invariance.py), so a row's result does not depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qllm.kernel.runtime.cache import append_all
from qllm.kernel.runtime.ops import Op, OpKind, Partial, merge_ready
from qllm.models import gemm, invariance, swiglu
from qllm.models.attention import attend_requests


def pad_rows(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    """``x`` with zero rows appended up to a multiple of ``multiple`` and at least ``minimum`` rows."""
    extra = max((-x.shape[0]) % multiple, minimum - x.shape[0])
    if extra <= 0:
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])


class Executor:
    """Computes ops for a :class:`~qllm.models.base.MoEModel`, through its family hooks.

    A base of MoEModel, not used alone: the runners read the model's modules (``hf``, ``layers``,
    ``moe_blocks``) and call its hooks; MoEModel sets those before it initialises this base."""

    def __init__(self) -> None:
        # Rows of each op kind's calls are padded to (multiple, at least) rows: what the probe of
        # this machine's GEMM kernels found batch-invariant, set by calibration; no padding
        # without batch invariance.
        self._padding: dict[OpKind, invariance.Padding] = {kind: invariance.NO_PADDING for kind in OpKind}
        self._rotary_memo: tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor] | None = None
        # Expert parallel: the group whose ranks hold some of the experts (qllm/parallel); None:
        # every expert is computed here.
        self.remote: Any = None
        self._runners: dict[OpKind, Callable[[list[Op]], list[Any]]] = {
            OpKind.ATTENTION: self._run_attention,
            OpKind.ROUTER: self._run_router,
            OpKind.EXPERT: self._run_expert,
            OpKind.SHARED: self._run_shared,
            OpKind.MLP: self._run_mlp,
            OpKind.HEAD: self._run_head,
            OpKind.MOE: self._run_moe,
        }
        gemm.pack_all(self.hf)  # now, not in the middle of the first requests' ops

    def run(self, ops: list[Op], stop: Callable[[], bool] | None = None) -> list[Any]:
        """Compute ops that share one key as a single batched call; one result per op.

        ``stop``, polled between experts of a grouped MoE op: when it returns True the op ends
        early with a :class:`~qllm.kernel.runtime.passes.Partial` per op (the pass resumes it as
        one op)."""
        return self.compute(ops, stop)

    def compute(self, ops: list[Op], stop: Callable[[], bool] | None = None) -> list[Any]:
        """:meth:`run` at the row padding in force (without first checking the calibration)."""
        kind = ops[0].kind
        with torch.no_grad():
            if kind is OpKind.MOE:
                return self._run_moe(ops, stop)
            if kind is OpKind.ATTENTION and any(op.segments for op in ops):
                results = self._run_segmented(ops)
            else:
                results = self._runners[kind](ops)
            if ops[0].residual is not None:  # the residual add, while the output is in cache
                results = [op.residual + r for op, r in zip(ops, results)]
            return results

    def _run_segmented(self, ops: list[Op]) -> list[torch.Tensor]:
        """An attention op over passes: each request's rows as an op of its own (its cache)."""
        flat: list[Op] = []
        counts: list[int] = []
        for op in ops:
            if not op.segments:
                flat.append(op)
                counts.append(1)
                continue
            start = 0
            for s in op.segments:
                flat.append(
                    Op(
                        OpKind.ATTENTION,
                        op.layer,
                        op.x[start : start + s.rows],
                        cache=s.cache,
                        positions=s.positions,
                    )
                )
                start += s.rows
            counts.append(len(op.segments))
        results = self._runners[OpKind.ATTENTION](flat)
        out, i = [], 0
        for n in counts:
            out.append(results[i] if n == 1 else torch.cat(results[i : i + n]))
            i += n
        return out

    def _rows(self, ops: list[Op], kind: OpKind | None = None) -> tuple[torch.Tensor, list[int]]:
        """The ops' rows in one tensor, padded as op kind ``kind`` (default: the ops') is; their sizes."""
        padding = self._padding[kind or ops[0].kind]
        if len(ops) == 1:
            x = ops[0].x
            return pad_rows(x, *padding), [x.shape[0]]
        return pad_rows(torch.cat([op.x for op in ops]), *padding), [op.rows for op in ops]

    def _split(self, y: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        if len(sizes) == 1:
            return [y if y.shape[0] == sizes[0] else y[: sizes[0]]]
        return list(torch.split(y[: sum(sizes)], sizes))

    def _run_attention(self, ops: list[Op]) -> list[torch.Tensor]:
        layer = self.layers[ops[0].layer]
        attn = self.attention(layer)
        x, sizes = self._rows(ops)
        n = sum(sizes)
        x = self.attn_norm(layer)(x)
        q, k, v = (t[:n] for t in self.qkv(attn, x))
        if self._rotary_shared:
            cos, sin = self._shared_rotary(v, [op.positions for op in ops])
        elif len(ops) == 1 or not self._rotary_per_request:
            positions = ops[0].positions if len(ops) == 1 else torch.cat([op.positions for op in ops])
            cos, sin = self.rotary_embedding(ops[0].layer, v, positions)
        else:
            parts = [self.rotary_embedding(ops[0].layer, v, op.positions) for op in ops]
            cos, sin = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        q, k = self.rotary(attn, q, k, cos, sin)
        window, chunk, sinks = (
            self.sliding_window(attn),
            self.attention_chunk(attn),
            self.attention_sinks(attn),
        )
        queries = [q] if len(ops) == 1 else q.split(sizes)
        filled = append_all(
            [op.cache for op in ops],
            ops[0].layer,
            k.transpose(0, 1).split(sizes, dim=1),
            v.transpose(0, 1).split(sizes, dim=1),
        )
        expand = None if self._plain_kv else lambda keys, values: self.expand_kv(attn, keys, values)
        o = attend_requests(queries, filled, expand, attn.scaling, window, chunk, sinks)
        return self._split(self.attn_out(layer, pad_rows(o, *self._padding[OpKind.ATTENTION]), x), sizes)

    def _shared_rotary(
        self, x: torch.Tensor, positions: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Keyed on the positions tensors themselves, which a pass hands to all its layers (the memo
        # keeps them alive, so their identities cannot be reused by other tensors).
        memo = self._rotary_memo
        same = memo is not None and len(memo[0]) == len(positions) and memo[1].dtype == x.dtype
        if same and all(a is b for a, b in zip(memo[0], positions)):  # type: ignore[index]
            return memo[1], memo[2]  # type: ignore[index]
        cos, sin = self.rotary_embedding(0, x, positions[0] if len(positions) == 1 else torch.cat(positions))
        self._rotary_memo = (tuple(positions), cos, sin)
        return cos, sin

    def _route(self, ops: list[Op]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Post-attention norm and router over the ops' rows (padded as ROUTER ops are): the normed
        rows, routing weights and expert indices of the real rows, and each op's row count."""
        layer = ops[0].layer
        x, sizes = self._rows(ops, OpKind.ROUTER)
        x = self.mlp_norm(self.layers[layer])(x)
        weights, indices = self.route(self.moe_blocks[layer], x)
        n = sum(sizes)
        return x[:n], weights[:n], indices[:n], sizes

    def _run_router(self, ops: list[Op]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        x, weights, indices, sizes = self._route(ops)
        if self.remote is not None:  # the layer's experts follow as ops of their own
            self.remote.count_op(x.shape[0])
        return list(zip(self._split(x, sizes), self._split(weights, sizes), self._split(indices, sizes)))

    def _run_expert(self, ops: list[Op]) -> list[torch.Tensor]:
        x, sizes, w = self._expert_input(ops)
        layer, e = ops[0].layer, ops[0].expert
        remote = self.remote
        if remote is None or remote.holds(layer, e):
            y = self.expert(self.moe_blocks[layer], e, x)
        else:
            y = remote.call(layer, e, x)
        return self._expert_output(y, sizes, w)

    def _expert_input(self, ops: list[Op]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """An expert call's input rows (padded; scaled by the routing weights where the family
        scales inputs), the ops' row counts and the routing weights."""
        x, sizes = self._rows(ops)
        w = ops[0].weight if len(ops) == 1 else torch.cat([op.weight for op in ops])
        if self.weighted_expert_input:
            w = torch.cat([w.to(x.dtype), w.new_zeros(x.shape[0] - w.shape[0], dtype=x.dtype)])
            x = x * w[:, None]
        return x, sizes, w

    def _expert_output(self, y: torch.Tensor, sizes: list[int], w: torch.Tensor) -> list[torch.Tensor]:
        """Each op's rows of an expert call's output ``y``, scaled by the routing weights where the
        family scales outputs."""
        if self.weighted_expert_input:
            return self._split(y, sizes)
        y = y[: sum(sizes)]
        return self._split((y * w[:, None]).to(y.dtype), sizes)

    def _run_shared(self, ops: list[Op]) -> list[torch.Tensor]:
        x, sizes = self._rows(ops)
        return self._split(self.shared(self.moe_blocks[ops[0].layer], x), sizes)

    def _run_moe(self, ops: list[Op], stop: Callable[[], bool] | None = None) -> list[Any]:
        """A MoE layer in one op: router, each routed expert on its rows (ascending, summed as the
        per-expert ops sum), then the shared expert. The same calls as ROUTER, EXPERT and SHARED
        ops, so each row's result is the same bits as theirs. Result per op: ``(routed, shared)``
        (``shared`` None without a shared expert); ``residual + routed + shared`` for an op with a
        residual; a :class:`Partial` when ``stop`` fired. An op with :attr:`Op.partial` set resumes
        such a stopped op: routing and partial sums as it left them, experts from ``expert`` on.

        With experts on other ranks (:attr:`remote`), their calls are posted up to the group's
        window ahead and added when their turn in the ascending order comes, so the sums are the
        single-process sums. A stopped op first collects what it posted (kept in the Partial's
        ``ready``, used on resume); a failed one collects it and raises."""
        layer = ops[0].layer
        block = self.moe_blocks[layer]
        first = ops[0].partial
        ready: dict[int, torch.Tensor] = {}
        if first is None:
            x, weights, indices, sizes = self._route(ops)
            out = torch.zeros_like(x)
            start = 0
        else:  # resuming stopped ops: their routing and partial sums, from their next expert on
            parts = [op.partial for op in ops]
            if len(parts) == 1:  # the sums accumulate in place: the pass's own tensor stays as it was
                x, weights, indices, out = first.x, first.weights, first.indices, first.out.clone()
                ready = dict(first.ready or {})
            else:
                x, weights, indices, out = (
                    torch.cat([getattr(p, name) for p in parts])
                    for name in ("x", "weights", "indices", "out")
                )
                ready = merge_ready([p.ready for p in parts])
            sizes = [op.rows for op in ops]
            start = first.next_expert
        experts = expert_rows(indices.tolist(), start)
        fused = self.swiglu_experts(block) if self.remote is None else None
        if fused is not None:  # every routed expert in one call of qllm's SwiGLU kernel
            done = swiglu.run_layer(fused, x, weights, experts, out, stop)
            if done < len(experts):
                return self._partials(sizes, x, weights, indices, out, next_expert=experts[done][0], ready={})
            return self._moe_finish(ops, block, x, out, sizes)
        built: dict[int, tuple[Op, torch.Tensor | None]] = {}

        def calls(j: int) -> tuple[Op, torch.Tensor | None]:  # expert j's op, built when first needed
            if j not in built:
                built[j] = self._moe_call(layer, x, weights, *experts[j])
            return built[j]

        remote = self.remote
        posted: dict[int, Any] = {}  # index in ``experts`` -> ticket of its remote call
        ahead = 0  # the next expert to consider posting
        try:
            if remote is not None and first is None:
                remote.count_op(x.shape[0])
            for j, (e, rows, _slots) in enumerate(experts):
                if remote is not None:
                    ahead = self._post_ahead(remote, layer, experts, calls, ready, posted, ahead)
                op, at = calls(j)
                if e in ready:  # computed by a remote rank before the op stopped
                    y = ready.pop(e)[at if at is not None else slice(rows[0], rows[0] + 1)]
                elif j in posted:
                    ticket, sizes_e, w = posted.pop(j)
                    y = self._expert_output(remote.wait(ticket), sizes_e, w)[0]
                else:
                    y = self._run_expert([op])[0]
                if at is None:  # a lone row: views, no gather or scatter (the same sums)
                    out[rows[0] : rows[0] + 1] += y
                else:
                    out.index_put_((at,), y, accumulate=True)
                built.pop(j, None)
                if stop is not None and j + 1 < len(experts) and stop():
                    for k in sorted(posted):
                        ready[experts[k][0]] = self._collect(
                            remote, posted.pop(k), calls(k)[1], experts[k][1], x
                        )
                    ready = {e: t for e, t in ready.items() if e > experts[j][0]}
                    return self._partials(
                        sizes, x, weights, indices, out, next_expert=experts[j + 1][0], ready=ready
                    )
        except BaseException:
            if posted:
                remote.drain([ticket for ticket, _, _ in posted.values()])
            raise
        return self._moe_finish(ops, block, x, out, sizes)

    def _partials(
        self, sizes: list[int], *state: torch.Tensor, next_expert: int, ready: dict
    ) -> list[Partial]:
        """A stopped grouped MoE op's :class:`Partial` per op: its rows of the routing state (``x``,
        weights, indices, partial sums) and of the remote outputs ``ready``, from ``next_expert`` on."""
        parts = zip(*(self._split(t, sizes) for t in state))
        splits = {e: self._split(t, sizes) for e, t in ready.items()}
        return [
            Partial(*p, next_expert=next_expert, ready={e: t[i] for e, t in splits.items()})
            for i, p in enumerate(parts)
        ]

    def _moe_finish(
        self, ops: list[Op], block: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, sizes: list[int]
    ) -> list[Any]:
        """A grouped MoE op's results from its routed sum ``out``: the shared expert added, per op."""
        layer = ops[0].layer
        shared = self._run_shared([Op(OpKind.SHARED, layer, x)])[0] if self.has_shared(block) else None
        outs = self._split(out, sizes)
        shareds = self._split(shared, sizes) if shared is not None else [None] * len(sizes)
        if ops[0].residual is not None:  # residual + (routed + shared), as the pass would add them
            return [op.residual + (o if s is None else o + s) for op, o, s in zip(ops, outs, shareds)]
        return list(zip(outs, shareds))

    def _moe_call(
        self, layer: int, x: torch.Tensor, weights: torch.Tensor, e: int, rows: list[int], slots: list[int]
    ) -> tuple[Op, torch.Tensor | None]:
        """The expert op of a grouped MoE op for expert ``e`` on its rows, and the rows' indices
        (None for a lone row, taken as views)."""
        if len(rows) == 1:
            r, s = rows[0], slots[0]
            return Op(OpKind.EXPERT, layer, x[r : r + 1], expert=e, weight=weights[r, s : s + 1]), None
        at = torch.tensor(rows, device=x.device)
        w = weights[at, torch.tensor(slots, device=x.device)]
        return Op(OpKind.EXPERT, layer, x.index_select(0, at), expert=e, weight=w), at

    def _post_ahead(
        self,
        remote: Any,
        layer: int,
        experts: list[tuple[int, list[int], list[int]]],
        calls: Callable[[int], tuple[Op, torch.Tensor | None]],
        ready: dict[int, torch.Tensor],
        posted: dict[int, Any],
        ahead: int,
    ) -> int:
        """Post the remote calls of the experts from ``ahead`` on while fewer than the group's
        window are in flight; returns the next expert to consider."""
        while ahead < len(experts) and len(posted) < remote.window:
            e = experts[ahead][0]
            if e not in ready and not remote.holds(layer, e):
                xin, sizes, w = self._expert_input([calls(ahead)[0]])
                posted[ahead] = (remote.post(layer, e, xin), sizes, w)
            ahead += 1
        return ahead

    def _collect(
        self,
        remote: Any,
        posted: tuple[Any, list[int], torch.Tensor],
        at: torch.Tensor | None,
        rows: list[int],
        x: torch.Tensor,
    ) -> torch.Tensor:
        """A posted call's output as a tensor over all the op's rows (its own rows filled), so it
        splits and merges with the op's other row state."""
        ticket, sizes, w = posted
        y = self._expert_output(remote.wait(ticket), sizes, w)[0]
        dense = torch.zeros_like(x)
        if at is None:
            dense[rows[0]] = y[0]
        else:
            dense[at] = y
        return dense

    def _run_mlp(self, ops: list[Op]) -> list[torch.Tensor]:
        layer = self.layers[ops[0].layer]
        x, sizes = self._rows(ops)
        return self._split(self.mlp_out(layer, self.dense_mlp(layer)(self.mlp_norm(layer)(x))), sizes)

    def _run_head(self, ops: list[Op]) -> list[torch.Tensor]:
        x, sizes = self._rows(ops)
        return self._split(self.logits(x), sizes)


def expert_rows(indices: list[list[int]], start: int = 0) -> list[tuple[int, list[int], list[int]]]:
    """The experts that rows routed to (``indices``: each row's top-k), ascending from ``start``:
    ``(expert, rows, slots)``: the rows in order, each with the top-k slot that chose the expert."""
    chosen: dict[int, tuple[list[int], list[int]]] = {}
    for row, picks in enumerate(indices):
        for slot, e in enumerate(picks):
            if e >= start:
                rows, slots = chosen.setdefault(e, ([], []))
                rows.append(row)
                slots.append(slot)
    return [(e, *chosen[e]) for e in sorted(chosen)]
