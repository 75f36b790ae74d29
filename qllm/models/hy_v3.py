"""Hunyuan V3: per-head q/k norm, a sigmoid router that chooses by bias-corrected scores (the
block's ``e_score_correction_bias``) and scales the weights, shared experts, dense layers where
``mlp_layer_types`` says so."""

import torch

from qllm.models.base import MoEModel


class HYV3(MoEModel):
    family = "hy_v3"
    model_types = ("hy_v3",)

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, weights, indices = block.gate(x, block.e_score_correction_bias)
        return weights, indices
