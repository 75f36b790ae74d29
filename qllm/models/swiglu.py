"""SwiGLU experts in one call each, and a MoE layer's routed experts in one call, on the skinny kernel.

An expert of the common shape (Mixtral, Qwen-MoE, DeepSeek and most families here) is
``(silu(x @ gate.T) * (x @ up.T)) @ down.T``, gate and up the halves of one fused weight. Run as
two GEMMs with torch's activation between them, each expert costs two parallel regions (each
wakes the sleeping OpenMP helpers, milliseconds a step) and a dozen small torch calls.
:func:`expert` computes it in one C call (:file:`skinny.c`): both products on the skinny
kernel's blocks, the activation fused into the first, one parallel region. :func:`moe` runs the
routed experts of a whole MoE op in one call: it gathers each expert's rows, computes the expert
as :func:`expert` does, and adds ``routing weight * output`` to each row's sum in ascending expert
order, exactly the sum the executor forms from :func:`expert`'s results. So a row gets the same
bits whichever way its layer runs (one op per expert, or one op per layer), alone or batched.

Between experts :func:`moe` reads a stop flag, an ``int`` in memory that the kernel's event loop
raises when a message arrives
(:class:`qllm.kernel.runtime.ops.StopFlag`): an LS request still waits at most one expert.

silu is ``g / (1 + exp(-g))`` with the kernel's own exp (a relative error of about 2e-7), not
torch's: outputs agree with transformers' to float32 tolerance, and batch invariance is by
construction (the probe still checks the op kinds whole).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch

from qllm.models import gemm, skinny

SILU_NAMES = ("SiLU", "SiLUActivation")
"""Activation modules that compute silu (torch's and transformers')."""


@functools.cache
def _functions() -> tuple[Any, Any] | None:
    long, ptr, c_int = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
    one = skinny.c_function(
        "qllm_swiglu_expert", [ptr, long, long, ptr, long, ptr, long, long, long, ptr, ptr, long, c_int]
    )
    weights = [ptr, long, long, ptr, long, long, long, long]  # gate/up, down, hidden, inter
    plan = [ptr, ptr, ptr, ptr, long, ptr]  # experts, offsets, rows, scales, count, stop
    layer = skinny.c_function(
        "qllm_moe_swiglu", [ptr, long, ptr, long, *weights, *plan, ptr, ptr, long, c_int], long
    )
    if one is None or layer is None:
        return None
    # the invariance probe traces it as a GEMM of its rows
    skinny.define_op("swiglu_expert(Tensor x, Tensor gate_up, Tensor down, str kernel) -> Tensor", _expert_op)
    return one, layer


def fits(experts: torch.nn.Module) -> bool:
    """Whether ``experts`` (a fused experts module: ``gate_up_proj`` ``[E, 2I, H]``, ``down_proj``
    ``[E, H, I]``, ``act_fn``) are SwiGLU experts that these kernels compute: float32 weights whose
    slices the skinny kernel takes (:func:`qllm.models.gemm.uses_skinny`), silu, no biases."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        return False
    hidden, inter = down.shape[1], down.shape[2]
    if gate_up.shape[1:] != (2 * inter, hidden):
        return False
    if any(getattr(experts, name, None) is not None for name in ("gate_up_proj_bias", "down_proj_bias")):
        return False
    if type(getattr(experts, "act_fn", None)).__name__ not in SILU_NAMES:
        return False
    return gemm.uses_skinny(gate_up[0]) and gemm.uses_skinny(down[0]) and _functions() is not None


