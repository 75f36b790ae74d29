"""Cohere2-MoE: parallel blocks (attention and MoE both read the same normed layer input),
rotary only on sliding-window layers (and dense prefix layers), interleaved rotary, optional
shared experts averaged with the routed ones, and scaled logits."""

import torch

from qllm.models.base import MoEModel


class Cohere2Moe(MoEModel):
    family = "cohere2_moe"
    model_types = ("cohere2_moe",)
    parallel_mlp = True

    def mlp_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.input_layernorm

    def rotary(self, attn, q, k, cos, sin):
        if attn.sliding_window is None and not attn.force_rope:
            return q, k  # global layers use no position embedding
        return super().rotary(attn, q, k, cos, sin)

    def has_shared(self, block: torch.nn.Module) -> bool:
        return block.num_shared_experts > 0

    def mlp_out(self, layer: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        block = layer.mlp
        if (
            getattr(block, "num_shared_experts", 0) > 0
            and block.shared_expert_combination_strategy == "average"
        ):
            return y / 2
        return y

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) * self.hf.logit_scale
