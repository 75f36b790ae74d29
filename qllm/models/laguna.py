"""Laguna: a softplus gate (per head or per channel) on the attention output, per-layer head
counts, per-head q/k norm, sliding-window and full layers with their own rotary parameters,
a sigmoid router with correction bias and optional logit soft-capping, routed output scaled by
``moe_routed_scaling_factor`` before the shared expert is added, dense first layers."""

import torch
import torch.nn.functional as F

from qllm.models.base import MoEModel


class Laguna(MoEModel):
    family = "laguna"
    model_types = ("laguna",)

    def rotary_embedding(self, i, x, positions):
        cos, sin = self.body.rotary_emb(x, positions[None], self.config.layer_types[i])
        return cos[0], sin[0]

    def attn_out(self, layer: torch.nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        gate = F.softplus(attn.g_proj(x).float()).to(o.dtype)
        if attn.gate_per_head:
            o = (o.view(o.shape[0], -1, self.head_dim) * gate[..., None]).view(o.shape[0], -1)
        else:
            o = o * gate
        return attn.o_proj(o)

    def routed_out(self, block: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y * block.routed_scaling_factor
