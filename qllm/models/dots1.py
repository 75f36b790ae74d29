"""dots.llm1: DeepSeek-V3-style routing (sigmoid, correction bias, groups), shared experts, dense
first layers, per-head q/k norm and sliding-window attention on the layers ``layer_types`` marks."""

from qllm.models.base import MoEModel


class Dots1(MoEModel):
    family = "dots1"
    model_types = ("dots1",)
