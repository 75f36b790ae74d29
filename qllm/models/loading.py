"""``load_model``: a preset, a local directory or a built model, as its family's executor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qllm.models.base import MoEModel
from qllm.models.checkpoint import directory_error, load_directory
from qllm.models.errors import ModelLoadError
from qllm.models.presets import PRESETS
from qllm.models.registry import adapter_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``dtype`` names :func:`load_model` accepts."""


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
    torch_dtype = resolve_dtype(dtype)
    if str(spec) in PRESETS:
        model, tokenizer = PRESETS[str(spec)].build(torch_dtype)
    elif not Path(spec).exists():
        raise directory_error(
            f"model {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory"
        )
    else:
        model, tokenizer = load_directory(Path(spec), torch_dtype)
    model.to(device)
    return _executor(model, tokenizer, batch_invariant)


def _executor(model: Any, tokenizer: Any, batch_invariant: bool) -> MoEModel:
    executor = adapter_for(model.config)(model, tokenizer, batch_invariant=batch_invariant)
    if batch_invariant:
        executor.calibrate()  # at load, so its cost and its findings are known before serving
    return executor
