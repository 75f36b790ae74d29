"""The model executor: a Hugging Face MoE model run as a stream of schedulable ops.

:class:`MoEModel` wraps a transformers ``*ForCausalLM`` and reuses its embeddings, attention
projections, rotary embedding, norms, routers and lm_head. Experts are computed here from the
fused 3D weights (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``), in place.

:meth:`MoEModel.forward` is the forward pass of one request written as a generator that yields an
:class:`~qllm.kernel.runtime.ops.Op` at attention and at each MoE layer: one grouped op that stops
between experts when a request arrives (``moe_granularity="layer"``, the default), or the router
and every expert as ops of their own (``"expert"``); :meth:`MoEModel.run` computes a list of ops
with the same key as one batched call. A family adapter overrides the few
hooks where its architecture differs (see ``qllm/models/qwen2_moe.py`` for a shared expert).

This module holds the hooks; the op runners that call them are in qllm/models/executor.py, the
calibration of their row padding in qllm/models/calibration.py and softmax attention in
qllm/models/attention.py.
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from typing import Any, ClassVar

import torch

from qllm.kernel.runtime.cache import BlockPool, KVCache
from qllm.kernel.runtime.ops import MOE_GRANULARITIES, MoEGranularity, Op
from qllm.kernel.runtime.passes import Pass
from qllm.models import swiglu
from qllm.models.calibration import CalibratedExecutor
from qllm.models.gemm import linear, linear_cat

__all__ = ["MOE_GRANULARITIES", "MoEModel"]


VECTOR_CHUNK = 64
"""Elements a vectorised torch kernel takes at a time, or a multiple of it (32 with AVX-512)."""


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``torch.sigmoid(x)`` with each element's bits independent of the tensor's size: torch runs
    a different (scalar) code path on the last elements that do not fill a vector chunk, so an
    element's sigmoid depends on how many rows share the call; here every element takes the
    vector path (the input is padded to a multiple of :data:`VECTOR_CHUNK` elements)."""
    flat = x.reshape(-1)
    extra = -flat.numel() % VECTOR_CHUNK
    if extra:
        flat = torch.cat([flat, flat.new_zeros(extra)])
    return torch.sigmoid(flat)[: x.numel()].view(x.shape)


class MoEModel(CalibratedExecutor):
    """Executor for one loaded model. Subclass per family; override hooks, not the loop."""

    family: ClassVar[str] = ""
    """Name shown by ``qllm models``."""
    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.model_type`` values this adapter runs."""
    parallel_mlp: ClassVar[bool] = False
    """The MoE block (or MLP) reads the layer's input, as attention does, not the attention output."""
    weighted_expert_input: ClassVar[bool] = False
    """The routing weight scales each expert's input rather than its output (Llama 4)."""
    prefix_cacheable: ClassVar[bool] = True
    """A request's state is each token's keys and values, so a prompt prefix's may be shared
    (qllm/kernel/runtime/prefix.py)."""

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
        # Attention reads the cache as it is (decode steps then run in one C call: attention.py).
        self._plain_kv = type(self).expand_kv is MoEModel.expand_kv
        # A family's output transforms, applied per request by a pass (None: the identity).
        self.routed_out_hook = None if type(self).routed_out is MoEModel.routed_out else self.routed_out
        self.mlp_out_hook = None if type(self).mlp_out is MoEModel.mlp_out else self.mlp_out
        # Without them a grouped MoE op can return the new residual stream itself.
        self.moe_adds_residual = self.routed_out_hook is None and self.mlp_out_hook is None
        super().__init__()  # the executor's runners and row padding; packs the weights

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
        """Expert ``e`` on rows ``x``, computed from the fused weights (no copy): in one call of
        qllm's SwiGLU kernel where it fits them (:meth:`swiglu_experts`)."""
        experts = block.experts
        if self.swiglu_experts(block) is not None:
            return swiglu.expert(x, experts.gate_up_proj[e], experts.down_proj[e])
        gate, up = linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        return linear(experts.act_fn(gate) * up, experts.down_proj[e])

    def swiglu_experts(self, block: torch.nn.Module) -> torch.nn.Module | None:
        """The block's experts where this adapter computes them with qllm's SwiGLU kernels
        (qllm/models/swiglu.py: the base :meth:`expert` hook, output-weighted, weights the kernels
        fit), else None. A grouped MoE op then runs all its routed experts in one call."""
        if type(self).expert is not MoEModel.expert or self.weighted_expert_input:
            return None
        experts = getattr(block, "experts", None)
        return experts if experts is not None and swiglu.fits(experts) else None

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
        self,
        cache: KVCache,
        token_ids: torch.Tensor,
        *,
        logits: bool = True,
        moe_granularity: MoEGranularity = "expert",
    ) -> Generator[Op, Any, torch.Tensor | None]:
        """Forward pass of ``token_ids`` (1-D) appended to ``cache``; returns the last row's logits
        (None with ``logits=False``, for all but the last chunk of a chunked prefill).

        Yields an op at each schedulable step and expects that op's result back: attention, then
        per MoE layer the router, each expert and the shared expert (``moe_granularity="expert"``)
        or one grouped op (``moe_granularity="layer"``). A one-segment
        :class:`~qllm.kernel.runtime.passes.Pass`.
        """
        run = Pass.start(self, [(cache, token_ids, logits, None)], moe_granularity=moe_granularity)
        op = run.pending
        while op is not None:
            op = run.advance((yield op))
        return run.logits[0]
