"""Kolibri-1: sandwich norms (RMSNorm after attention and after the MoE block as well as before),
hybrid sliding-window/global attention with rotary only on sliding layers, per-head q/k norm,
sigmoid router with a correction bias, and a shared expert."""

import torch

from qllm.models.exaone_moe import ExaoneMoe


class Kolibri1(ExaoneMoe):
    family = "kolibri1"
    model_types = ("kolibri1",)

    def attn_out(self, layer: torch.nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return layer.post_self_attn_layernorm(layer.self_attn.o_proj(o))

    def mlp_out(self, layer: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        return layer.post_mlp_layernorm(y)
