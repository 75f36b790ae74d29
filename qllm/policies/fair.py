"""Fair sharing of a class between clients (pure helpers for policies).

A request carries the client that sent it (``RequestView.client``: the server passes the
connection; the per-user connection cap bounds how many shares one user can hold). Among requests
a policy ranks equally (same class and rank), these helpers take clients in turn: each client's
first request comes before any client's second, and so on. With one client they return exactly
the order they were given, so single-client behaviour is unchanged. ``cohort`` (the default)
and ``priority-aging`` use them; the kernel admits waiting requests taking clients in turn for
every policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from qllm.policies.api import KernelView, RequestView


def fair_order(
    requests: Iterable[RequestView],
    key: Callable[[RequestView], Any],
    group: Callable[[RequestView], Any] = lambda r: (not r.is_ls, r.rank),
) -> list[RequestView]:
    """``requests`` sorted by ``key``, then round-robin across clients within each ``group``
    (which must order like a prefix of ``key``)."""
    ordered = sorted(requests, key=key)
    if len({r.client for r in ordered}) <= 1:
        return ordered
    seen: Counter = Counter()
    turns: dict[str, int] = {}
    for r in ordered:
        slot = (r.is_ls, group(r), r.client)
        turns[r.id] = seen[slot]
        seen[slot] += 1
    return sorted(ordered, key=lambda r: (group(r), turns[r.id]))  # stable: ``key`` order within a turn


def fair_share(request: RequestView, kernel: KernelView) -> bool:
    """Whether a best-effort ``request`` may start beyond ``max_batch`` to even out the class:
    its client holds less than an equal share of ``max_batch`` while another holds more. (The
    batch builder then passes over the excess, see :func:`runnable`.) Live requests stay under
    twice ``max_batch``."""
    if request.is_ls or len(kernel.live) >= 2 * kernel.max_batch:
        return False
    same = [r for r in (*kernel.live, *kernel.waiting) if r.is_ls == request.is_ls]
    share = max(1, kernel.max_batch // len({r.client for r in same}))
    held = Counter(r.client for r in kernel.live if r.is_ls == request.is_ls)
    return held[request.client] < share and any(n > share for n in held.values())


def runnable(queues: Sequence[list[RequestView]], max_batch: int) -> list[list[RequestView]]:
    """The same queues (of one class) without the requests past the first ``max_batch`` in fair
    order over all of them: those wait, so one client's surplus cannot crowd out another's share."""
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
