"""MiMo-V2-Flash: sliding-window layers with attention sinks and twice the KV heads of the full
layers, values narrower than keys and scaled by ``attention_value_scale``, partial rotary with its
own parameters per layer type, DeepSeek-V3 routing without a shared expert, dense layers named by
``mlp_layer_types``."""

import torch

from qllm.models.base import MoEModel
from qllm.models.gemm import linear


class MiMoV2Flash(MoEModel):
    family = "mimo_v2_flash"
    model_types = ("mimo_v2_flash",)

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        q = linear(x, attn.q_proj.weight, attn.q_proj.bias).view(n, -1, attn.head_dim)
        k = linear(x, attn.k_proj.weight, attn.k_proj.bias).view(n, -1, attn.head_dim)
        v = linear(x, attn.v_proj.weight, attn.v_proj.bias).view(n, -1, attn.v_head_dim) * attn.v_scale
        return q, k, v

    def attention_sinks(self, attn: torch.nn.Module) -> torch.Tensor | None:
        return attn.sinks  # None on full-attention layers

    def rotary_embedding(self, i, x, positions):
        cos, sin = self.body.rotary_emb(x, positions[None], self.config.layer_types[i])
        return cos[0], sin[0]
