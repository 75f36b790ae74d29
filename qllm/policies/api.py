"""The policy plugin interface (API version 1): the one module a policy imports its types from.

A policy is a pure decision-maker over a read-only :class:`KernelView`. The kernel asks it, at
op boundaries, which waiting requests to admit and which ready requests' pending ops to run next
as one batch: at every boundary unless :meth:`Policy.steady` says it would choose the batch in
flight again, and at an arrival that :meth:`Policy.interrupts` lets stop a grouped MoE op. It never
computes anything itself. Besides :class:`Policy` and
:func:`batch_for`, this module holds what a policy reads: the views (:class:`KernelView`,
:class:`RequestView`, :class:`MemoryView`, :class:`CostView`) and the values they hold
(:class:`Phase`, :class:`PriorityClass`, :class:`RequestStatus`, :class:`OpKind`).

Write a plugin by subclassing :class:`Policy` and overriding any of the methods below, then
register the class under the entry-point group ``qllm.policies``::

    [project.entry-points."qllm.policies"]
    my-policy = "my_package.module:MyPolicy"

The built-in policies are registered the same way. See ``examples/edf_policy.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from qllm.kernel.request import Phase, PriorityClass, RequestStatus
from qllm.kernel.runtime.ops import OpKind
from qllm.kernel.slo import TPOT_STEPS
from qllm.kernel.view import CostView, KernelView, MemoryView, RequestView

API_VERSION = 1


class Policy:
    """Base policy: LS before BE, then rank, arrival; batches by op key; admits up to ``max_batch``."""

    api_version: ClassVar[int] = API_VERSION
    name: ClassVar[str] = "base"

    def order(self, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        """Ready requests, most urgent first."""
        return sorted(ready, key=lambda r: r.sort_key)

    def select(self, kernel: KernelView) -> Sequence[RequestView]:
        """The requests whose pending ops run next as one batch; they must share one ``op_key``.

        Default: the most urgent request's class leads; among that class the op furthest behind
        runs first (so requests converge into one batch), with every ready request at that op.
        Best-effort requests of a tenant over its share wait (:func:`within_share`), so a policy
        that keeps this method keeps tenants' weighted shares.
        """
        ordered = self.order(within_share(kernel.ready, kernel), kernel)
        if not ordered:
            return []
        lead = ordered[0].priority_class
        same_class = [r for r in ordered if r.priority_class == lead]
        key = min(same_class, key=lambda r: r.progress_key).op_key
        return batch_for(key, same_class, ordered, kernel.max_batch)

    def steady(self, batch: Sequence[RequestView]) -> bool:
        """Would this policy choose the same requests again at their next op, as long as nothing
        arrives, finishes or is admitted? Asked after :meth:`select` when its batch holds every
        live request; if True the kernel advances the batch op after op without asking until
        something changes (decisions then cost nothing). Default False: asked at every op, as
        policies written for API version 1 expect. Return True only for a choice that depends on
        which requests are ready and where, not on the time or on what ran before."""
        return False

    def interrupts(self, request: RequestView) -> bool:
        """Should this arriving request stop the op in flight (a grouped MoE op stops at its next
        expert), so that the policy is asked at once? Return False for arrivals this policy would
        not run before the batch in flight ends its pass: they are then admitted at the next
        decision, and the grouped op keeps its speed. Default True: every arrival interrupts."""
        return True

    def precedence(self, request: RequestView) -> tuple:
        """How this policy ranks requests against each other (smaller runs first).

        A running request that is passed over for a batch holding a request of strictly smaller
        precedence counts as preempted (its ``preemptions`` grows). Default: class, then rank.
        """
        return (0 if request.is_ls else 1, request.rank)

    def admit(self, request: RequestView, kernel: KernelView) -> bool:
        """May this waiting request start now? Waiting requests are offered by precedence, then
        arrival; the first refusal ends admission for this step."""
        return request.is_ls or len(kernel.live) < kernel.max_batch

    def on_arrival(self, request: RequestView, kernel: KernelView) -> None:
        """A request was accepted."""

    def on_finish(self, request: RequestView, kernel: KernelView) -> None:
        """A request finished (any final status)."""


def within_share(requests: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
    """``requests`` without the best-effort ones whose tenant is over its share: more than
    ``kernel.tenants.quantum`` seconds of weighted op time ahead of the least-served tenant with
    best-effort requests among ``requests`` (they wait where they stand, their state kept, until
    it catches up). LS requests always stay (LS comes before BE, and an LS request's latency is
    not traded for fairness). See qllm/policies/fair.py."""
    counters = {r.tenant: r.tenant_counter for r in requests if not r.is_ls}
    if len(counters) <= 1:
        return list(requests)
    limit = min(counters.values()) + kernel.tenants.quantum
    return [r for r in requests if r.is_ls or r.tenant_counter <= limit]


def batch_for(
    key: tuple[int, int, int] | None,
    primary: Sequence[RequestView],
    fill: Sequence[RequestView],
    max_batch: int,
) -> list[RequestView]:
    """Requests at op ``key``: those of ``primary`` first, then of ``fill``, at most ``max_batch``
    (none when ``max_batch`` is 0 or less: no room left)."""
    if key is None or max_batch <= 0:
        return []
    batch: list[RequestView] = []
    seen: set[str] = set()
    for group in (primary, fill):
        for r in group:
            if r.op_key == key and r.id not in seen:
                batch.append(r)
                seen.add(r.id)
                if len(batch) >= max_batch:
                    return batch
    return batch


__all__ = [
    "API_VERSION",
    "TPOT_STEPS",
    "CostView",
    "KernelView",
    "MemoryView",
    "OpKind",
    "Phase",
    "Policy",
    "PriorityClass",
    "RequestStatus",
    "RequestView",
    "batch_for",
    "within_share",
]
