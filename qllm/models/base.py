"""The model executor: a Hugging Face MoE model run as a stream of schedulable ops.

:class:`MoEModel` wraps a transformers ``*ForCausalLM`` and reuses its embeddings, attention
projections, rotary embedding, norms, routers and lm_head. Experts are computed here from the
fused 3D weights (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``), in place.

:meth:`MoEModel.forward` is the forward pass of one request written as a generator that yields an
:class:`~qllm.kernel.runtime.ops.Op` at attention, router and every expert; :meth:`MoEModel.run` computes a
list of ops with the same key as one batched call. A family adapter overrides the few hooks
where its architecture differs (see ``qllm/models/qwen2_moe.py`` for a shared expert).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Generator
from typing import Any, ClassVar

import structlog
import torch
import torch.nn.functional as F

from qllm.kernel.runtime.cache import BlockPool, KVCache, append_all
from qllm.kernel.runtime.ops import Op, OpKind
from qllm.kernel.runtime.passes import Partial, Pass
from qllm.models import gemm, invariance
from qllm.models.gemm import linear, linear_cat
from qllm.version import __version__ as qllm_version

log = structlog.get_logger()

MOE_GRANULARITIES = ("layer", "expert")
"""How a MoE layer runs: one grouped op (``layer``) or the router, each expert and the shared
expert as ops of their own (``expert``)."""


def _pad(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    """``x`` with zero rows appended up to a multiple of ``multiple`` and at least ``minimum`` rows."""
    extra = max((-x.shape[0]) % multiple, minimum - x.shape[0])
    if extra <= 0:
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])


class MoEModel:
    """Executor for one loaded model. Subclass per family; override hooks, not the loop."""

    family: ClassVar[str] = ""
    """Name shown by ``qllm models``."""
    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.model_type`` values this adapter runs."""
    parallel_mlp: ClassVar[bool] = False
    """The MoE block (or MLP) reads the layer's input, as attention does, not the attention output."""
    weighted_expert_input: ClassVar[bool] = False
    """The routing weight scales each expert's input rather than its output (Llama 4)."""

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_invariant: bool = True):
        self.hf = model.eval()
        self.hf.requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = model.config
        self.body = self.decoder(model)
        self.layers = list(self.body.layers)
        self.num_layers = len(self.layers)
        self.batch_invariant = batch_invariant
        first = self.attention(self.layers[0])
        self.head_dim = getattr(first, "head_dim", None)  # latent attention has none (qllm/models/mla.py)
        self.num_kv_heads = self.config.num_key_value_heads
        self.dtype = self.body.embed_tokens.weight.dtype
        self.device = self.body.embed_tokens.weight.device
        self.vocab_size = self.hf.lm_head.out_features
        self._rope = getattr(sys.modules[type(first).__module__], "apply_rotary_pos_emb", None)
        self.moe_blocks = [self.moe_block(layer) for layer in self.layers]
        # "dynamic" and "longrope" rotary depend on the longest position in a call (and switch
        # state on it), so each request's rows get their own call to stay batch-invariant.
        rope_type = str(getattr(self.body.rotary_emb, "rope_type", "default"))
        self._rotary_per_request = "dynamic" in rope_type or "longrope" in rope_type
        # One request's layers share their positions: its attention ops reuse the rotary tables
        # computed for the first layer (only where every layer's rotary is the same).
        self._rotary_shared = not self._rotary_per_request and (
            type(self).rotary_embedding is MoEModel.rotary_embedding
        )
        self._rotary_memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Rows of each op kind's calls are padded to (multiple, at least) rows: what the probe of
        # this machine's GEMM kernels found batch-invariant (qllm/models/invariance.py), set by
        # calibrate(); no padding without batch invariance.
        self._padding: dict[OpKind, invariance.Padding] = {kind: invariance.NO_PADDING for kind in OpKind}
        self.invariance: invariance.Calibration | None = None
        self._calibrated_threads = 0
        self._runners: dict[OpKind, Callable[[list[Op]], list[Any]]] = {
            OpKind.ATTENTION: self._run_attention,
            OpKind.ROUTER: self._run_router,
            OpKind.EXPERT: self._run_expert,
            OpKind.SHARED: self._run_shared,
            OpKind.MLP: self._run_mlp,
            OpKind.HEAD: self._run_head,
            OpKind.MOE: self._run_moe,
        }
        # A family's output transforms, applied per request by a pass (None: the identity).
        self.routed_out_hook = None if type(self).routed_out is MoEModel.routed_out else self.routed_out
        self.mlp_out_hook = None if type(self).mlp_out is MoEModel.mlp_out else self.mlp_out
        # Without them a grouped MoE op can return the new residual stream itself.
        self.moe_adds_residual = self.routed_out_hook is None and self.mlp_out_hook is None
        gemm.pack_all(self.hf)  # now, not in the middle of the first requests' ops

    # ------------------------------------------------------------------ family hooks
    @classmethod
    def supports(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) in cls.model_types

    def decoder(self, model: Any) -> Any:
        """The decoder inside the ``*ForCausalLM``: ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``."""
        return model.model

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The layer's attention module (projections, ``head_dim``, ``scaling``)."""
        return layer.self_attn

    def moe_block(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        """The layer's sparse MoE block, or None for a dense layer."""
        mlp = layer.mlp
        return mlp if hasattr(mlp, "experts") and hasattr(mlp, "gate") else None

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Query, key, value of rows ``x`` before rotary: ``[N, heads, head_dim]`` each."""
        n = x.shape[0]
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (
            t.view(n, -1, self.head_dim)
            for t in linear_cat(x, tuple(p.weight for p in projections), tuple(p.bias for p in projections))
        )
        if hasattr(attn, "q_norm"):  # per-head norm (Qwen3-MoE)
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v

    def sliding_window(self, attn: torch.nn.Module) -> int | None:
        window = (
            attn.sliding_window
            if hasattr(attn, "sliding_window")
            else getattr(self.config, "sliding_window", None)
        )
        return window or None

    def attention_chunk(self, attn: torch.nn.Module) -> int | None:
        """Chunk length of chunked attention (a query sees only the keys of its own chunk), or None."""
        return None

    def attention_sinks(self, attn: torch.nn.Module) -> torch.Tensor | None:
        """Per-head learned sink logits ``[heads]`` that join each query's softmax and carry no value, or None."""
        return None

    def expand_kv(
        self, attn: torch.nn.Module, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[kv_heads, T, dim]`` that attention reads, from what the cache holds."""
        return keys, values

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and expert indices, ``[N, top_k]`` each."""
        _, weights, indices = block.gate(x)
        return weights, indices

    def expert(self, block: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x``, computed from the fused weights (no copy)."""
        experts = block.experts
        gate, up = linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        return linear(experts.act_fn(gate) * up, experts.down_proj[e])

    def dense_mlp(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The MLP of a dense layer (one whose :meth:`moe_block` is None)."""
        return layer.mlp

    def attn_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        """Norm applied to the residual stream before attention."""
        return layer.input_layernorm

    def mlp_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        """Norm applied to the residual stream before the router and experts (or dense MLP)."""
        return layer.post_attention_layernorm

    def attn_out(self, layer: torch.nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Attention's contribution to the residual from its heads' output ``o`` ``[N, heads * head_dim]``;
        ``x`` is the normed input (for output gates)."""
        o_proj = self.attention(layer).o_proj
        return linear(o, o_proj.weight, o_proj.bias)

    def routed_out(self, block: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The routed experts' summed output ``y`` as the MoE block uses it (before any shared expert)."""
        return y

    def mlp_out(self, layer: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The MoE block's (or dense MLP's) contribution to the residual from its output ``y`` (row-wise)."""
        return y

    def rotary_embedding(
        self, i: int, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary ``cos, sin`` ``[N, rotary_dim]`` for layer ``i`` at ``positions``."""
        cos, sin = self.body.rotary_emb(x, positions[None])
        return cos[0], sin[0]

    def rotary(
        self, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key ``[N, heads, head_dim]`` with rotary position embedding applied."""
        return self._rope(q, k, cos, sin, unsqueeze_dim=1)

    def shared(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the layer's always-on shared expert(s), added unscaled to the routed experts'."""
        return block.shared_experts(x)

    def has_shared(self, block: torch.nn.Module) -> bool:
        return getattr(block, "shared_experts", None) is not None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.hf.lm_head
        return linear(self.body.norm(h), head.weight, head.bias)

    # ------------------------------------------------------------------ request side
    def new_cache(self, pool: BlockPool | None = None) -> KVCache:
        """An empty cache for one request: growable buffers, or blocks from ``pool``."""
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device, pool)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.body.embed_tokens(token_ids.to(self.device))

    def forward(
        self, cache: KVCache, token_ids: torch.Tensor, *, logits: bool = True, moe: str = "expert"
    ) -> Generator[Op, Any, torch.Tensor | None]:
        """Forward pass of ``token_ids`` (1-D) appended to ``cache``; returns the last row's logits
        (None with ``logits=False``, for all but the last chunk of a chunked prefill).

        Yields an op at each schedulable step and expects that op's result back: attention, then
        per MoE layer the router, each expert and the shared expert (``moe="expert"``) or one
        grouped op (``moe="layer"``). A one-segment :class:`~qllm.kernel.runtime.passes.Pass`.
        """
        if moe not in MOE_GRANULARITIES:
            raise ValueError(f"moe must be one of {', '.join(MOE_GRANULARITIES)}, got {moe!r}")
        run = Pass.start(self, [(cache, token_ids, logits, None)], split_moe=moe == "expert")
        op = run.pending
        while op is not None:
            op = run.advance((yield op))
        return run.logits[0]

    # ------------------------------------------------------------------ kernel side
    def run(self, ops: list[Op], stop: Callable[[], bool] | None = None) -> list[Any]:
        """Compute ops that share one key as a single batched call; one result per op.

        ``stop``, polled between experts of a grouped MoE op: when it returns True the op ends
        early with a :class:`~qllm.kernel.runtime.passes.Partial` per op (the pass resumes it as one op).
        """
        if self.batch_invariant and self._calibrated_threads != torch.get_num_threads():
            self.calibrate()  # kernels split rows differently at another thread count
        return self._compute(ops, stop)

    def _compute(self, ops: list[Op], stop: Callable[[], bool] | None = None) -> list[Any]:
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

    def calibrate(self, cache: invariance.ProbeCache | None = None) -> invariance.Calibration:
        """Find, on this machine and at the thread count in force, the row padding of each op kind
        that makes a row's results independent of its batch mates (see qllm/models/invariance.py)."""
        self._padding = {kind: invariance.NO_PADDING for kind in OpKind}
        result = invariance.calibrate(
            self._trace_gemms, self.signature(), self.device.type, cache, verify=self._op_invariant
        )
        for name, padding in result.padding.items():
            self._padding[OpKind[name]] = padding
        if not result.verified and (self.invariance is None or self.invariance.verified):
            log.warning(
                "batch_invariance_unverified",
                op_kinds=sorted(result.unverified),
                threads=result.threads,
                detail="no tested row padding makes these op kinds batch-invariant here; "
                "batched and preempted outputs may differ from solo runs in the last bits",
            )
        self.invariance = result
        self._calibrated_threads = torch.get_num_threads()
        return result

    def invariance_summary(self) -> dict[str, Any]:
        """What batch invariance this executor verified, for stats and reports."""
        if self.invariance is None:
            return {"enabled": False, "verified": False}
        return self.invariance.summary()

    def signature(self) -> str:
        """The adapter and every weight's name, shape, dtype and layout: what picks GEMM kernels."""
        # Which kernel runs a weight is code: the adapter, qllm's version and the oneDNN routing.
        parts = [
            f"{type(self).__module__}.{type(self).__qualname__}",
            qllm_version,
            gemm.ONEDNN,
            gemm.ONEDNN_MIN_WEIGHT,
            gemm.PACK,
            gemm.PACK_BATCH,
        ]
        for name, t in [*self.hf.named_parameters(), *self.hf.named_buffers()]:
            parts.append(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.stride()}")
        return invariance.ProbeCache.key(parts)

    def _trace_gemms(self) -> dict[str, list[invariance.Gemm]]:
        """The GEMMs each op kind runs, traced over a 3-token prefill and one decode step; keeps
        one op of each kind and layer structure as a template for :meth:`_op_invariant`."""
        found: dict[str, dict[str, invariance.Gemm]] = {}
        templates: dict[tuple[Any, ...], Op] = {}
        cache = self.new_cache()
        tokens = torch.arange(3) % self.vocab_size
        with torch.no_grad():
            for ids in (tokens, tokens[:1]):
                steps = self.forward(cache, ids)
                op = next(steps)
                while True:
                    results = []
                    traced = invariance.trace_gemms(
                        functools.partial(lambda op, out: out.extend(self._compute([op])), op, results),
                        op.x.shape[0],
                    )
                    for call in traced:
                        found.setdefault(op.kind.name, {}).setdefault(call.signature(), call)
                    layer = self.layers[op.layer] if op.layer >= 0 else None
                    structure = (op.kind, type(layer).__name__, *sorted(c.signature() for c in traced))
                    templates.setdefault(structure, op)
                    try:
                        op = steps.send(results[0])
                    except StopIteration:
                        break
        self._op_templates: dict[str, list[Op]] = {}
        for op in templates.values():
            self._op_templates.setdefault(op.kind.name, []).append(op)
        self._op_flops = {
            kind: sum(call.flops_per_row() for call in calls.values()) for kind, calls in found.items()
        }
        return {kind: list(gemms.values()) for kind, gemms in found.items()}

    def _op_invariant(self, kind_name: str, padding: invariance.Padding) -> bool:
        """Whether each traced op of this kind gives every row the same result at any row count
        and offset under ``padding`` (rows of attention ops each from its own one-token request)."""
        kind = OpKind[kind_name]
        saved = self._padding[kind]
        self._padding[kind] = padding
        gen = torch.Generator().manual_seed(1)
        flops = self._op_flops.get(kind_name, 1.0)
        max_rows = invariance.probe_rows(flops)
        # An attention op's rows each come from a request of their own (its own cache): fewer.
        max_rows, windows = (min(max_rows, 24), 48) if kind is OpKind.ATTENTION else (min(max_rows, 64), 192)
        budget = invariance.probe_budget(flops, max_rows)
        try:
            with torch.no_grad():
                for template in self._op_templates.get(kind_name, []):

                    def rows(n: int, t: Op = template) -> torch.Tensor:
                        x = torch.randn(n, *t.x.shape[1:], generator=gen)
                        return x.to(dtype=t.x.dtype, device=t.x.device)

                    def call(x: torch.Tensor, t: Op = template) -> list[torch.Tensor]:
                        if kind is OpKind.ATTENTION:
                            zero = torch.zeros(1, dtype=torch.long, device=x.device)
                            ops = [
                                Op(kind, t.layer, x[i : i + 1], cache=self.new_cache(), positions=zero)
                                for i in range(x.shape[0])
                            ]
                        else:
                            weight = (
                                None
                                if t.weight is None
                                else t.weight.new_ones((x.shape[0], *t.weight.shape[1:]))
                            )
                            ops = [Op(kind, t.layer, x, expert=t.expert, weight=weight)]
                        return _by_row(self._runners[kind](ops))

                    if not invariance.is_invariant(
                        call, rows, padding, max_rows, budget_rows=budget, max_windows=windows
                    ):
                        return False
        finally:
            self._padding[kind] = saved
        return True

    def _rows(self, ops: list[Op], kind: OpKind | None = None) -> tuple[torch.Tensor, list[int]]:
        """The ops' rows in one tensor, padded as op kind ``kind`` (default: the ops') is; their sizes."""
        padding = self._padding[kind or ops[0].kind]
        if len(ops) == 1:
            x = ops[0].x
            return _pad(x, *padding), [x.shape[0]]
        return _pad(torch.cat([op.x for op in ops]), *padding), [op.rows for op in ops]

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
        if len(ops) == 1 and self._rotary_shared:
            cos, sin = self._shared_rotary(v, ops[0].positions)
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
        outs = []
        queries = [q] if len(ops) == 1 else q.split(sizes)
        filled = append_all(
            [op.cache for op in ops],
            ops[0].layer,
            k.transpose(0, 1).split(sizes, dim=1),
            v.transpose(0, 1).split(sizes, dim=1),
        )
        threads = torch.get_num_threads()
        current = threads
        try:
            for qi, (keys, values) in zip(queries, filled):
                # The request's own size picks the thread count of all its work (expand_kv may
                # run GEMMs), so it is computed the same way in any batch.
                wanted = 1 if _small_attention(qi, keys.shape[1]) else threads
                if wanted != current:
                    torch.set_num_threads(wanted)
                    current = wanted
                keys, values = self.expand_kv(attn, keys, values)
                outs.append(_attend(qi, keys, values, attn.scaling, window, chunk=chunk, sinks=sinks))
        finally:
            if current != threads:
                torch.set_num_threads(threads)
        o = (outs[0] if len(outs) == 1 else torch.cat(outs)).reshape(n, -1)
        return self._split(self.attn_out(layer, _pad(o, *self._padding[OpKind.ATTENTION]), x), sizes)

    def _shared_rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Keyed on the positions tensor itself, which one forward pass hands to all its layers
        # (the memo keeps it alive, so its identity cannot be reused by another tensor).
        memo = self._rotary_memo
        if memo is not None and memo[0] is positions and memo[1].dtype == x.dtype:
            return memo[1], memo[2]
        cos, sin = self.rotary_embedding(0, x, positions)
        self._rotary_memo = (positions, cos, sin)
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
        return list(zip(self._split(x, sizes), self._split(weights, sizes), self._split(indices, sizes)))

    def _run_expert(self, ops: list[Op]) -> list[torch.Tensor]:
        x, sizes = self._rows(ops)
        if self.weighted_expert_input:
            w = ops[0].weight if len(ops) == 1 else torch.cat([op.weight for op in ops])
            w = torch.cat([w.to(x.dtype), w.new_zeros(x.shape[0] - w.shape[0], dtype=x.dtype)])
            return self._split(
                self.expert(self.moe_blocks[ops[0].layer], ops[0].expert, x * w[:, None]), sizes
            )
        y = self.expert(self.moe_blocks[ops[0].layer], ops[0].expert, x)[: sum(sizes)]
        w = ops[0].weight if len(ops) == 1 else torch.cat([op.weight for op in ops])
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
        such a stopped op: routing and partial sums as it left them, experts from ``expert`` on."""
        layer = ops[0].layer
        block = self.moe_blocks[layer]
        first = ops[0].partial
        if first is None:
            x, weights, indices, sizes = self._route(ops)
            out = torch.zeros_like(x)
            start = 0
        else:  # resuming stopped ops: their routing and partial sums, from their next expert on
            parts = [op.partial for op in ops]
            if len(parts) == 1:  # the sums accumulate in place: the pass's own tensor stays as it was
                x, weights, indices, out = first.x, first.weights, first.indices, first.out.clone()
            else:
                x, weights, indices, out = (
                    torch.cat([getattr(p, name) for p in parts])
                    for name in ("x", "weights", "indices", "out")
                )
            sizes = [op.rows for op in ops]
            start = first.next_expert
        experts = _expert_rows(indices.tolist(), start)
        for j, (e, rows, slots) in enumerate(experts):
            if len(rows) == 1:  # a lone row: views, no gather or scatter (the same sums)
                r, s = rows[0], slots[0]
                y = self._run_expert(
                    [Op(OpKind.EXPERT, layer, x[r : r + 1], expert=e, weight=weights[r, s : s + 1])]
                )
                out[r : r + 1] += y[0]
            else:
                at = torch.tensor(rows, device=x.device)
                w = weights[at, torch.tensor(slots, device=x.device)]
                y = self._run_expert([Op(OpKind.EXPERT, layer, x.index_select(0, at), expert=e, weight=w)])
                out.index_put_((at,), y[0], accumulate=True)
            if stop is not None and j + 1 < len(experts) and stop():
                parts = zip(*(self._split(t, sizes) for t in (x, weights, indices, out)))
                return [Partial(*p, next_expert=experts[j + 1][0]) for p in parts]
        shared = self._run_shared([Op(OpKind.SHARED, layer, x)])[0] if self.has_shared(block) else None
        outs = self._split(out, sizes)
        shareds = self._split(shared, sizes) if shared is not None else [None] * len(sizes)
        if ops[0].residual is not None:  # residual + (routed + shared), as the pass would add them
            return [op.residual + (o if s is None else o + s) for op, o, s in zip(ops, outs, shareds)]
        return list(zip(outs, shareds))

    def _run_mlp(self, ops: list[Op]) -> list[torch.Tensor]:
        layer = self.layers[ops[0].layer]
        x, sizes = self._rows(ops)
        return self._split(self.mlp_out(layer, self.dense_mlp(layer)(self.mlp_norm(layer)(x))), sizes)

    def _run_head(self, ops: list[Op]) -> list[torch.Tensor]:
        x, sizes = self._rows(ops)
        return self._split(self.logits(x), sizes)


def _expert_rows(indices: list[list[int]], start: int = 0) -> list[tuple[int, list[int], list[int]]]:
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


def _by_row(results: list[Any]) -> list[torch.Tensor]:
    """Ops' results as tensors with one row per input row: each component, concatenated over ops."""
    first = results[0]
    if isinstance(first, torch.Tensor):
        return [torch.cat(results)]
    return [torch.cat([r[i] for r in results]) for i in range(len(first))]


SERIAL_ATTENTION_MACS = 1 << 21
"""A request's attention with at most this many multiply-adds (queries x keys x query heads x
head dim; 2M is a decode step of 16 heads of 64 over 2048 keys) runs on one thread."""


def _small_attention(q: torch.Tensor, keys: int) -> bool:
    """Whether the attention of queries ``q`` ``[n, Hq, D]`` over ``keys`` keys is small enough to
    compute on one thread: a parallel region costs tens of microseconds on idle cores and up to a
    scheduler time slice (milliseconds) when another process holds one, far more than the second
    thread saves on a decode step. Depends only on the request's own shapes (and device: the
    thread count only concerns CPU kernels)."""
    return q.device.type == "cpu" and q.shape[0] * q.shape[1] * q.shape[2] * keys <= SERIAL_ATTENTION_MACS


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    *,
    chunk: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one request's query rows ``q`` ``[n, Hq, D]`` over its keys/values
    ``[Hkv, T, D]``: each row's heads' outputs ``[n, Hkv, Hq // Hkv, Dv]``, grouped by KV head.

    ``window``: a query sees only its last ``window`` keys; ``chunk``: only keys of its own
    ``chunk``-long block of positions; ``sinks`` ``[Hq]``: one extra logit per head in the softmax,
    whose probability mass is dropped (attends to nothing)."""
    n, total, kv_heads = q.shape[0], k.shape[1], k.shape[0]
    past = total - n
    mask = None
    causal = False
    limited = (window is not None and total > window) or (chunk is not None and total > chunk)
    if (n > 1 and past > 0) or limited or (sinks is not None and n > 1):
        qpos = torch.arange(past, total, device=q.device)[:, None]
        kpos = torch.arange(total, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        if chunk is not None:
            mask &= kpos // chunk == qpos // chunk
    elif n > 1:
        causal = True
    if n == 1:
        # A decode step: the query heads that share a KV head attend as the rows of one query
        # block ([1, Hkv, group, D]; the mask, one row, applies to each), so the kernel runs one
        # work item and one small GEMM per KV head rather than one per query head.
        q = q.reshape(1, kv_heads, -1, q.shape[-1])
    else:
        q = q.transpose(0, 1)[None]  # [1, Hq, n, D]
    if sinks is not None:
        out = _attend_with_sinks(q[0], k, v, scale, mask, sinks)[None]
    else:
        out = F.scaled_dot_product_attention(
            q,
            k[None],
            v[None],
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=q.shape[1] != kv_heads,
        )
    if n == 1:
        return out  # [1, Hkv, group, Dv]
    return out[0].transpose(0, 1).view(n, kv_heads, -1, out.shape[-1])


def _attend_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """:func:`_attend` with sink logits: q ``[Hq, n, D]``, or for one query ``[Hkv, group, D]``
    (each KV head's query heads as rows); returns q's shape with v's width."""
    group = q.shape[0] // k.shape[0]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    logits = torch.matmul(q, k.transpose(1, 2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    # Per head: [Hq, 1, 1] broadcast over a head's queries, or [Hkv, group, 1] for grouped rows.
    sink = sinks.to(logits.dtype).view(q.shape[0], -1, 1).expand(-1, q.shape[1], 1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
