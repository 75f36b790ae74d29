"""The tenants' ledger: who has been served how much, as a Virtual Token Counter (VTC; Sheng et
al., "Fairness in Serving Large Language Models", OSDI 2024) in the kernel's measured op time.

Every request is served for a tenant (``RequestSpec.tenant``; empty: ``default``). Each batched op
the kernel runs is charged to the tenants of its rows, in proportion to their rows: a tenant's
*service* is the op seconds its requests received, prefill and decode alike, and its *counter* is
that service divided by its weight. Policies serve the tenant with the lowest counter first within
a class (:mod:`qllm.policies.fair`), so that backlogged tenants receive op time in proportion to
their weights. A tenant that was idle (no request waiting or running) is lifted on its return to
the lowest counter of the backlogged tenants, so idle time banks no credit.

The table is bounded: at most ``max_tenants`` tenants are tracked; an idle one, the least recently
seen, is forgotten to make room (configured tenants are kept), and while every slot is busy a new
tenant's requests are served as the tenant ``other``.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from qllm.errors import TenantOverQuota
from qllm.kernel.config import FairnessConfig, TenantConfig

if TYPE_CHECKING:
    from qllm.kernel.request import Request

T = TypeVar("T")  # a request or a policy's view of one: it has tenant, client and tenant_counter

DEFAULT_TENANT = "default"  # the tenant of a request that names none
OVERFLOW_TENANT = "other"  # the tenant of new tenants' requests while every slot is busy
RECENT_S = 30.0  # time constant of the recent service behind Jain's index


class Account:
    """One tenant's entry in the ledger."""

    __slots__ = (
        "admitted",
        "config",
        "counter",
        "live",
        "name",
        "recent",
        "recent_at",
        "rejected",
        "requests",
        "service_s",
        "tokens",
    )

    def __init__(self, name: str, config: TenantConfig, counter: float = 0.0):
        self.name = name
        self.config = config
        self.counter = counter  # weighted service: op seconds / weight (the virtual counter)
        self.service_s = 0.0  # op seconds received
        self.requests = 0  # requests accepted
        self.rejected = 0  # requests refused over a quota
        self.tokens = 0  # tokens generated
        self.live = 0  # requests accepted and not finished (waiting or running)
        self.admitted = 0  # of those, running (admitted by the scheduler)
        self.recent = 0.0  # op seconds received, decayed with time constant RECENT_S
        self.recent_at = time.monotonic()

    @property
    def weight(self) -> float:
        return self.config.weight

    def decayed(self, now: float) -> float:
        """Recent service as of ``now``."""
        return self.recent * math.exp(-(now - self.recent_at) / RECENT_S)

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "counter": self.counter,
            "service_s": self.service_s,
            "recent_service_s": self.decayed(now),
            "requests": self.requests,
            "rejected": self.rejected,
            "tokens": self.tokens,
            "live": self.live,
            "running": self.admitted,
        }


