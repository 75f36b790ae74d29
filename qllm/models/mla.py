"""Multi-head latent attention (MLA), shared by the DeepSeek-V2/V3 family and its descendants.

Each token's keys and values are compressed into one latent vector (``kv_a_proj_with_mqa`` then
``kv_a_layernorm``, ``kv_lora_rank`` wide) plus one rotary key shared by all heads
(``qk_rope_head_dim`` wide). The request's cache holds exactly these two, as transformers' cache
does: the rotary key as the cache's keys ``[1, T, qk_rope_head_dim]`` and the latent as its values
``[1, T, kv_lora_rank]``. Before attending, the latents are expanded into per-head keys and values
with ``kv_b_proj`` (transformers' ``expand_kv``); queries come from ``q_proj`` or the low-rank
``q_a_proj``/``q_a_layernorm``/``q_b_proj`` and carry a position-free part and a rotary part.
"""

from __future__ import annotations

import sys

import torch

from qllm.kernel.runtime.cache import BlockPool, KVCache
from qllm.models.base import MoEModel


class LatentAttention(MoEModel):
    """Executor for models whose attention is MLA; the family adapters add routing and rotary details."""

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        attn = self.attention(self.layers[0])
        self.kv_lora_rank, self.rope_dim = attn.kv_lora_rank, attn.qk_rope_head_dim
        self._rope_interleaved = getattr(
            sys.modules[type(attn).__module__], "apply_rotary_pos_emb_interleave", None
        )

    def new_cache(self, pool: BlockPool | None = None) -> KVCache:
        # Per layer: the rotary keys [1, T, rope] as keys and the latents [1, T, kv_lora_rank] as values.
        return KVCache(self.num_layers, 1, self.rope_dim, self.dtype, self.device, pool)

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries ``[N, heads, qk_head_dim]``, the shared rotary key ``[N, 1, rope]`` (before
        rotary) and the normed latent ``[N, 1, kv_lora_rank]``."""
        n = x.shape[0]
        if attn.q_lora_rank is None:
            q = attn.q_proj(x)
        else:
            q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
        latent, k_rot = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
        return (
            q.view(n, -1, attn.qk_head_dim),
            k_rot.view(n, 1, -1),
            attn.kv_a_layernorm(latent).view(n, 1, -1),
        )

    def rotary_embedding(self, i, x, positions):
        # One tensor per table so that batched calls can concatenate it: cos and sin stacked
        # ``[N, 2, rope]`` (or the complex table); the positions ride along for query scaling.
        table = self.body.rotary_emb(x, positions[None])
        table = torch.stack([t[0] for t in table], dim=1) if isinstance(table, tuple) else table[0]
        return table, positions

    def rotary(self, attn, q, k_rot, table, positions):
        q_pass, q_rot = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
        q_rot, k_rot = self.rotate(attn, q_rot, k_rot, table)
        return self.scale_query(torch.cat([q_pass, q_rot], dim=-1), positions), k_rot

    def rotate(self, attn, q_rot: torch.Tensor, k_rot: torch.Tensor, table: torch.Tensor):
        """Rotary on the rotary parts of queries ``[N, heads, rope]`` and the shared key ``[N, 1, rope]``."""
        cos, sin = table[:, 0], table[:, 1]
        interleaved = getattr(self.config, "rope_interleave", False)
        return (self._rope_interleaved if interleaved else self._rope)(q_rot, k_rot, cos, sin)

    def scale_query(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries after rotary, scaled where the family scales them by position."""
        return q

    def expand_kv(self, attn, keys, values):
        k, v = attn.expand_kv(values[None], keys[None])  # (latent, rotary key), as transformers passes them
        return k[0], v[0]
