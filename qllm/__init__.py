"""qllm: an inference runtime for MoE models with expert-level preemption.

``qllm.Engine`` is imported lazily, so ``import qllm.client`` stays light (no torch). Importing
qllm changes nothing in the process: the OpenMP wait policy that the ``qllm`` command sets is
:func:`qllm.kernel.openmp.configure_openmp`, for embedding programs to call themselves.
"""

from typing import Any

from qllm.version import __version__

__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from qllm.engine import Engine

        return Engine
    raise AttributeError(f"module 'qllm' has no attribute {name!r}")
