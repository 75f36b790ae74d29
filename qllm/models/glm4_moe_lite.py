"""GLM-4-MoE-Lite (``glm4_moe_lite``): multi-head latent attention (qllm/models/mla.py) with
DeepSeek-V3 routing (sigmoid, grouped top-k, correction bias, shared expert); dense layers are
named by ``mlp_layer_types``."""

from qllm.models.mla import LatentAttention


class Glm4MoeLite(LatentAttention):
    family = "glm4_moe_lite"
    model_types = ("glm4_moe_lite",)
