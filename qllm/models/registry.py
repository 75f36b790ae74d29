"""The family adapters, and which one runs a model's config.

An adapter is a :class:`~qllm.models.base.MoEModel` subclass naming the ``config.model_type``
values it runs; :data:`FAMILIES` lists them in the order :func:`adapter_for` tries them. Model
types qllm knows and refuses (qllm/models/refused.py) fail with their reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qllm.models.afmoe import Afmoe
from qllm.models.base import MoEModel
from qllm.models.cohere2_moe import Cohere2Moe
from qllm.models.dbrx import Dbrx
from qllm.models.deepseek_v2 import DeepseekV2
from qllm.models.deepseek_v3 import DeepseekV3
from qllm.models.dots1 import Dots1
from qllm.models.ernie4_5_moe import Ernie45Moe
from qllm.models.errors import ModelLoadError
from qllm.models.exaone_moe import ExaoneMoe
from qllm.models.flex_olmo import FlexOlmo
from qllm.models.glm4_moe import Glm4Moe
from qllm.models.glm4_moe_lite import Glm4MoeLite
from qllm.models.gpt_oss import GptOss
from qllm.models.granitemoe import GraniteMoe
from qllm.models.granitemoe_swa import GraniteMoeSwa
from qllm.models.hunyuan_v1_moe import HunyuanV1Moe
from qllm.models.hy_v3 import HYV3
from qllm.models.kolibri1 import Kolibri1
from qllm.models.laguna import Laguna
from qllm.models.llama4 import Llama4
from qllm.models.mellum import Mellum
from qllm.models.mimo_v2_flash import MiMoV2Flash
from qllm.models.minimax_m2 import MiniMaxM2
from qllm.models.mistral4 import Mistral4
from qllm.models.mixtral import Mixtral
from qllm.models.olmoe import Olmoe
from qllm.models.phimoe import Phimoe
from qllm.models.qwen2_moe import Qwen2Moe
from qllm.models.qwen3_5_moe import Qwen35Moe
from qllm.models.qwen3_moe import Qwen3Moe
from qllm.models.qwen3_next import Qwen3Next
from qllm.models.refused import REFUSED
from qllm.models.solar_open import SolarOpen

FAMILIES: tuple[type[MoEModel], ...] = (
    Mixtral,
    Qwen3Moe,
    Qwen2Moe,
    Olmoe,
    Glm4Moe,
    Dots1,
    Ernie45Moe,
    SolarOpen,
    ExaoneMoe,
    HunyuanV1Moe,
    MiniMaxM2,
    Phimoe,
    Kolibri1,
    FlexOlmo,
    Afmoe,
    Mellum,
    Laguna,
    Cohere2Moe,
    HYV3,
    GraniteMoe,
    GptOss,
    Llama4,
    Dbrx,
    DeepseekV3,
    DeepseekV2,
    Glm4MoeLite,
    Mistral4,
    Qwen3Next,
    Qwen35Moe,
    GraniteMoeSwa,
    MiMoV2Flash,
)
"""Adapters tried in order by :func:`adapter_for`."""


def supported_model_types() -> list[str]:
    return [t for fam in FAMILIES for t in fam.model_types]


def refused(model_type: Any) -> ModelLoadError | None:
    """The error for a model type qllm knows and refuses (:data:`qllm.models.refused.REFUSED`), else None."""
    if model_type not in REFUSED:
        return None
    return ModelLoadError(
        f"model_type={model_type!r} is not supported: {REFUSED[model_type]}; "
        f"supported families: {', '.join(supported_model_types())}"
    )


def adapter_for(config: Any) -> type[MoEModel]:
    for fam in FAMILIES:
        if fam.supports(config):
            return fam
    if (error := refused(getattr(config, "model_type", None))) is not None:
        raise error
    raise unsupported(getattr(config, "model_type", None), vars(config))


def unsupported(model_type: Any, config: Mapping[str, Any], where: str = "") -> ModelLoadError:
    """The error for a model type no family runs: qllm serves Mixture-of-Experts models, and a
    config with no expert settings is named as a dense one."""
    dense = not any("expert" in str(key) for key in config)
    what = "a dense (non-MoE) model" if dense else "not one of the MoE families qllm runs"
    return ModelLoadError(
        f"{where}model_type={model_type!r} is {what}: qllm serves Mixture-of-Experts models only. "
        f"Supported families (`qllm models` lists them with presets): "
        f"{', '.join(supported_model_types())}"
    )
