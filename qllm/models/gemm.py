"""Matrix products of the executor: fast for one row and batch-invariant, chosen per weight.

Batch invariance (a row's result does not depend on how many rows share the call) holds for the
BLAS GEMM at row counts that are multiples of :data:`qllm.models.base.ROW_MULTIPLE`, so a single
decode row runs as a padded GEMM. On x86 CPUs the BLAS (MKL) packs the whole weight on every call
for a GEMM of a few rows, which makes a padded decode row about 2.5x slower than the
matrix-vector product transformers runs. oneDNN's matmul streams an unpacked weight and costs
about the same for 2 to 8 rows as for one, and it is batch-invariant for every row count from 2
up (tests/test_gemm.py checks both properties on this machine).

:func:`linear` therefore uses oneDNN for large float32 weights on CPU and ``F.linear`` otherwise
(small weights: oneDNN's per-call overhead outweighs the gain). The choice depends only on the
weight, never on the rows, so each weight always runs the same kernel and invariance holds. The
two kernels round differently (about 1e-6 relative), well inside the executor's exactness bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ONEDNN_MIN_WEIGHT = 1 << 18
"""Weights with at least this many elements (1 MiB in float32) use oneDNN where it is available."""


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_linear_available()
"""Whether this torch build has oneDNN's fused linear (x86 and most aarch64 CPU builds)."""


def uses_onednn(weight: torch.Tensor) -> bool:
    """Whether :func:`linear` computes with ``weight`` through oneDNN."""
    return (
        ONEDNN
        and weight.numel() >= ONEDNN_MIN_WEIGHT
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for rows ``x`` ``[N, in]``, as ``F.linear``, with the kernel chosen by the weight."""
    if x.dim() == 2 and x.dtype == weight.dtype and uses_onednn(weight):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
