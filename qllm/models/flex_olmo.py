"""FlexOlmo: OLMo-2 layers (no norm before attention or MLP; RMSNorm on each sublayer's output
before the residual add; q/k RMSNorm over the whole projection) with a softmax top-k MoE."""

import torch

from qllm.models.base import MoEModel

_IDENTITY = torch.nn.Identity()


class FlexOlmo(MoEModel):
    family = "flex_olmo"
    model_types = ("flex_olmo",)

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        q, k, v = attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x)), attn.v_proj(x)
        return q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim), v.view(n, -1, self.head_dim)

    def attn_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        return _IDENTITY

    def mlp_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        return _IDENTITY

    def attn_out(self, layer: torch.nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return layer.post_attention_layernorm(layer.self_attn.o_proj(o))

    def mlp_out(self, layer: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        return layer.post_feedforward_layernorm(y)
