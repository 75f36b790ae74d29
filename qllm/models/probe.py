"""Probing a GEMM kernel for batch invariance: under which row padding does a row get the same
bits whatever the row count and offset of the call it sits in (see qllm/models/invariance.py for
why and how the executor uses the answer)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Padding = tuple[int, int]
"""``(multiple, minimum)``: a call's rows are zero-padded up to a multiple of ``multiple`` and to
at least ``minimum`` rows."""

NO_PADDING: Padding = (1, 1)

CANDIDATES: tuple[Padding, ...] = ((1, 1), (1, 2), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32), (64, 64))
"""Paddings tried, cheapest first. Multiples are powers of two, so the largest multiple an op
kind's GEMMs need is a multiple of every other: padding to it keeps each of them invariant."""

PROBE_FLOPS = 3e8
"""Work allowed per GEMM and candidate (about); bounds the rows probed for large weights."""

PROBE_VERSION = 4
"""Part of the cache key: a change to how probes decide invalidates what older ones found."""

MAX_PROBE_ROWS = 192
"""Row counts are probed up to this (or to twice the candidate multiple, if larger)."""

_GEMMS = {
    "aten::mm",
    "aten::addmm",
    "aten::_addmm_activation",
    "mkldnn::_linear_pointwise",
    "qllm::skinny_linear",
    "qllm::skinny_linear_many",
    "qllm::swiglu_expert",
}


