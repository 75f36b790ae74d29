"""MiniMax-M2: q/k RMSNorm over the whole projection (before splitting heads), partial rotary,
sigmoid router whose choice adds the block's ``e_score_correction_bias``; no shared expert."""

import torch

from qllm.models.base import MoEModel


class MiniMaxM2(MoEModel):
    family = "minimax_m2"
    model_types = ("minimax_m2",)

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        q, k, v = attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x)), attn.v_proj(x)
        return q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim), v.view(n, -1, self.head_dim)

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, weights, indices = block.gate(x, block.e_score_correction_bias)
        return weights, indices
