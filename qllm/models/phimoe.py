"""Phi-3.5-MoE: LayerNorm (not RMSNorm) everywhere, biased attention and lm_head, and a
SparseMixer router (``block.router``) that picks the top-2 experts one at a time."""

import torch

from qllm.models.base import MoEModel


class Phimoe(MoEModel):
    family = "phimoe"
    model_types = ("phimoe",)

    def moe_block(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        return layer.mlp if hasattr(layer.mlp, "router") else None

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, weights, indices = block.router(x)
        return weights, indices
