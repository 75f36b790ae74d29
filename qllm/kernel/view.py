"""Read-only views of the kernel for policies: what is queued, where each request is, memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qllm.kernel.costs import OpCosts
from qllm.kernel.request import Phase, PriorityClass, Request, RequestStatus
from qllm.kernel.runtime.ops import OpKind

if TYPE_CHECKING:
    from qllm.kernel.tenants import TenantLedger
    from qllm.kernel.tensors import TensorManager


class RequestView:
    """What a policy may read about one request. Live: values reflect the kernel's current state."""

    __slots__ = ("_r",)

    def __init__(self, request: Request):
        self._r = request

    id = property(lambda self: self._r.id)
    priority_class: PriorityClass = property(lambda self: self._r.priority_class)  # type: ignore[assignment]
    is_ls: bool = property(lambda self: self._r.is_ls)  # type: ignore[assignment]
    rank: int = property(lambda self: self._r.priority)  # type: ignore[assignment]
    arrival: float = property(lambda self: self._r.arrival)  # type: ignore[assignment]
    seq: int = property(lambda self: self._r.seq)  # type: ignore[assignment]
    ttft_deadline: float | None = property(lambda self: self._r.ttft_deadline)  # type: ignore[assignment]
    tpot_slo: float | None = property(lambda self: self._r.tpot_slo)  # type: ignore[assignment]
    last_token: float | None = property(lambda self: self._r.last_token)  # type: ignore[assignment]
    client: str = property(lambda self: self._r.client)  # type: ignore[assignment]
    tenant: str = property(lambda self: self._r.tenant)  # type: ignore[assignment]
    # Its tenant's weighted service so far (lower: served first within a class; qllm.kernel.tenants).
    tenant_counter: float = property(lambda self: self._r.tenant_counter)  # type: ignore[assignment]
    # Requests of its tenant waiting or running, this one included (1: its tenant was idle).
    tenant_live: int = property(lambda self: self._r.tenant_live)  # type: ignore[assignment]
    status: RequestStatus = property(lambda self: self._r.status)  # type: ignore[assignment]
    phase: Phase = property(lambda self: self._r.phase)  # type: ignore[assignment]
    prompt_tokens: int = property(lambda self: len(self._r.prompt_ids))  # type: ignore[assignment]
    tokens_generated: int = property(lambda self: len(self._r.token_ids))  # type: ignore[assignment]
    max_tokens: int = property(lambda self: self._r.params.max_tokens)  # type: ignore[assignment]
    first_scheduled: float | None = property(lambda self: self._r.first_scheduled)  # type: ignore[assignment]
    first_token: float | None = property(lambda self: self._r.first_token)  # type: ignore[assignment]
    preemptions: int = property(lambda self: self._r.preemptions)  # type: ignore[assignment]
    # Prompt tokens taken from the prefix cache, and those still to prefill (of the prompt, not in
    # its cache yet: what its prefill really costs).
    cached_tokens: int = property(lambda self: self._r.cached_tokens)  # type: ignore[assignment]
    prefill_remaining: int = property(lambda self: len(self._r.prompt_ids) - self._r.prefilled)  # type: ignore[assignment]
    at_boundary: bool = property(lambda self: self._r.at_boundary)  # type: ignore[assignment]
    ops_done: int = property(lambda self: self._r.ops_done)  # type: ignore[assignment]

    @property
    def op_key(self) -> tuple[int, int, int] | None:
        """Key of the pending op ``(kind, layer, expert)``; requests with equal keys batch together."""
        op = self._r.pending
        return None if op is None else op.key

    @property
    def op_kind(self) -> OpKind | None:
        op = self._r.pending
        return None if op is None else op.kind

    @property
    def progress_key(self) -> tuple[int, int, int]:
        """Where the pending op sits in a forward pass: ``(layer, kind, expert)``, head last.

        Running the smallest first lets requests that fell behind catch up and merge into one batch.
        """
        op = self._r.pending
        if op is None:
            return (1 << 30, 0, 0)
        layer = op.layer if op.layer >= 0 else 1 << 20
        kind = OpKind.ROUTER if op.kind is OpKind.MOE else op.kind  # both start a MoE layer
        return (layer, int(kind), op.expert)

    @property
    def rows(self) -> int:
        """Rows of the pending op that are this request's own (its new tokens)."""
        return self._r.rows

    @property
    def sort_key(self) -> tuple[int, int, float, int]:
        """LS before BE, then rank, then arrival, then sequence number."""
        return self._r.sort_key()

    def __repr__(self) -> str:
        return f"<RequestView {self.id} {self.priority_class} {self.phase} {self.status.label} op={self._r.pending}>"


