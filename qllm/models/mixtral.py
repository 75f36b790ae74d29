"""Mixtral: top-k softmax router, SwiGLU experts, no shared expert. The reference layout."""

from qllm.models.base import MoEModel


class Mixtral(MoEModel):
    family = "mixtral"
    model_types = ("mixtral",)
