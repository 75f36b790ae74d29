"""DeepSeek-V2 (and V2-Lite, whose queries skip the low-rank path): multi-head latent attention
(qllm/models/mla.py) with complex-valued rotary tables, a softmax router (greedy or
group-limited greedy top-k) scaled by ``routed_scaling_factor``, shared experts and leading
dense layers."""

import sys

import torch

from qllm.models.mla import LatentAttention


class DeepseekV2(LatentAttention):
    family = "deepseek_v2"
    model_types = ("deepseek_v2",)

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self._apply_rotary = sys.modules[type(self.attention(self.layers[0])).__module__].apply_rotary_emb

    def rotate(self, attn, q_rot: torch.Tensor, k_rot: torch.Tensor, table: torch.Tensor):
        # transformers' rotary takes [batch, heads, seq, dim] and a [batch, seq, dim / 2] table.
        q_rot, k_rot = self._apply_rotary(
            q_rot.transpose(0, 1)[None], k_rot.transpose(0, 1)[None], table[None]
        )
        return q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1)
