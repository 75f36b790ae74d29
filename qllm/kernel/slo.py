"""Per-class service-level objectives: time to first token (TTFT) and time per output token after
the first (TPOT), and their defaults.

A request's SLOs are its own (``ttft_deadline``, ``tpot_slo`` in its spec), else its class's in
the engine config (:class:`~qllm.kernel.config.ClassSLO`), else the defaults here, in units of the
single-request decode step: the predicted time of one decode pass of one row alone (the cost
model's, so it follows the machine). LS requests get ``TTFT_STEPS`` steps to their first token
(10, as the research system's SLO) and ``TPOT_STEPS`` steps per later token; best-effort requests
get no default SLO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qllm.kernel.runtime.ops import OpKind

if TYPE_CHECKING:
    from qllm.kernel.config import ClassSLO
    from qllm.kernel.costs import OpCosts
    from qllm.kernel.view import CostView

TTFT_STEPS = 10.0
"""Default LS TTFT SLO, in single-request decode steps."""
TPOT_STEPS = 2.0
"""Default LS TPOT SLO, in single-request decode steps."""


def decode_step_s(costs: OpCosts | CostView, layers: int) -> float | None:
    """Predicted time of one decode pass of a lone request: ``layers`` attention and MoE ops of one
    row and the head (None: attention or MoE not measured yet)."""
    attention, moe = costs.predict(OpKind.ATTENTION, 1), costs.predict(OpKind.MOE, 1)
    if attention is None or moe is None:
        return None
    return layers * (attention + moe) + (costs.predict(OpKind.HEAD, 1) or 0.0)


def class_slo(cls: str, configured: ClassSLO | None, step: float | None) -> tuple[float | None, float | None]:
    """``(ttft, tpot)`` of class ``cls``: the configured figures, else for LS the defaults from
    ``step`` (None where neither is known)."""
    ttft = configured.ttft if configured is not None else None
    tpot = configured.tpot if configured is not None else None
    if cls == "ls" and step is not None:
        ttft = TTFT_STEPS * step if ttft is None else ttft
        tpot = TPOT_STEPS * step if tpot is None else tpot
    return ttft, tpot