class MemoryView:
    """The kernel's memory: the budget, and the bytes of request state resident and offloaded.

    Built from numbers (``MemoryView(budget, resident, offloaded)``, a fixed snapshot) or with
    :meth:`of` from the tensor manager, whose figures it reads when a policy asks (summing every
    cache's buffers costs time at each decision, and most policies never ask)."""

    __slots__ = ("_budget", "_offloaded", "_resident", "_tensors")

    def __init__(self, budget_bytes: int | None, resident_bytes: int, offloaded_bytes: int):
        self._budget, self._resident, self._offloaded = budget_bytes, resident_bytes, offloaded_bytes
        self._tensors = None

    @classmethod
    def of(cls, tensors: TensorManager) -> MemoryView:
        """A live view of ``tensors``: each figure read when asked."""
        view = cls(tensors.budget_bytes, 0, 0)
        view._tensors = tensors
        return view

    @property
    def budget_bytes(self) -> int | None:
        return self._budget

    @property
    def resident_bytes(self) -> int:
        return self._resident if self._tensors is None else self._tensors.resident_bytes

    @property
    def offloaded_bytes(self) -> int:
        return self._offloaded if self._tensors is None else self._tensors.offloaded_bytes

    def __repr__(self) -> str:
        return (
            f"MemoryView(budget_bytes={self.budget_bytes}, resident_bytes={self.resident_bytes}, "
            f"offloaded_bytes={self.offloaded_bytes})"
        )


class CostView:
    """What a policy may read of the kernel's cost model (:class:`~qllm.kernel.costs.OpCosts`)."""

    __slots__ = ("_c",)

    def __init__(self, costs: OpCosts):
        self._c = costs

    def predict(self, kind: OpKind, rows: int) -> float | None:
        """Predicted seconds of one batched op of ``kind`` over ``rows`` rows (None: never measured)."""
        return self._c.predict(kind, rows)

    def known(self, kind: OpKind) -> bool:
        """Whether the kernel has measured any op of ``kind``."""
        return self._c.known(kind)


class TenantView:
    """What a policy may read of the tenants' ledger (:class:`~qllm.kernel.tenants.TenantLedger`)."""

    __slots__ = ("_t",)

    def __init__(self, ledger: TenantLedger | None = None):
        self._t = ledger

    @property
    def quantum(self) -> float:
        """Seconds of weighted op time a tenant may run ahead of the least served one before its
        best-effort requests wait."""
        return 0.05 if self._t is None else self._t.quantum

    def weight(self, tenant: str) -> float:
        account = None if self._t is None else self._t.accounts.get(tenant)
        return 1.0 if account is None else account.weight

    def counter(self, tenant: str) -> float:
        """Weighted op seconds ``tenant`` received (0: unknown)."""
        account = None if self._t is None else self._t.accounts.get(tenant)
        return 0.0 if account is None else account.counter


@dataclass(frozen=True)
class KernelView:
    """Snapshot handed to a policy at each decision (lists are fresh; request views are live)."""

    now: float
    ready: Sequence[RequestView]  # admitted, with a pending op
    waiting: Sequence[RequestView]  # accepted, not admitted yet, in arrival order
    live: Sequence[RequestView]  # admitted and not finished
    max_batch: int
    memory: MemoryView
    costs: CostView = field(default_factory=lambda: CostView(OpCosts()))  # op time by kind and rows
    tenants: TenantView = field(default_factory=TenantView)  # the tenants' ledger