def _expert_op(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, kernel: str) -> torch.Tensor:
    functions = _functions()
    if functions is None:
        raise RuntimeError("qllm's SwiGLU expert kernel is not available on this machine")
    if x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] != gate_up.shape[1]:
        raise ValueError(f"swiglu expert: rows {tuple(x.shape)} do not fit weight {tuple(gate_up.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    (m, hidden), inter = x.shape, down.shape[1]
    y = torch.empty(m, hidden, dtype=torch.float32)
    if m:
        h = torch.empty(m, inter, dtype=torch.float32)
        functions[0](
            x.data_ptr(), x.stride(0), m, gate_up.data_ptr(), gate_up.stride(0), down.data_ptr(),
            down.stride(0), hidden, inter, h.data_ptr(), y.data_ptr(), hidden, torch.get_num_threads(),
        )  # fmt: skip
    return y


def expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The SwiGLU expert with fused weight ``gate_up`` ``[2I, H]`` and ``down`` ``[H, I]`` on rows ``x``."""
    if _functions() is None:
        raise RuntimeError("qllm's SwiGLU expert kernel is not available on this machine")
    return torch.ops.qllm.swiglu_expert(x, gate_up, down, skinny.KERNEL_ID)


def moe(
    x: torch.Tensor,
    out: torch.Tensor,
    experts: torch.nn.Module,
    plan: list[tuple[int, list[int], list[int]]],
    weights: torch.Tensor,
    stop: int | None = None,
) -> int:
    """Add the routed experts of ``plan`` (``(expert, rows, slots)``, ascending; see
    :func:`qllm.models.executor.expert_rows`) to ``out`` in place: row ``r`` of each expert's
    rows gains ``weights[r, slot] * expert(x[r])``. ``stop``: the address of a
    :class:`~qllm.kernel.runtime.ops.StopFlag`,
    read between experts. Returns how many of ``plan``'s experts it added (all, unless stopped)."""
    functions = _functions()
    if functions is None:
        raise RuntimeError("qllm's SwiGLU expert kernel is not available on this machine")
    if not plan:
        return 0
    gate_up, down = experts.gate_up_proj, experts.down_proj
    rows = [r for _, at, _ in plan for r in at]
    slots = [s for _, _, ss in plan for s in ss]
    at = torch.tensor(rows, dtype=torch.long)
    scale = weights[at, torch.tensor(slots, dtype=torch.long)].to(torch.float32).contiguous()
    offsets = [0]
    for _, r, _ in plan:
        offsets.append(offsets[-1] + len(r))
    ids = torch.tensor([e for e, _, _ in plan], dtype=torch.long)
    offsets_t = torch.tensor(offsets, dtype=torch.long)
    most = max(len(r) for _, r, _ in plan)
    hidden, inter = down.shape[1], down.shape[2]
    xs = torch.empty(len(rows), hidden, dtype=torch.float32)
    h = torch.empty(2, most, inter, dtype=torch.float32)
    if x.stride(1) != 1:
        x = x.contiguous()
    return functions[1](
        x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0),
        gate_up.data_ptr(), gate_up.stride(0), gate_up.stride(1),
        down.data_ptr(), down.stride(0), down.stride(1), hidden, inter,
        ids.data_ptr(), offsets_t.data_ptr(), at.data_ptr(), scale.data_ptr(), len(plan),
        stop, xs.data_ptr(), h.data_ptr(), most, torch.get_num_threads(),
    )  # fmt: skip


def run_layer(
    experts: torch.nn.Module,
    x: torch.Tensor,
    weights: torch.Tensor,
    plan: list[tuple[int, list[int], list[int]]],
    out: torch.Tensor,
    stop: Callable[[], bool] | None,
) -> int:
    """:func:`moe` for a grouped MoE op that ``stop`` may end between experts: a stop that C can
    read (a :class:`~qllm.kernel.runtime.ops.StopFlag`) is read by the kernel, another is polled
    here, one expert per call. Returns how many of ``plan``'s experts were added."""
    address = getattr(stop, "address", None)
    if stop is None or address is not None:
        return moe(x, out, experts, plan, weights, address)
    for j in range(len(plan)):
        moe(x, out, experts, plan[j : j + 1], weights)
        if j + 1 < len(plan) and stop():
            return j + 1
    return len(plan)
