"""gpt-oss: learned attention sinks, sliding-window layers alternating with full ones, a
softmax-over-top-k router with a bias, and experts with biases whose SwiGLU is clamped
(``swiglu_limit``) and interleaves gate and up columns in the fused ``[E, H, 2I]`` weight."""

import torch

from qllm.models.base import MoEModel, sigmoid


class GptOss(MoEModel):
    family = "gpt_oss"
    model_types = ("gpt_oss",)

    def moe_block(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.mlp

    def attention_sinks(self, attn: torch.nn.Module) -> torch.Tensor:
        return attn.sinks

    def route(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, weights, indices = block.router(x)
        return weights, indices

    def expert(self, block: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        experts = block.experts
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate = gate_up[..., ::2].clamp(max=experts.limit)
        up = gate_up[..., 1::2].clamp(min=-experts.limit, max=experts.limit)
        glu = gate * sigmoid(gate * experts.alpha)
        return ((up + 1) * glu) @ experts.down_proj[e] + experts.down_proj_bias[e]
