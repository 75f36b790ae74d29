"""The scheduler: which waiting requests start, and which ready requests run their next op together.

At each decision it admits the waiting requests the policy lets start, asks the policy for a batch
and accounts preemption; what it chose is a :class:`Batch`. Every call into the policy goes
through :class:`GuardedPolicy`, whose one rule isolates a policy that fails. The scheduler also
keeps the tensor manager in step with its decisions: a chosen request's cache is brought back
before it runs, and after a step the budget is enforced and what the policy would run next is
prefetched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from qllm.kernel.request import Request, RequestStatus
from qllm.kernel.tenants import TenantLedger, over_quota, take_turns
from qllm.kernel.view import CostView, KernelView, MemoryView, RequestView, TenantView
from qllm.logging import get_logger

if TYPE_CHECKING:
    from qllm.kernel.costs import OpCosts
    from qllm.kernel.stats import KernelStats
    from qllm.kernel.tensors import TensorManager
    from qllm.models.base import MoEModel
    from qllm.policies.api import Policy

log = get_logger()
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Batch:
    """Requests chosen to run their pending op together (they share its key), and whether the
    choice is steady: the batch is every live request and the policy would choose it again at its
    next op, so the pass advances without asking until something changes."""

    requests: list[Request]
    steady: bool


class GuardedPolicy:
    """The policy as the kernel calls it. A method that raises, or answers with a value of the
    wrong shape, counts a policy error, is logged as ``policy_error`` and is answered by the
    fallback policy instead (the scheduler treats an invalid batch the same way)."""

    def __init__(self, policy: Policy, fallback: Policy, stats: KernelStats):
        self.policy = policy
        self.fallback = fallback
        self.stats = stats

    @property
    def name(self) -> str:
        return self.policy.name

    def call(self, method: str, shape: Callable[[object], T], *args: object) -> T:
        """``shape(policy.method(*args))``, or the fallback's when that raises."""
        try:
            return shape(getattr(self.policy, method)(*args))
        except Exception:
            self.stats.policy_errors += 1
            log.exception("policy_error", policy=self.policy.name, method=method)
            return shape(getattr(self.fallback, method)(*args))

    def order(self, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        return self.call("order", list, ready, kernel)

    def admit(self, request: RequestView, kernel: KernelView) -> bool:
        return self.call("admit", bool, request, kernel)

    def precedence(self, request: RequestView) -> tuple:
        return self.call("precedence", tuple, request)

    def interrupts(self, request: RequestView) -> bool:
        return self.call("interrupts", bool, request)

    def steady(self, batch: Sequence[RequestView]) -> bool:
        return self.call("steady", bool, batch)

    def on_arrival(self, request: RequestView, kernel: KernelView) -> None:
        self.call("on_arrival", _none, request, kernel)

    def on_finish(self, request: RequestView, kernel: KernelView) -> None:
        self.call("on_finish", _none, request, kernel)

    def select(self, kernel: KernelView) -> list[object]:
        """The policy's batch as a list (of views, unless the policy got it wrong)."""
        chosen = self.call("select", _identity, kernel)
        try:
            return list(chosen)
        except Exception:  # not a collection of views at all (or a lazy one that raised)
            return [chosen]


def _none(_: object) -> None:
    return None


def _identity(value: T) -> T:
    return value


def last_resort(kernel: KernelView) -> list[RequestView]:
    """A batch decided without any policy: the most urgent request's class leads, the op furthest
    behind in that class runs, with every ready request at it (that class first)."""
    ordered = sorted(kernel.ready, key=lambda r: r.sort_key)
    if not ordered or kernel.max_batch <= 0:
        return []
    lead = ordered[0].priority_class
    same_class = [r for r in ordered if r.priority_class == lead]
    key = min(same_class, key=lambda r: r.progress_key).op_key
    at_key = [r for r in same_class if r.op_key == key]
    at_key += [r for r in ordered if r.op_key == key and r.priority_class != lead]
    return at_key[: kernel.max_batch]


class Scheduler:
    """Owns the waiting and live requests and the policy's view of them."""

    def __init__(
        self,
        model: MoEModel,
        policy: Policy,
        fallback: Policy,
        tensors: TensorManager,
        *,
        stats: KernelStats,
        costs: OpCosts,
        max_batch: int,
        tenants: TenantLedger | None = None,
    ):
        self.model = model
        self.policy = GuardedPolicy(policy, fallback, stats)
        self.tensors = tensors
        self.stats = stats
        self.max_batch = max_batch
        self.waiting: list[Request] = []  # accepted, not admitted, in arrival order
        self.live: dict[str, Request] = {}  # admitted, not finished
        self.views: dict[str, RequestView] = {}  # of every waiting and live request
        self._costs = CostView(costs)
        self.tenants = tenants or TenantLedger()
        self._tenants = TenantView(self.tenants)

    def view(self) -> KernelView:
        views = self.views
        live = [views[rid] for rid in self.live]
        return KernelView(
            now=time.monotonic(),
            ready=live,  # every admitted request waits on an op: its pass's or its next pass's first
            waiting=[views[r.id] for r in self.waiting],
            live=list(live),
            max_batch=self.max_batch,
            memory=MemoryView.of(self.tensors),
            costs=self._costs,
            tenants=self._tenants,
        )

    # ---------------------------------------------------------------- arrivals and departures
    def arrive(self, request: Request) -> None:
        self.views[request.id] = RequestView(request)
        self.waiting.append(request)
        self.policy.on_arrival(self.views[request.id], self.view())

    def interrupts(self, request: Request) -> bool:
        """Should ``request``, arriving, stop the op in flight (the policy would run it first)?"""
        return self.policy.interrupts(RequestView(request))

    def find(self, request_id: str) -> Request | None:
        """The waiting or live request ``request_id``."""
        return self.live.get(request_id) or next((r for r in self.waiting if r.id == request_id), None)

    def remove(self, request: Request) -> None:
        """A finished request leaves: its memory is released and the policy told."""
        if self.live.pop(request.id, None) is not None and request.account is not None:
            request.account.admitted -= 1
        if request in self.waiting:
            self.waiting.remove(request)
        self.tensors.release(request.id)
        request.cache = None
        view = self.views.pop(request.id, None)
        if view is not None:
            self.policy.on_finish(view, self.view())

    def admissions(self) -> Iterator[Request]:
        """Admit waiting requests the policy lets start, each yielded as it becomes live (with its
        cache) and before the policy is asked about the next.

        They are offered by the policy's precedence, then tenants and clients in turn (the tenant
        served least first), then arrival; the first refusal ends admission (so an LS request never
        queues behind BE requests that cannot start yet, nor one client's request behind another
        client's backlog). A request whose tenant is at a quota waits without ending admission.
        With nothing live the first is admitted whatever the policy says, so that work always
        progresses."""
        if not self.waiting:
            return
        for request in self._admission_order():
            if self._over_quota(request):
                continue
            if not self.policy.admit(self.views[request.id], self.view()) and self.live:
                return
            self.waiting.remove(request)
            if request.account is not None:
                request.account.admitted += 1
            request.cache = self.model.new_cache(self.tensors.pool)
            self.tensors.register(request.id, request.cache)
            request.cached_tokens = request.prefilled = self.tensors.attach_prefix(
                request.id, request.prompt_ids, ls=request.is_ls
            )
            self.live[request.id] = request
            yield request

    def passed(self, request: Request) -> None:
        """``request``'s forward pass finished every layer: a prefill chunk is in its cache (and
        may publish a prefix)."""
        if request.token_ids or request.forward is None:
            return
        start = request.prefilled
        request.prefilled += request.rows
        self.tensors.prefilled(request.id, request.prompt_ids, start, request.prefilled, ls=request.is_ls)

    def _admission_order(self) -> list[Request]:
        waiting = self.waiting
        first = {r.id: self._precedence(r) for r in waiting}  # one policy call per request
        ordered = sorted(waiting, key=lambda r: (first[r.id], r.arrival, r.seq))
        # Tenants in turn (the least served first), and within a tenant its clients in turn,
        # counting the requests of the same tenant (client) live or ahead.
        take_turns(ordered, group=lambda r: first[r.id], live=self.live.values())
        return ordered

    def _over_quota(self, request: Request) -> bool:
        """Whether ``request``'s tenant is at a quota, so that it waits (``quota_action = "wait"``)."""
        account = request.account
        if account is None or (account.config.max_live is None and account.config.max_kv_bytes is None):
            return False
        return over_quota(account, self.kv_bytes(request.tenant), live=account.admitted) is not None

    def kv_bytes(self, tenant: str) -> int:
        """KV bytes held by ``tenant``'s running requests."""
        return sum(r.cache.nbytes for r in self.live.values() if r.cache is not None and r.tenant == tenant)

    def _precedence(self, request: Request) -> tuple:
        return self.policy.precedence(self.views[request.id])

    # ---------------------------------------------------------------- decisions
    def schedule(self) -> Batch | None:
        """The policy's batch for this step (None: nothing to run), its members marked running,
        the requests it outranks suspended, and its caches resident."""
        view = self.view()
        requests = self._select(view)
        if not requests:
            return None
        self.stats.decisions += 1
        self._account_preemption(requests, time.monotonic())
        self.tensors.before_run([r.id for r in requests])
        steady = len(requests) == len(self.live) and self.policy.steady([self.views[r.id] for r in requests])
        return Batch(requests, steady)

    def _select(self, view: KernelView) -> list[Request]:
        """The policy's batch; when it is not valid (:meth:`_valid`), a policy error, logged as
        ``policy_bad_batch``, and the fallback's batch, or when that is not valid either, the
        :func:`last_resort`."""
        if not view.ready:
            return []
        chosen = self.policy.select(view)
        batch = self._valid(chosen)
        if batch is None:
            self.stats.policy_errors += 1
            log.error(
                "policy_bad_batch", policy=self.policy.name, batch=[getattr(r, "id", r) for r in chosen]
            )
            batch = self._valid(self.policy.fallback.select(view)) or self._valid(last_resort(view))
        return batch or []

    def _valid(self, chosen: Iterable[object]) -> list[Request] | None:
        """The live requests of a chosen batch, or None when it is not a valid batch: empty, not
        live, not ready, twice the same, at different ops, or more than ``max_batch``."""
        if not chosen:
            return None
        ids = [getattr(r, "id", None) for r in chosen]
        requests = [self.live.get(rid) if isinstance(rid, str) else None for rid in ids]
        if any(r is None or r.pending is None for r in requests) or len(set(ids)) != len(ids):
            return None
        if len({r.pending.key for r in requests}) != 1 or len(requests) > self.max_batch:
            return None
        return requests

    def _account_preemption(self, batch: list[Request], now: float) -> None:
        """Batch members run; running requests outranked by the batch are suspended (preempted)."""
        precedence = self._precedence
        lead = min(precedence(r) for r in batch)
        members = set(map(id, batch))
        for request in self.live.values():
            if id(request) in members:
                if request.first_scheduled is None:
                    request.first_scheduled = now
                request.status = RequestStatus.RUNNING
            elif request.status is RequestStatus.RUNNING and precedence(request) > lead:
                request.status = RequestStatus.SUSPENDED
                request.preemptions += 1

    def after_step(self) -> None:
        """Keep memory within budget; bring back what the policy will likely run next."""
        self.tensors.enforce({r.id for r in self.live.values() if r.status is RequestStatus.RUNNING})
        if self.tensors.has_offloaded:
            view = self.view()
            upcoming = self.policy.order(view.ready, view)[: self.max_batch]
            self.tensors.prefetch([r.id for r in upcoming])
