"""Matrix products of the executor: fast for one row and batch-invariant, chosen per weight.

Batch invariance (a row's result does not depend on how many rows share the call) needs every
call to run the same GEMM code path; the executor pads rows to counts that the probe of this
machine's kernels found invariant (qllm/models/invariance.py). For MKL's GEMM that is typically a
multiple of 4 or 16 rows (it depends on the CPU and the thread count), and a GEMM of 4 rows costs
about twice the matrix-vector product that transformers runs for a lone decode row. oneDNN's matmul
typically computes a row the same way in every call of 2 rows or more, and its small-row GEMMs are
faster. Measured on an AMD EPYC (one thread, a 4096x1024 float32 weight not in cache), per call:

=============  =======  =======  =======
rows           1        2        4
MKL            1.1 ms   (n/a)    2.1 ms
oneDNN         0.95 ms  1.3 ms   1.5 ms
=============  =======  =======  =======

:func:`linear` therefore uses oneDNN for large float32 weights on CPU and ``F.linear`` otherwise
(for small weights oneDNN's per-call overhead outweighs the gain). The choice depends only on the
weight, never on the rows, so each weight always runs one kernel and invariance holds. The two
kernels round differently (about 1e-6 relative), well inside the executor's exactness bound.
tests/test_gemm.py checks the invariance (at the probed padding) and the closeness on the machine
it runs on.
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
