"""DeepSeek-V3 (any checkpoint whose config.json says ``deepseek_v3``): multi-head latent attention
(qllm/models/mla.py) with interleaved rotary, a sigmoid router with grouped top-k and a score
correction bias, weights scaled by ``routed_scaling_factor``, a shared expert and leading dense
layers (``first_k_dense_replace``)."""

from qllm.models.mla import LatentAttention


class DeepseekV3(LatentAttention):
    family = "deepseek_v3"
    model_types = ("deepseek_v3", "sarvam_mla")  # sarvam_mla: the same architecture
