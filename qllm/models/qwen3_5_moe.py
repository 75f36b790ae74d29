"""Qwen3.5-MoE (text model): Qwen3-Next's layout (qllm/models/qwen3_next.py) with separate
``in_proj_qkv``/``in_proj_z``/``in_proj_b``/``in_proj_a`` projections in its gated DeltaNet
layers and multimodal rotary tables, which for text positions equal plain rotary."""

import torch

from qllm.models.gemm import linear
from qllm.models.qwen3_next import Qwen3Next


class Qwen35Moe(Qwen3Next):
    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe_text", "qwen3_5_moe")  # qwen3_5_moe: multimodal, loaded as its text model

    def mixer_inputs(self, mixer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = linear(x, mixer.in_proj_z.weight).view(x.shape[0], -1, mixer.head_v_dim)
        return linear(x, mixer.in_proj_qkv.weight), z, mixer.in_proj_b(x), mixer.in_proj_a(x)
