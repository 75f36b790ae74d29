"""EXAONE-MoE: hybrid attention (sliding-window layers with rotary, full layers without position
embedding when a window is configured), per-head q/k norm, DeepSeek-V3-style routing with a
shared expert, dense first layers."""

import torch

from qllm.models.base import MoEModel


class ExaoneMoe(MoEModel):
    family = "exaone_moe"
    model_types = ("exaone_moe",)

    def sliding_window(self, attn: torch.nn.Module) -> int | None:
        return attn.sliding_window if attn.is_sliding else None

    def rotary(self, attn, q, k, cos, sin):
        if attn.sliding_window is not None and not attn.is_sliding:
            return q, k  # full-attention layers of a hybrid model use no position embedding (NoPE)
        return super().rotary(attn, q, k, cos, sin)
