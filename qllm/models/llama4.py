"""Llama 4 (text model): chunked attention with rotary (a query sees only keys of its own
``attention_chunk_size`` block) interleaved with global NoPE layers whose queries are scaled by a
position-dependent temperature, an L2 q/k norm after rotary, complex-valued rotary tables, a
sigmoid top-1 router whose weight scales the expert's *input*, a shared expert, and dense
layers between MoE layers (``interleave_moe_layer_step``)."""

import math
import sys

import torch

from qllm.models.base import MoEModel, sigmoid


class Llama4(MoEModel):
    family = "llama4"
    model_types = ("llama4_text", "llama4")  # llama4: a multimodal checkpoint, loaded as its text model
    weighted_expert_input = True

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self._apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_emb

    def moe_block(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        return layer.feed_forward if layer.is_moe_layer else None

    def dense_mlp(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.feed_forward

    def attention_chunk(self, attn: torch.nn.Module) -> int | None:
        chunked = self.config.layer_types[attn.layer_idx] == "chunked_attention"
        return self.config.attention_chunk_size if chunked else None

    def rotary_embedding(self, i, x, positions):
        # Complex rotary table ``[N, head_dim / 2]``; the positions ride along for the NoPE
        # layers' temperature.
        return self.body.rotary_emb(x, positions[None])[0], positions

    def rotary(self, attn, q, k, freqs, positions):
        if attn.use_rope:
            q, k = (t[0] for t in self._apply_rotary(q[None], k[None], freqs[None]))
        if hasattr(attn, "qk_norm"):
            q, k = attn.qk_norm(q), attn.qk_norm(k)
        if attn.attn_temperature_tuning and not attn.use_rope:
            # Per position in Python: a vectorised log1p over the batch's positions could round a
            # row differently depending on how many rows share the call.
            scales = torch.tensor(
                [math.log1p((p + 1) // attn.floor_scale) * attn.attn_scale + 1.0 for p in positions.tolist()],
                device=q.device,
            )
            q = (q * scales[:, None, None]).to(q.dtype)
        return q, k

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The router's scores are the sigmoid of its top logits, as transformers' Llama4Router
        # computes them, with a sigmoid whose bits do not depend on the rows in the call.
        logits = torch.nn.Linear.forward(block.router, x)
        top, indices = torch.topk(logits, block.top_k, dim=1)
        return sigmoid(top.float()).to(top.dtype), indices

    def expert(self, block: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        experts = block.experts
        gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * experts.act_fn(gate)) @ experts.down_proj[e]

    def has_shared(self, block: torch.nn.Module) -> bool:
        return True

    def shared(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.shared_expert(x)
