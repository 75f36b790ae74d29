"""Hybrid models whose layers mix full attention with linear attention (gated DeltaNet).

A linear-attention layer keeps no growing KV cache. Per request it holds two fixed-size tensors in
the request's cache (:meth:`qllm.kernel.runtime.cache.KVCache.update_state`), exactly what transformers caches:
the last ``linear_conv_kernel_dim`` inputs of its short causal convolution ``[conv_dim, kernel]``,
and the recurrent state of the delta rule ``[value_heads, key_dim, value_dim]``. The tensor
manager counts, offloads and restores them with the KV buffers.

Projections and the output norm run batched over all requests' rows; the convolution and the
delta rule run per request over its own state: the chunked form for a prefill (or a first token),
the recurrent form for a decode step, as transformers chooses. The convolution and delta-rule
functions are transformers' own, taken from the model's module like its rotary functions.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from qllm.kernel.runtime.ops import Op
from qllm.models.base import MoEModel
from qllm.models.gemm import linear

LINEAR_KINDS = ("linear_attention",)
"""``config.layer_types`` entries run by :class:`HybridLinearAttention` (gated DeltaNet)."""


class HybridLinearAttention(MoEModel):
    """Executor for models whose ``config.layer_types`` interleave gated DeltaNet layers
    (``linear_attention``) with full attention; family adapters supply the mixer's projections."""

    # A linear layer's state sums the whole prefix in fixed-size tensors, not per-token blocks.
    prefix_cacheable = False

    def __init__(self, model: Any, tokenizer: Any = None, **kwargs: Any):
        unknown = sorted(set(model.config.layer_types) - {"full_attention", *LINEAR_KINDS})
        if unknown:
            from qllm.models.errors import ModelLoadError

            raise ModelLoadError(
                f"linear attention of kind {unknown[0]!r} not supported (qllm runs gated DeltaNet layers)"
            )
        super().__init__(model, tokenizer, **kwargs)
        self.linear_layers = frozenset(i for i, t in enumerate(self.config.layer_types) if t in LINEAR_KINDS)
        full = next(layer.self_attn for layer in self.layers if hasattr(layer, "self_attn"))
        self.head_dim = full.head_dim
        self._rope = sys.modules[type(full).__module__].apply_rotary_pos_emb
        mixer = next(layer.linear_attn for layer in self.layers if hasattr(layer, "linear_attn"))
        module = sys.modules[type(mixer).__module__]
        self._conv_fn, self._conv_update = module.causal_conv1d_fn, module.causal_conv1d_update
        self._chunk_rule, self._recurrent_rule = (
            module.torch_chunk_gated_delta_rule,
            module.torch_recurrent_gated_delta_rule,
        )

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attn if hasattr(layer, "self_attn") else layer.linear_attn

    # ---------------------------------------------------------------- gated DeltaNet hooks
    def mixer_inputs(self, mixer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """From normed rows ``x`` ``[N, hidden]``: the convolution's input ``[N, conv_dim]``
        (queries, keys, values), the output gate ``z`` ``[N, v_heads, v_dim]`` and the ``b``,
        ``a`` projections ``[N, v_heads]``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- kernel side
    def _run_attention(self, ops: list[Op]) -> list[torch.Tensor]:
        if ops[0].layer not in self.linear_layers:
            return super()._run_attention(ops)
        layer = self.layers[ops[0].layer]
        mixer = layer.linear_attn
        x, sizes = self._rows(ops)
        x = self.attn_norm(layer)(x)
        mixed, z, b, a = self.mixer_inputs(mixer, x)
        # Everything between the projections runs per request, element-wise maps included: a
        # vectorised loop treats a ragged tail of elements differently, so over the whole batch a
        # row's gate or decay could depend on how many rows share the call.
        outs = []
        start = 0
        for op, rows in zip(ops, sizes):
            part = slice(start, start + rows)
            start += rows
            beta = b[part].sigmoid()
            decay = -mixer.A_log.float().exp() * F.softplus(a[part].float() + mixer.dt_bias)
            core = self._delta_net(mixer, op, mixed[part], decay, beta)
            core = mixer.norm(core.reshape(-1, core.shape[-1]), z[part].reshape(-1, z.shape[-1]))
            outs.append(core.view(rows, -1))
        core = outs[0] if len(outs) == 1 else torch.cat(outs)
        core = torch.cat([core, core.new_zeros((x.shape[0] - core.shape[0], core.shape[1]))])  # padded as x
        return self._split(linear(core, mixer.out_proj.weight), sizes)

    def _delta_net(
        self, mixer, op: Op, mixed: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """One request's convolution and delta rule over its ``n`` new rows; updates its state."""
        layer, n = op.layer, mixed.shape[0]
        state = op.cache.state(layer)
        kernel = mixer.conv_kernel_size
        weight = mixer.conv1d.weight.squeeze(1)
        x = mixed.T[None]  # [1, conv_dim, n]
        if state is not None and n == 1:
            conv_state = state[0][None].clone()
            x = self._conv_update(x, conv_state, weight, mixer.conv1d.bias, mixer.activation)
        else:
            full = x if state is None else torch.cat([state[0][None], x], dim=-1)
            if state is None and n < kernel:
                full = F.pad(full, (kernel - n, 0))
            conv_state = full[..., -kernel:].clone()
            x = self._conv_fn(full, weight, mixer.conv1d.bias, activation=mixer.activation)[..., -n:]
        q, k, v = x[0].T.split([mixer.key_dim, mixer.key_dim, mixer.value_dim], dim=-1)
        q = q.reshape(1, n, -1, mixer.head_k_dim)
        k = k.reshape(1, n, -1, mixer.head_k_dim)
        v = v.reshape(1, n, -1, mixer.head_v_dim)
        rule = self._recurrent_rule if state is not None and n == 1 else self._chunk_rule
        out, recurrent = rule(
            q,
            k,
            v,
            g=decay[None],
            beta=beta[None],
            initial_state=None if state is None else state[1][None],
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        op.cache.update_state(layer, [conv_state[0], recurrent[0]], n)
        return out[0]
