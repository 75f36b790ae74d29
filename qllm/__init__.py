"""qllm: an inference runtime for MoE models with expert-level preemption.

``qllm.Engine`` is imported lazily, so ``import qllm.client`` stays light (no torch).
"""

import os
from typing import Any

# The compute thread and the event-loop thread each run torch ops, so each has an OpenMP team;
# teams that spin while idle take the cores from each other (on a 2-core machine, single-request
# decode in a worker thread ran markedly slower with spinning teams). Idle teams
# sleep instead, unless the user chose otherwise. It takes effect only if qllm is imported before
# torch (the ``qllm`` command always is).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from qllm.kernel.engine import Engine

        return Engine
    raise AttributeError(f"module 'qllm' has no attribute {name!r}")