class TenantLedger:
    """The accounts of the tenants the engine serves (owned by the dispatcher, read by policies
    through :class:`~qllm.kernel.view.TenantView`)."""

    def __init__(
        self, fairness: FairnessConfig | None = None, tenants: dict[str, TenantConfig] | None = None
    ):
        self.fairness = fairness or FairnessConfig()
        self.configured = dict(tenants or {})
        self.accounts: OrderedDict[str, Account] = OrderedDict()  # least recently entered first
        self._floor = 0.0  # the lowest backlogged counter, as last seen (lifts while none is backlogged)
        for name, config in self.configured.items():
            self.accounts[name] = Account(name, config)

    @property
    def quantum(self) -> float:
        return self.fairness.quantum

    def floor(self) -> float:
        """The lowest counter of the backlogged tenants (none backlogged: the last one seen)."""
        live = [a.counter for a in self.accounts.values() if a.live]
        if live:
            self._floor = min(live)
        return self._floor

    def account(self, name: str) -> Account:
        """The account of tenant ``name`` (``""``: the default tenant), made when new."""
        name = name or DEFAULT_TENANT
        account = self.accounts.get(name)
        if account is not None:
            return account
        if len(self.accounts) >= self.fairness.max_tenants + len(self.configured):
            idle = next(
                (a for a in self.accounts.values() if not a.live and a.name not in self.configured), None
            )
            if idle is None:
                return self._overflow()
            del self.accounts[idle.name]
        account = Account(name, self.configured.get(name, self.fairness.default), self.floor())
        self.accounts[name] = account
        return account

    def _overflow(self) -> Account:
        account = self.accounts.get(OVERFLOW_TENANT)
        if account is None:  # one more than the bound: the table holds at most max_tenants + 1
            account = Account(OVERFLOW_TENANT, self.fairness.default, self.floor())
            self.accounts[OVERFLOW_TENANT] = account
        return account

    def enter(self, request: Request, kv_bytes: int = 0) -> Account:
        """``request`` is accepted for its tenant: counted live, its tenant lifted to the floor if
        it was idle. Raises :class:`TenantOverQuota` where the tenant is at a quota and the action
        is ``reject`` (``kv_bytes``: the KV bytes its running requests hold)."""
        account = self.account(request.spec.tenant)
        if self.fairness.quota_action == "reject":
            over = over_quota(account, kv_bytes, live=account.live)
            if over is not None:
                account.rejected += 1
                raise TenantOverQuota(f"tenant {account.name!r} is at its quota of {over}; try again later")
        if not account.live:
            account.counter = max(account.counter, self.floor())  # no credit for idle time
        account.live += 1
        account.requests += 1
        self.accounts.move_to_end(account.name)
        request.account = account
        return account

    def leave(self, account: Account) -> None:
        """A request of ``account`` finished."""
        if account.live == 1:
            self.floor()  # remember the floor while this tenant still counts
        account.live -= 1

    def charge(self, rows: Iterable[tuple[Account, int]], seconds: float) -> None:
        """Op time ``seconds`` over the ``(account, rows)`` of a pass, split by rows."""
        rows = list(rows)
        total = sum(n for _, n in rows)
        if total <= 0 or seconds <= 0:
            return
        now = time.monotonic()
        for account, n in rows:
            share = seconds * n / total
            account.service_s += share
            account.counter += share / account.weight
            account.recent = account.decayed(now) + share
            account.recent_at = now

    def jain(self, now: float | None = None) -> float | None:
        """Jain's fairness index of the backlogged tenants' recent service, each divided by its
        weight: 1 when each receives its weighted share, 1/n when one receives all (None: fewer
        than two backlogged tenants)."""
        now = time.monotonic() if now is None else now
        shares = [a.decayed(now) / a.weight for a in self.accounts.values() if a.live]
        return jain_index(shares)

    @property
    def quotas(self) -> bool:
        """Whether a new request may be refused for its tenant's KV bytes (so they must be counted)."""
        configs = [self.fairness.default, *self.configured.values()]
        return self.fairness.quota_action == "reject" and any(c.max_kv_bytes is not None for c in configs)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per tenant: weight, counter, service, requests, tokens, live and running requests."""
        now = time.monotonic()
        return {name: a.snapshot(now) for name, a in self.accounts.items()}

    def summary(self) -> dict[str, Any]:
        """Jain's index and the settings."""
        return {
            "jain_index": self.jain(),
            "backlogged": sum(1 for a in self.accounts.values() if a.live),
            "max_tenants": self.fairness.max_tenants,
            "quantum_s": self.quantum,
            "quota_action": self.fairness.quota_action,
        }


def over_quota(account: Account, kv_bytes: int, *, live: int) -> str | None:
    """Which quota of ``account`` one more request would exceed, in words (None: neither):
    ``live`` requests already counted, ``kv_bytes`` held by its running requests."""
    config = account.config
    if config.max_live is not None and live >= config.max_live:
        return f"{config.max_live} live requests"
    if config.max_kv_bytes is not None and kv_bytes >= config.max_kv_bytes:
        return f"{config.max_kv_bytes} KV bytes"
    return None


def jain_index(values: Iterable[float]) -> float | None:
    """Jain's index ``(sum x)^2 / (n * sum x^2)`` (None: fewer than two values, or all zero)."""
    values = list(values)
    squares = sum(x * x for x in values)
    if len(values) < 2 or squares <= 0:
        return None
    return sum(values) ** 2 / (len(values) * squares)


def take_turns(
    ordered: list[T],
    group: Callable[[T], Any],
    within: Callable[[T], tuple] = lambda r: (),
    live: Iterable[T] = (),
) -> list[T]:
    """``ordered`` (in the caller's order) sorted in place so that its senders take turns within
    each ``group``: each tenant's clients in turn, then tenants in turn around them, the least
    served tenant first within a turn; ties keep their order. A request's turn counts the
    requests of its client (then its tenant) with the same ``within`` that are in ``live`` or
    ahead of it in ``ordered``."""
    facts = {id(r): (group(r), within(r), r.tenant, r.client, r.tenant_counter) for r in ordered}
    held_by = [(within(r), r.tenant, r.client) for r in live]
    for by_tenant in (False, True):  # clients in turn, then tenants in turn around them
        held = Counter((*w, t) if by_tenant else (*w, t, c) for w, t, c in held_by)
        turns: dict[int, int] = {}
        for r in ordered:
            _, w, t, c, _ = facts[id(r)]
            slot = (*w, t) if by_tenant else (*w, t, c)
            turns[id(r)] = held[slot]
            held[slot] += 1
        ordered.sort(key=lambda r, turns=turns: (facts[id(r)][0], turns[id(r)], facts[id(r)][4]))
    return ordered
