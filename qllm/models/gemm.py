"""Matrix products of the executor: fast for one row and batch-invariant, chosen per weight.

Batch invariance (a row's result does not depend on how many rows share the call) needs every
call to run the same GEMM code path; the executor pads rows to counts that the probe of this
machine's kernels found invariant (qllm/models/invariance.py). For MKL's GEMM that is typically a
multiple of 4 or 16 rows (it depends on the CPU and the thread count), and a GEMM of 4 rows costs
several times the matrix-vector product that transformers runs for a lone decode row.

oneDNN's matmul on a weight in its own layout ("packed" once, with a batch-size hint) is both
faster and uniform: on the machines measured it computes a lone row exactly as it computes that
row in a batch of any size, so the probe finds no padding needed at all. Measured on a 2-core AMD
EPYC (2 threads, float32), per call, milliseconds (``scripts/gemm_bench.py`` prints the table for
the machine it runs on):

==========================  ======  ======  ======  ======
weight, rows                1       2       4       32
4096x1024 ``F.linear``      1.1     2.9     5.0     6.0
4096x1024 oneDNN            0.58    1.4     1.8     3.7
4096x1024 oneDNN, packed    0.57    0.82    1.1     3.5
32000x1024 ``F.linear``     12.7    30.9    47.5    80.1
32000x1024 oneDNN, packed   9.6     9.9     12.2    25.7
==========================  ======  ======  ======  ======

Faster still at the few rows of decode is qllm's own skinny kernel (:mod:`qllm.models.skinny`),
invariant by construction and with no packed copy. :func:`linear` therefore uses the skinny kernel
for large float32 weights on CPU where it builds, oneDNN with packed weights where it does not
(or with ``QLLM_SKINNY=0``), and ``F.linear`` otherwise (for small weights a call's overhead
outweighs the gain). The
choice depends only on the weight, never on the rows, so each weight always runs one kernel and
invariance holds. The kernels round differently (about 1e-6 relative), well inside the
executor's exactness bound. tests/test_gemm.py checks the invariance (at the probed padding) and
the closeness on the machine it runs on.

:func:`linear_cat` runs projections of one input (a layer's query, key and value) as one GEMM
over their packed concatenation: one call, one stream through the weights.

A packed weight is a second copy of the weight, made when the model loads (or on the first use of
a weight not seen then) and kept while the weight lives; a weight changed in place (or given new
data) is packed again. ``QLLM_PACK_WEIGHTS=0`` in the
environment turns packing off (half the memory of the large weights, slower small batches).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from qllm.models import skinny

ONEDNN_MIN_WEIGHT = 1 << 18
"""Weights with at least this many elements (1 MiB in float32) use oneDNN where it is available."""


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_linear_available()
"""Whether this torch build has oneDNN's fused linear (x86 and most aarch64 CPU builds)."""


PACK_BATCH = 32
"""oneDNN's batch-size hint for the packed layout (a hint for speed; the probe decides invariance)."""

SKINNY = True
"""Whether :func:`linear` may use qllm's skinny kernel (:mod:`qllm.models.skinny`) for large float32
weights; it does where the kernel is available here (``QLLM_SKINNY`` and the CPU decide:
:func:`qllm.models.skinny.wanted`), and oneDNN runs them otherwise."""

PACK = (
    ONEDNN
    and os.environ.get("QLLM_PACK_WEIGHTS", "1") != "0"
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)
"""Whether :func:`linear` packs oneDNN weights (see the module's docstring)."""

# torch exposes oneDNN's packed linear and a tensor's storage owner and version counter only under
# private names; these four functions are the module's only uses of them.


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered into oneDNN's layout for batches of about :data:`PACK_BATCH` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH)  # noqa: SLF001


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN (``weight`` plain or packed)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")  # noqa: SLF001


