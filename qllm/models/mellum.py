"""Mellum: Qwen3-MoE-style layers (per-head q/k norm, softmax top-k router, optional dense layers
by ``mlp_layer_types``) with sliding-window and full-attention layers, each type with its own
rotary parameters."""

from qllm.models.base import MoEModel


class Mellum(MoEModel):
    family = "mellum"
    model_types = ("mellum",)

    def rotary_embedding(self, i, x, positions):
        cos, sin = self.body.rotary_emb(x, positions[None], self.config.layer_types[i])
        return cos[0], sin[0]
