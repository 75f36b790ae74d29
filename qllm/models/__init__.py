"""Model families, presets and loading.

``load_model(spec)`` accepts a preset name (``qllm models`` lists them), a local Hugging Face
directory (``config.json``, ``*.safetensors``, tokenizer files) or an already-built
``(PreTrainedModel, tokenizer)`` pair, and returns the family's :class:`MoEModel` executor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qllm.models.afmoe import Afmoe
from qllm.models.base import MoEModel
from qllm.models.cohere2_moe import Cohere2Moe
from qllm.models.dbrx import Dbrx
from qllm.models.deepseek_v2 import DeepseekV2
from qllm.models.deepseek_v3 import DeepseekV3
from qllm.models.dots1 import Dots1
from qllm.models.ernie4_5_moe import Ernie45Moe
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded: the message names what is wrong and what is supported."""


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
    raise ModelLoadError(
        f"unsupported architecture model_type={getattr(config, 'model_type', None)!r}; "
        f"supported families: {', '.join(supported_model_types())}"
    )


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def load_model(
    spec: Any,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    batch_invariant: bool = True,
) -> MoEModel:
    """Load ``spec`` (preset name, directory, ``(model, tokenizer)`` pair or MoEModel) as an executor."""
    if isinstance(spec, MoEModel):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        model, tokenizer = spec
        return _executor(model, tokenizer, batch_invariant)
    if hasattr(spec, "config") and hasattr(spec, "model"):
        return _executor(spec, None, batch_invariant)
    if not isinstance(spec, (str, Path)):
        raise ModelLoadError(
            f"cannot load a model from {type(spec).__name__}; pass a preset name or a directory"
        )
    from qllm.models.presets import PRESETS

    torch_dtype = resolve_dtype(dtype)
    if str(spec) in PRESETS:
        model, tokenizer = PRESETS[str(spec)].build(torch_dtype)
    else:
        model, tokenizer = load_directory(Path(spec), torch_dtype)
    model.to(device)
    return _executor(model, tokenizer, batch_invariant)


def _executor(model: Any, tokenizer: Any, batch_invariant: bool) -> MoEModel:
    executor = adapter_for(model.config)(model, tokenizer, batch_invariant=batch_invariant)
    if batch_invariant:
        executor.calibrate()  # at load, so its cost and its findings are known before serving
    return executor


def _bad_directory(problem: str) -> ModelLoadError:
    return ModelLoadError(
        f"{problem}; expected a local Hugging Face model directory (config.json, *.safetensors, tokenizer) "
        f"of a supported family: {', '.join(supported_model_types())}"
    )


DEQUANTIZED_ON_LOAD = {"mxfp4": "Mxfp4Config", "fp8": "FineGrainedFP8Config"}
"""Checkpoint quantization methods that transformers dequantizes on load (gpt-oss MXFP4 experts,
DeepSeek FP8 blocks), by ``quant_method``; qllm computes experts from the unquantized weights."""


def _dequantize_on_load(raw: dict, path: Path) -> dict[str, Any]:
    """``from_pretrained`` arguments that dequantize a quantized checkpoint, or a ModelLoadError."""
    quantization = raw.get("quantization_config")
    if not quantization:
        return {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method not in DEQUANTIZED_ON_LOAD:
        raise ModelLoadError(
            f"model directory {str(path)!r} is quantized (quant_method={method!r}), which qllm cannot run: it "
            f"computes experts from unquantized weights; checkpoints quantized with "
            f"{', '.join(DEQUANTIZED_ON_LOAD)} are dequantized on load, others need an unquantized copy"
        )
    import transformers

    return {"quantization_config": getattr(transformers, DEQUANTIZED_ON_LOAD[method])(dequantize=True)}


def _causal_lm_class(raw: dict) -> Any:
    """``AutoModelForCausalLM``, or the checkpoint's own ``*ForCausalLM`` class where the auto
    mapping lacks its model type (transformers 5.24 does not map ``mistral4``)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if raw.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        for name in raw.get("architectures") or ():
            if str(name).endswith("ForCausalLM") and hasattr(transformers, name):
                return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


def load_directory(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load a local Hugging Face model directory; no hub access."""
    from qllm.models.presets import PRESETS

    if not path.exists():
        raise _bad_directory(
            f"model {str(path)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory"
        )
    if not path.is_dir():
        raise _bad_directory(f"model path {str(path)!r} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise _bad_directory(f"model directory {str(path)!r} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise _bad_directory(f"{config_file} is not valid JSON ({exc})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if (error := refused(model_type)) is not None:
        raise error
    if model_type not in supported_model_types():
        raise ModelLoadError(
            f"model directory {str(path)!r} has unsupported architecture model_type={model_type!r}; "
            f"supported families: {', '.join(supported_model_types())}"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise _bad_directory(f"model directory {str(path)!r} has no weights (*.safetensors)")
    from transformers import AutoTokenizer

    quantization = _dequantize_on_load(raw, path)
    try:
        model = _causal_lm_class(raw).from_pretrained(
            path, dtype=dtype, local_files_only=True, **quantization
        )
        if quantization:
            model.to(dtype)  # dequantized experts come out in bfloat16
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        raise _bad_directory(f"cannot load weights from {str(path)!r} ({exc})") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise _bad_directory(f"model directory {str(path)!r} has no usable tokenizer ({exc})") from exc
    return model, tokenizer


__all__ = [
    "DTYPES",
    "FAMILIES",
    "REFUSED",
    "MoEModel",
    "ModelLoadError",
    "adapter_for",
    "load_model",
    "supported_model_types",
]