def _base(weight: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``weight``'s storage (``weight`` itself unless it is a view)."""
    base = weight._base  # noqa: SLF001
    return weight if base is None else base


def _stamp(weight: torch.Tensor) -> tuple[int, int] | None:
    """``(version, data pointer)`` of ``weight``'s base: it changes when the weight is changed in
    place or given new data. None for an inference tensor, which has no version counter."""
    base = _base(weight)
    try:
        return base._version, base.data_ptr()  # noqa: SLF001
    except RuntimeError:
        return None


_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""base weight -> ((version, data pointer), {view coordinates: packed weight})"""


def packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's layout, packed on first use and cached while ``weight``'s storage
    lives unchanged (views of one tensor, such as one expert's slice of a fused expert weight, are
    cached under that tensor). A weight oneDNN cannot pack runs unpacked, always: each weight keeps
    one kernel, as invariance needs."""
    base, stamp = _base(weight), _stamp(weight)
    if stamp is None:  # an inference tensor has no version counter: do not cache it
        return weight
    entry = _packed.get(base)
    if entry is None or entry[0] != stamp:
        entry = _packed[base] = (stamp, {})
    key = (weight.storage_offset(), weight.shape, weight.stride())
    views = entry[1]
    if key not in views:
        try:
            views[key] = _onednn_pack(weight)
        except RuntimeError:  # oneDNN cannot pack this weight: it always runs as it is
            views[key] = None
    out = views[key]
    return weight if out is None else out


def pack_all(module: torch.nn.Module) -> int:
    """Pack every weight of ``module`` that :func:`linear` would pack (see :func:`pack`). Returns
    how many were packed."""
    return sum(pack(weight) for weight in module.parameters())


def pack(weight: torch.Tensor) -> int:
    """Pack ``weight`` now if :func:`linear` would pack it: a 2-D weight, or each expert's slice
    of a fused 3-D expert weight. Returns how many were packed (none with packing off)."""
    if not PACK:
        return 0
    count = 0
    with torch.no_grad():
        for view in [weight] if weight.dim() == 2 else list(weight) if weight.dim() == 3 else []:
            if uses_onednn(view):
                packed(view)
                count += 1
    return count


def forget(weight: torch.Tensor) -> None:
    """Drop the packed copies made of ``weight`` (and of its views): it is about to be freed or
    replaced, and its packed copy would otherwise live as long as the tensor object does."""
    _packed.pop(_base(weight), None)
    _fused.pop(weight, None)


_fused: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""first weight -> (stamps of all the weights, their concatenation as :func:`linear` runs it)"""


def linear_cat(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...]
) -> list[torch.Tensor]:
    """:func:`linear` of rows ``x`` with each of ``weights`` (projections of one input, such as a
    layer's query, key and value), as one GEMM over their concatenation where oneDNN packs it.

    One call reads the weights in one stream and pays one call's overhead; each output element is
    still its own dot product over ``x``'s row. The concatenation is packed once and cached while
    every weight is unchanged (the separate packed copies are dropped: they would only cost
    memory). On the skinny kernel the weights run in one call as they are
    (:func:`qllm.models.skinny.linear_many`). Elsewhere each weight runs on its own, exactly as
    :func:`linear`."""
    stamps = tuple(_stamp(w) for w in weights)
    fusable = (
        PACK
        and not _skinny_on()
        and x.dim() == 2
        and not torch.is_grad_enabled()
        and None not in stamps
        and all(w.dim() == 2 and w.shape[1] == weights[0].shape[1] and w.dtype == x.dtype for w in weights)
        and (all(b is None for b in biases) or all(b is not None for b in biases))
    )
    if fusable:
        entry = _fused.get(weights[0])
        if entry is None or entry[0] != stamps:
            entry = _fused[weights[0]] = (stamps, _pack_cat(weights))
        if entry[1] is not None:
            bias = None if biases[0] is None else torch.cat(biases)
            y = _onednn_linear(x, entry[1], bias)
            return list(y.split([w.shape[0] for w in weights], dim=-1))
    if (
        x.dim() == 2
        and 1 < len(weights) <= skinny.MAX_MANY
        and all(w.dtype == x.dtype and w.shape[1] == x.shape[1] and uses_skinny(w) for w in weights)
    ):
        return skinny.linear_many(x, list(weights), list(biases))
    return [linear(x, w, b) for w, b in zip(weights, biases)]


def _pack_cat(weights: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The weights' concatenation packed for oneDNN, or None where it does not run there."""
    cat = torch.cat(weights)
    if not uses_onednn(cat):
        return None
    try:
        fused = _onednn_pack(cat)
    except RuntimeError:  # oneDNN cannot pack it: the weights run separately
        return None
    for w in weights:
        _packed.pop(_base(w), None)
    return fused


def _large_cpu_float(weight: torch.Tensor) -> bool:
    """A contiguous float32 CPU matrix of at least :data:`ONEDNN_MIN_WEIGHT` elements, outside autograd."""
    return (
        weight.numel() >= ONEDNN_MIN_WEIGHT
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
    )


def _skinny_on() -> bool:
    """Whether large float32 weights run on the skinny kernel here."""
    return SKINNY and skinny.available()


def uses_skinny(weight: torch.Tensor) -> bool:
    """Whether :func:`linear` computes with ``weight`` through qllm's skinny kernel."""
    return _large_cpu_float(weight) and _skinny_on()


def uses_onednn(weight: torch.Tensor) -> bool:
    """Whether :func:`linear` computes with ``weight`` through oneDNN."""
    return ONEDNN and _large_cpu_float(weight) and not _skinny_on()


def large_weight_kernel() -> str:
    """The kernel that computes large float32 CPU weights here: ``skinny``, ``onednn_packed``,
    ``onednn`` or ``F.linear``."""
    if _skinny_on():
        return "skinny"
    if ONEDNN:
        return "onednn_packed" if PACK else "onednn"
    return "F.linear"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for rows ``x`` ``[N, in]``, as ``F.linear``, with the kernel chosen by the weight."""
    if x.dim() == 2 and x.dtype == weight.dtype and _large_cpu_float(weight):
        if _skinny_on():
            return skinny.linear(x, weight, bias)
        if ONEDNN:
            return _onednn_linear(x, packed(weight) if PACK else weight, bias)
    return F.linear(x, weight, bias)
