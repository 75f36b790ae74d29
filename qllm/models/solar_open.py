"""Solar Open: GLM-4-MoE-style layers (sigmoid group-limited router, one shared expert) without
dense layers or q/k norm."""

from qllm.models.base import MoEModel


class SolarOpen(MoEModel):
    family = "solar_open"
    model_types = ("solar_open",)
