"""Hunyuan-MoE (V1): q/k RMSNorm applied after rotary embedding, softmax top-k router, and a
shared MLP (``shared_mlp``) added unscaled to the routed experts."""

import torch

from qllm.models.base import MoEModel


class HunyuanV1Moe(MoEModel):
    family = "hunyuan_v1_moe"
    model_types = ("hunyuan_v1_moe",)

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        return tuple(proj(x).view(n, -1, self.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def rotary(self, attn, q, k, cos, sin):
        q, k = super().rotary(attn, q, k, cos, sin)
        return attn.query_layernorm(q), attn.key_layernorm(k)

    def has_shared(self, block: torch.nn.Module) -> bool:
        return True

    def shared(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.shared_mlp(x)
