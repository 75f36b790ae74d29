"""Model families, presets and loading.

``load_model(spec)`` accepts a preset name (``qllm models`` lists them), a local Hugging Face
directory (``config.json``, ``*.safetensors``, tokenizer files) or an already-built
``(PreTrainedModel, tokenizer)`` pair, and returns the family's :class:`MoEModel` executor.

The package re-exports the public names of its modules: the adapter base
(qllm/models/base.py), the family registry (registry.py), loading (loading.py, checkpoint.py)
and the load error (errors.py).
"""

from __future__ import annotations

from qllm.models.base import MoEModel
from qllm.models.checkpoint import DEQUANTIZED_ON_LOAD, load_directory
from qllm.models.errors import ModelLoadError
from qllm.models.loading import DTYPES, load_model, resolve_dtype
from qllm.models.refused import REFUSED
from qllm.models.registry import FAMILIES, adapter_for, refused, supported_model_types

__all__ = [
    "DEQUANTIZED_ON_LOAD",
    "DTYPES",
    "FAMILIES",
    "REFUSED",
    "MoEModel",
    "ModelLoadError",
    "adapter_for",
    "load_directory",
    "load_model",
    "refused",
    "resolve_dtype",
    "supported_model_types",
]
