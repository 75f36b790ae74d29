"""AFMoE: sandwich norms around attention and MoE, a sigmoid gate on the attention output,
rotary only on sliding-window layers (global layers use no position embedding), a sigmoid
router whose choice adds ``expert_bias`` and whose weights scale by ``route_scale``, shared
experts, dense first layers and optional muP embedding scaling."""

import torch

from qllm.models.base import MoEModel, sigmoid


class Afmoe(MoEModel):
    family = "afmoe"
    model_types = ("afmoe",)

    def moe_block(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        return layer.mlp if hasattr(layer.mlp, "router") else None

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        h = super().embed(token_ids)
        return h * self.config.hidden_size**0.5 if self.config.mup_enabled else h

    def rotary(self, attn, q, k, cos, sin):
        return super().rotary(attn, q, k, cos, sin) if attn.is_local_attention else (q, k)

    def attn_out(self, layer: torch.nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        return layer.post_attention_layernorm(attn.o_proj(o * sigmoid(attn.gate_proj(x))))

    def mlp_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.pre_mlp_layernorm

    def mlp_out(self, layer: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        return layer.post_mlp_layernorm(y)

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, weights, indices = block.router(x[None], block.expert_bias)
        return weights, indices
