"""Qwen2-MoE: routed experts plus an always-on shared expert scaled by a sigmoid gate."""

import torch

from qllm.models.base import MoEModel, sigmoid


class Qwen2Moe(MoEModel):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)

    def has_shared(self, block: torch.nn.Module) -> bool:
        return True

    def shared(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)

    def sliding_window(self, attn: torch.nn.Module) -> int | None:
        # Only layers marked "sliding_attention" carry the attribute.
        return getattr(attn, "sliding_window", None) or None
