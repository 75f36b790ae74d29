"""ERNIE-4.5-MoE: softmax router choosing by bias-corrected scores (``moe_statics``), shared
experts, MoE only on layers from ``moe_layer_start_index`` every ``moe_layer_interval``."""

from qllm.models.base import MoEModel


class Ernie45Moe(MoEModel):
    family = "ernie4_5_moe"
    model_types = ("ernie4_5_moe",)
