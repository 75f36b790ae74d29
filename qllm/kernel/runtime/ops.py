"""The ops a request's forward pass yields: the unit of scheduling.

A request's forward pass is a generator. At every step the kernel may schedule it yields an
:class:`Op` and is resumed with the op's result. Ops with the same :attr:`Op.key` (same kind,
layer and expert) from several requests can run as one batched call; every op is row-wise, so
each request gets the same result as when its op runs alone.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from qllm.kernel.runtime.cache import KVCache
    from qllm.kernel.runtime.passes import Segment


class OpKind(enum.IntEnum):
    """What an op computes. The order is the order inside one layer (MOE stands where ROUTER does:
    it computes a MoE layer's router, experts and shared expert in one op)."""

    ATTENTION = 0  # input norm + self-attention of one layer (updates the request's KV cache)
    ROUTER = 1  # post-attention norm + router of one MoE layer
    EXPERT = 2  # one routed expert of one layer, on the rows routed to it
    SHARED = 3  # the always-on shared expert of a MoE layer (Qwen2-MoE), on the routed rows
    MLP = 4  # post-attention norm + dense MLP of a layer without experts
    HEAD = 5  # final norm + lm_head on the last row
    MOE = 6  # post-attention norm, router, every routed expert and the shared expert of a MoE layer


MoEGranularity = Literal["layer", "expert"]
"""How a MoE layer runs: one grouped ``MOE`` op (``layer``) or the router, each expert and the
shared expert as ops of their own (``expert``). Both do the same arithmetic per row."""

MOE_GRANULARITIES: tuple[MoEGranularity, ...] = ("layer", "expert")
"""The values of :data:`MoEGranularity`, the engine's ``moe_granularity`` setting."""


def check_moe_granularity(value: str) -> MoEGranularity:
    """``value`` if it is one of :data:`MOE_GRANULARITIES`, else a ValueError naming them."""
    if value not in MOE_GRANULARITIES:
        raise ValueError(f"moe_granularity must be one of {', '.join(MOE_GRANULARITIES)}, got {value!r}")
    return value


@dataclass(slots=True, eq=False)
class Op:
    """One schedulable step of one request.

    ``x`` holds this request's rows ([n, hidden]). For ATTENTION, ``cache`` and ``positions``
    carry the request's KV cache and the absolute positions of the rows (or ``segments``: one
    cache, positions and row count per request, when the rows are several requests' pass); for
    EXPERT, ``weight`` holds the routing weight of each row.
    """

    kind: OpKind
    layer: int
    x: torch.Tensor
    expert: int = -1
    weight: torch.Tensor | None = None
    cache: KVCache | None = None
    positions: torch.Tensor | None = None
    segments: list[Segment] | None = None  # ATTENTION over several requests' rows (a pass)
    residual: torch.Tensor | None = None  # when set, the op returns residual + its output (a pass)
    partial: Partial | None = None  # a resumed MOE op: routing and partial sums; ``expert``: where

    @property
    def key(self) -> tuple[int, int, int]:
        """Ops with equal keys may run together in one batched call."""
        return (int(self.kind), self.layer, self.expert)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        extra = f" expert={self.expert}" if self.kind == OpKind.EXPERT or self.partial is not None else ""
        return f"Op({self.kind.name} layer={self.layer}{extra} rows={self.rows})"


@dataclass(slots=True, frozen=True)
class Token:
    """Yielded by a request's program when it has produced one output token (not compute); the program
    is sent back whether a stop string ended the output with it."""

    token_id: int


@dataclass(slots=True, eq=False)
class Partial:
    """Result of a grouped MoE op stopped between experts: the routing, the experts' partial sums,
    and the first expert not yet computed. The pass resumes the layer from there as one grouped
    op again (stoppable like the first), carrying this state in :attr:`Op.partial`."""

    x: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    out: torch.Tensor
    next_expert: int
    # Expert parallel: outputs of remote experts that arrived before the op stopped, per expert
    # over all the op's rows (its rows filled); the resumed op adds them instead of computing.
    ready: dict[int, torch.Tensor] | None = None


def merge_ready(parts: Sequence[dict[int, torch.Tensor] | None]) -> dict[int, torch.Tensor]:
    """The remote outputs of merged stopped MoE ops (see :attr:`Partial.ready`): those of the
    experts every op collected. Any other is computed again on resume, with the same result."""
    if not parts or any(not p for p in parts):
        return {}
    common = set.intersection(*(set(p) for p in parts))
    return {e: torch.cat([p[e] for p in parts]) for e in sorted(common)}


class StopFlag:
    """Whether a running op should stop at its next expert: raised by the event loop when a message
    arrives, read by the compute thread from Python (call it) or from C (the int at ``address``;
    qllm/models/swiglu.py reads it between experts). An int's read and write are atomic."""

    __slots__ = ("_cell", "address")

    def __init__(self) -> None:
        self._cell = ctypes.c_int(0)
        self.address = ctypes.addressof(self._cell)

    def __call__(self) -> bool:
        return bool(self._cell.value)

    def set(self, value: bool) -> None:
        self._cell.value = int(value)
