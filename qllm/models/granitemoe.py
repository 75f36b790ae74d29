"""Granite-MoE (and Granite-MoE-Shared): muP-style multipliers on the embeddings, on every
sublayer's residual contribution and on the logits; attention scaled by ``attention_multiplier``;
the MoE block is ``block_sparse_moe`` with a softmax-over-top-k router; the shared variant adds
a layer-level ``shared_mlp`` to the routed output."""

import torch

from qllm.models.base import MoEModel


class GraniteMoe(MoEModel):
    family = "granitemoe"
    model_types = ("granitemoe", "granitemoeshared")

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.shared_mlps = {
            layer.block_sparse_moe: getattr(layer, "shared_mlp", None) for layer in self.layers
        }

    def moe_block(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.block_sparse_moe

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, weights, indices = block.router(x)
        return weights, indices

    def has_shared(self, block: torch.nn.Module) -> bool:
        return self.shared_mlps[block] is not None

    def shared(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.shared_mlps[block](x)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(token_ids) * self.config.embedding_multiplier

    def attn_out(self, layer: torch.nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return super().attn_out(layer, o, x) * layer.residual_multiplier

    def mlp_out(self, layer: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y * layer.residual_multiplier

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) / self.config.logits_scaling
