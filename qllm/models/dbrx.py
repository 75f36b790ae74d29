"""DBRX: the decoder is ``transformer`` (``wte``, ``blocks``, ``norm_f``); each block's
``norm_attn_norm`` holds the pre-attention LayerNorm, attention with one fused ``Wqkv``
projection clamped to ``clip_qkv``, and the pre-MoE LayerNorm; a softmax top-k router whose
weights are p-normalised (``moe_normalize_expert_weights``); experts as three stacked 2D weights."""

from types import SimpleNamespace

import torch

from qllm.models.base import MoEModel
from qllm.models.gemm import linear


class Dbrx(MoEModel):
    family = "dbrx"
    model_types = ("dbrx",)

    def decoder(self, model):
        t = model.transformer
        return SimpleNamespace(embed_tokens=t.wte, layers=t.blocks, norm=t.norm_f, rotary_emb=t.rotary_emb)

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.norm_attn_norm.attn

    def attn_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.norm_attn_norm.norm_1

    def mlp_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.norm_attn_norm.norm_2

    def moe_block(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.ffn

    def qkv(self, attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        qkv = linear(x, attn.Wqkv.weight)
        if attn.clip_qkv is not None:
            qkv = qkv.clamp(min=-attn.clip_qkv, max=attn.clip_qkv)
        kv = attn.num_key_value_heads * self.head_dim
        q, k, v = qkv.split([attn.hidden_size, kv, kv], dim=-1)
        return q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim), v.view(n, -1, self.head_dim)

    def attn_out(self, layer: torch.nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return linear(o, self.attention(layer).out_proj.weight)

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return block.route_tokens_to_experts(block.router(x))

    def expert(self, block: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        mlp = block.experts.mlp
        shape = (-1, mlp.ffn_hidden_size, mlp.hidden_size)
        w1, v1, w2 = (w.view(shape)[e] for w in (mlp.w1, mlp.v1, mlp.w2))
        return (mlp.activation_fn(linear(x, w1)) * linear(x, v1)) @ w2
