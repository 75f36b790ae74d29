"""qllm: an inference runtime for MoE models with expert-level preemption.

``qllm.Engine`` is imported lazily, so ``import qllm.client`` stays light (no torch).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from qllm.kernel.engine import Engine

        return Engine
    raise AttributeError(f"module 'qllm' has no attribute {name!r}")
