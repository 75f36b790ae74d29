"""qllm: an inference runtime for MoE models with expert-level preemption.

``qllm.Engine`` is imported lazily, so ``import qllm.client`` stays light (no torch).
"""

import os
from typing import Any

# Idle OpenMP helpers sleep at once instead of spinning between parallel regions (unless the
# user chose otherwise). On a machine that other processes share, a spinning helper holds a core
# that the thread it waits for needs: on the 2-core EPYC, single-request decode with spinning
# helpers ran at about a third of its idle speed beside one busy process (below transformers'
# generate in some runs). Sleeping helpers cost a wake per parallel region instead: 1.2-1.3x
# slower than spinning ones on idle cores, and no slower beside the busy process
# (docs/benchmarks.md, run Y).
# A dedicated machine can set OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000 (docs/engine.md). It
# takes effect only if qllm is imported before torch (the ``qllm`` command always is).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qllm.version import __version__

__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from qllm.engine import Engine

        return Engine
    raise AttributeError(f"module 'qllm' has no attribute {name!r}")
