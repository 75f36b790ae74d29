"""GLM-4-MoE: sigmoid router with a score-correction bias and group-limited top-k, one shared
expert added unscaled, the first ``first_k_dense_replace`` layers dense, partial rotary and
optional per-head q/k norm. All of it is transformers' own modules; only the experts run here."""

from qllm.models.base import MoEModel


class Glm4Moe(MoEModel):
    family = "glm4_moe"
    model_types = ("glm4_moe", "sarvam_moe")  # sarvam_moe: the same architecture
