"""Fair sharing of a class between tenants and between clients (pure helpers for policies).

A request is served for a tenant (``RequestView.tenant``: the request names it, else the server
names the peer's uid) and sent by a client (``RequestView.client``: the connection). The kernel
charges every op it runs to the tenants of its rows (qllm/kernel/tenants.py), weighted:
``RequestView.tenant_counter`` is a tenant's weighted op time so far, and the tenant with the
lowest counter is the one served least.

- :func:`within_share` is the enforcement: best-effort requests of a tenant more than a quantum
  ahead of the least-served backlogged tenant wait where they stand (a preemption at an op
  boundary; their state is kept) until the others catch up. So backlogged tenants receive a
  class's op time in proportion to their weights, whatever their numbers of requests.
- :func:`fair_order` is the order among requests a policy ranks equally (same class and rank):
  tenants in turn, the least served first, and within a tenant its clients in turn. With one
  tenant and one client it returns exactly the order it was given.
- :func:`fair_share` and :func:`runnable` keep one sender's surplus beyond ``max_batch`` from
  crowding out another's share of the batch.

``cohort`` (the default) and ``priority-aging`` use all of them, and the base
:meth:`Policy.select` filters through :func:`within_share` (defined in :mod:`qllm.policies.api`),
so a plugin that keeps it keeps the shares; one with its own ``select`` filters its ready
requests through :func:`within_share` and orders with :func:`fair_order`.
The kernel admits waiting requests taking tenants and clients in turn for every policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from qllm.kernel.tenants import take_turns
from qllm.policies.api import KernelView, RequestView, within_share


def sender(r: RequestView) -> tuple[str, str]:
    """Who a request's share is counted for: its tenant and client."""
    return (r.tenant, r.client)


def fair_order(
    requests: Iterable[RequestView],
    key: Callable[[RequestView], Any],
    group: Callable[[RequestView], Any] = lambda r: (not r.is_ls, r.rank),
) -> list[RequestView]:
    """``requests`` sorted by ``key``, then round-robin within each ``group`` (which must order like
    a prefix of ``key``): tenants in turn, the least served first, and each tenant's clients in
    turn among its requests."""
    ordered = sorted(requests, key=key)
    senders = {r.id: sender(r) for r in ordered}
    if len(set(senders.values())) <= 1:
        return ordered
    groups = {r.id: group(r) for r in ordered}
    return take_turns(ordered, lambda r: groups[r.id], within=lambda r: (r.is_ls, groups[r.id]))


def fair_share(request: RequestView, kernel: KernelView) -> bool:
    """Whether a best-effort ``request`` may start beyond ``max_batch`` to even out the class:
    its sender (tenant and client) holds less than an equal share of ``max_batch`` while another
    holds more. (The batch builder then passes over the excess, see :func:`runnable`.) Live
    requests stay under twice ``max_batch``."""
    if request.is_ls or len(kernel.live) >= 2 * kernel.max_batch:
        return False
    same = [r for r in (*kernel.live, *kernel.waiting) if r.is_ls == request.is_ls]
    share = max(1, kernel.max_batch // len({sender(r) for r in same}))
    held = Counter(sender(r) for r in kernel.live if r.is_ls == request.is_ls)
    return held[sender(request)] < share and any(n > share for n in held.values())


def runnable(queues: Sequence[list[RequestView]], max_batch: int) -> list[list[RequestView]]:
    """The same queues (of one class) without the requests past the first ``max_batch`` in fair
    order over all of them: those wait, so one sender's surplus cannot crowd out another's share."""
    merged = [r for queue in queues for r in queue]
    if len(merged) <= max_batch:
        return [list(queue) for queue in queues]
    keep = {
        r.id
        for r in fair_order(merged, key=lambda r: (r.rank, r.arrival, r.seq), group=lambda r: r.rank)[
            :max_batch
        ]
    }
    return [[r for r in queue if r.id in keep] for queue in queues]


__all__ = ["fair_order", "fair_share", "runnable", "sender", "within_share"]
