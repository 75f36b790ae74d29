"""Qwen3-MoE: per-head q/k RMSNorm in attention; ``mlp_only_layers`` and ``decoder_sparse_step``
make some layers dense (their ``mlp`` has no experts and runs as one MLP op)."""

from qllm.models.base import MoEModel


class Qwen3Moe(MoEModel):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
