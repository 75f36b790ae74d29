"""Loading a local Hugging Face model directory: its config checked against the supported
families, quantized checkpoints dequantized where transformers can, weights and tokenizer read
with no hub access."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qllm.models.errors import ModelLoadError
from qllm.models.registry import refused, supported_model_types, unsupported


def directory_error(problem: str) -> ModelLoadError:
    """The error for a spec that is not a loadable model directory: ``problem``, then what one holds."""
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
    if not path.exists():
        raise directory_error(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise directory_error(f"model path {str(path)!r} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise directory_error(f"model directory {str(path)!r} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise directory_error(f"{config_file} is not valid JSON ({exc})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if (error := refused(model_type)) is not None:
        raise error
    if model_type not in supported_model_types():
        raise unsupported(
            model_type, raw if isinstance(raw, dict) else {}, f"model directory {str(path)!r}: "
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise directory_error(f"model directory {str(path)!r} has no weights (*.safetensors)")
    from transformers import AutoTokenizer

    quantization = _dequantize_on_load(raw, path)
    try:
        model = _causal_lm_class(raw).from_pretrained(
            path, dtype=dtype, local_files_only=True, **quantization
        )
        if quantization:
            model.to(dtype)  # dequantized experts come out in bfloat16
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        raise directory_error(f"cannot load weights from {str(path)!r} ({exc})") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise directory_error(f"model directory {str(path)!r} has no usable tokenizer ({exc})") from exc
    return model, tokenizer
