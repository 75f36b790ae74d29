"""OLMoE: q/k RMSNorm over the whole projection (not per head) and optional ``clip_qkv``."""

import torch

from qllm.models.base import MoEModel


class Olmoe(MoEModel):
    family = "olmoe"
    model_types = ("olmoe",)

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x)), attn.v_proj(x)
        clip = self.config.clip_qkv
        if clip is not None:
            q, k, v = (t.clamp(min=-clip, max=clip) for t in (q, k, v))
        n = x.shape[0]
        return q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim), v.view(n, -1, self.head_dim)