@dataclass
class Gemm:
    """One GEMM call an op runs: the kernel, its arguments, and which argument holds the rows."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    row_arg: int

    @property
    def rows_in(self) -> torch.Tensor:
        return self.args[self.row_arg]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[self.row_arg] = x
        return self.func(*args, **self.kwargs)

    def flops_per_row(self) -> float:
        """Two per element of the first 2-D operand other than the rows (of every weight, where
        that operand is a list of weights)."""
        for i, a in enumerate(self.args):
            if i == self.row_arg:
                continue
            if isinstance(a, torch.Tensor) and a.dim() == 2:
                return 2.0 * a.numel()
            if (
                isinstance(a, (list, tuple))
                and a
                and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in a)
            ):
                return 2.0 * sum(t.numel() for t in a)
        return 2.0 * self.rows_in.shape[1]

    def signature(self) -> str:
        """What picks the kernel path: the op, and shape, dtype, layout and device of each operand."""
        parts = [str(self.func)]
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                parts.append(_describe(a, rows=i == self.row_arg))
            elif isinstance(a, (list, tuple)):
                parts.append("[" + ",".join("None" if t is None else _describe(t) for t in a) + "]")
            else:
                parts.append(repr(a))
        return "|".join(parts)


def _describe(a: torch.Tensor, rows: bool = False) -> str:
    shape = ("N", *a.shape[1:]) if rows else tuple(a.shape)
    layout = a.stride() if a.layout is torch.strided else a.layout  # packed: no strides
    return f"{shape}:{a.dtype}:{layout}:{a.device.type}"


class _Recorder(TorchDispatchMode):
    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows
        self.gemms: list[Gemm] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.name().partition(".")[0] in _GEMMS:  # the op, whatever its overload
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == self.rows:
                    self.gemms.append(Gemm(func, tuple(args), dict(kwargs), i))
                    break
        return func(*args, **kwargs)


def trace_gemms(call: Callable[[], Any], rows: int) -> list[Gemm]:
    """The GEMMs ``call`` runs on its ``rows`` input rows, one per distinct signature."""
    recorder = _Recorder(rows)
    with recorder:
        call()
    unique: dict[str, Gemm] = {}
    for gemm in recorder.gemms:
        unique.setdefault(gemm.signature(), gemm)
    return list(unique.values())


def _counts(padding: Padding, top: int, rng: random.Random) -> list[int]:
    """Row counts to test, smallest first (where ragged tails and lone rows differ), then others."""
    multiple, minimum = padding
    allowed = list(range(max(minimum, multiple), top + 1, multiple))
    rest = allowed[3:]
    rng.shuffle(rest)
    return allowed[:3] + rest


def is_invariant(
    gemm: Callable[[torch.Tensor], torch.Tensor],
    make_rows: Callable[[int], torch.Tensor],
    padding: Padding,
    max_rows: int,
    *,
    budget_rows: int | None = None,
    max_windows: int = 256,
    seed: int = 0,
) -> bool:
    """Whether every row gets the same result at each tested row count and offset under ``padding``.

    A block of random rows (``max_rows``, or two of the padding's multiples if more) is computed at
    once; then windows of it, each a row count the padding allows, placed at random offsets, must
    reproduce the block's rows bit for bit. Blocks and windows are drawn until ``budget_rows`` rows
    (default: three blocks' worth) have been computed or ``max_windows`` windows tested. A cheap
    kernel thus gets many windows: a remainder loop may differ for only a few percent of values.
    """
    multiple, minimum = padding
    top = max(max_rows, 2 * multiple, minimum)
    top -= top % multiple
    budget = budget_rows if budget_rows is not None else 3 * top
    rng = random.Random(seed)
    spent = windows = 0
    while spent < budget and windows < max_windows:
        x = make_rows(top)
        whole = gemm(x)
        spent += top
        for count in _counts(padding, top, rng):
            start = rng.randint(0, top - count)
            if not _same_rows(gemm(x[start : start + count].contiguous()), whole, start, count):
                return False
            spent += count
            windows += 1
            if spent >= budget or windows >= max_windows:
                break
    return True


def _same_rows(part: Any, whole: Any, start: int, count: int) -> bool:
    if isinstance(part, torch.Tensor):
        return torch.equal(part, whole[start : start + count])
    return all(_same_rows(p, w, start, count) for p, w in zip(part, whole, strict=True))


def find_padding(
    gemm: Callable[[torch.Tensor], torch.Tensor],
    make_rows: Callable[[int], torch.Tensor],
    max_rows: int,
    candidates: Iterable[Padding] = CANDIDATES,
    budget_rows: int | None = None,
) -> Padding | None:
    """The cheapest candidate padding under which ``gemm`` is batch-invariant, or None."""
    for padding in candidates:
        if is_invariant(gemm, make_rows, padding, max_rows, budget_rows=budget_rows):
            return padding
    return None


def combine(paddings: Iterable[Padding]) -> Padding:
    """One padding that keeps each of ``paddings``' GEMMs invariant (multiples are powers of two)."""
    multiple, minimum = NO_PADDING
    for m, k in paddings:
        multiple, minimum = max(multiple, m), max(minimum, k)
    return multiple, minimum


def probe_gemm(gemm: Gemm) -> Padding | None:
    """:func:`find_padding` for a traced GEMM, on random rows shaped like its input."""
    x = gemm.rows_in
    gen = torch.Generator().manual_seed(0)
    max_rows = probe_rows(gemm.flops_per_row())

    def make_rows(n: int) -> torch.Tensor:
        rows = torch.randn(n, *x.shape[1:], generator=gen, dtype=torch.float32)
        return rows.to(dtype=x.dtype, device=x.device)

    return find_padding(gemm, make_rows, max_rows, budget_rows=probe_budget(gemm.flops_per_row(), max_rows))


def probe_rows(flops_per_row: float) -> int:
    """Rows in a probe's block: a third of :data:`PROBE_FLOPS` of work, 4 to :data:`MAX_PROBE_ROWS`."""
    return int(max(4, min(MAX_PROBE_ROWS, PROBE_FLOPS / (3 * max(flops_per_row, 1.0)))))


def probe_budget(flops_per_row: float, max_rows: int) -> int:
    """Rows a probe may compute for one candidate: about :data:`PROBE_FLOPS` of work, at least
    three blocks of ``max_rows``."""
    return int(max(3 * max_rows, min(PROBE_FLOPS / max(flops_per_row, 1.0), 1e6)))


def coarser(padding: Padding) -> list[Padding]:
    """``padding`` and then each candidate that keeps it (a multiple of it), cheapest first."""
    out = [padding]
    for candidate in CANDIDATES:
        both = combine([padding, candidate])
        if both not in out:
            out.append(both)
    return out
