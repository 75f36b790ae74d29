"""Granite-MoE-SWA: Granite-MoE-Shared (qllm/models/granitemoe.py) with learned attention sinks,
sliding-window layers (``layer_types``) and a rotary base per layer (``layer_rope_theta``; 0 means
no position embedding for that layer)."""

import torch

from qllm.models.granitemoe import GraniteMoe


class GraniteMoeSwa(GraniteMoe):
    family = "granitemoe_swa"
    model_types = ("granitemoe_swa",)

    def attention_sinks(self, attn: torch.nn.Module) -> torch.Tensor:
        return attn.sinks

    def rotary_embedding(self, i, x, positions):
        theta = self.config.layer_rope_theta[i]
        if not theta:  # NoPE: the tables are unused
            return positions, positions
        rotary = next(r for r in self.body.rotary_embs if r.config.rope_parameters["rope_theta"] == theta)
        cos, sin = rotary(x, positions[None])
        return cos[0], sin[0]

    def rotary(self, attn, q, k, cos, sin):
        if not self.config.layer_rope_theta[attn.layer_idx]:
            return q, k
        return super().rotary(attn, q, k, cos, sin)
