"""Qwen3-Next: gated DeltaNet layers (qllm/models/linear_attention.py) interleaved with full
attention whose queries carry a sigmoid output gate (``q_proj`` yields query and gate per head),
per-head q/k norm and partial rotary; a softmax top-k router and a shared expert scaled by a
sigmoid gate, as Qwen2-MoE."""

import torch

from qllm.models.base import sigmoid
from qllm.models.gemm import linear
from qllm.models.linear_attention import HybridLinearAttention


class Qwen3Next(HybridLinearAttention):
    family = "qwen3_next"
    model_types = ("qwen3_next",)

    def mixer_inputs(self, mixer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        qkvz, ba = linear(x, mixer.in_proj_qkvz.weight), linear(x, mixer.in_proj_ba.weight)
        q, k, v, z, b, a = mixer.fix_query_key_value_ordering(qkvz[None], ba[None])
        n = x.shape[0]
        mixed = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=-1)
        return mixed, z[0], b[0], a[0]

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        q, _ = linear(x, attn.q_proj.weight).view(n, -1, 2 * self.head_dim).chunk(2, dim=-1)
        k = linear(x, attn.k_proj.weight).view(n, -1, self.head_dim)
        v = linear(x, attn.v_proj.weight).view(n, -1, self.head_dim)
        return attn.q_norm(q), attn.k_norm(k), v

    def attn_out(self, layer: torch.nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        n = x.shape[0]
        # The gate is the second half of each head's q_proj output (recomputed from the normed input).
        _, gate = linear(x, attn.q_proj.weight).view(n, -1, 2 * self.head_dim).chunk(2, dim=-1)
        return linear(o * sigmoid(gate.reshape(n, -1)), attn.o_proj.weight)

    def has_shared(self, block: torch.nn.Module) -> bool:
        return True

    def shared(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
