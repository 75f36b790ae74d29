"""``cohort`` (default): LS first within a latency budget; best-effort work rides along and stays whole.

- **An LS request waiting for its first token leads**: of those, the oldest (with every such LS
  request at the same op); newer ones catch up with it within its slack (below). Its op runs
  next, and every other ready request at that op rides along, LS decode first, then BE (decode
  rows and prefill chunks alike), for as long as the op's predicted time (the kernel's cost
  model, :attr:`KernelView.costs`) stays within ``stretch`` times the predicted time of the LS
  rows alone. Riding is what makes preemption cheap for best-effort work: the weights an LS op
  reads anyway serve the BE rows too.
- **It runs alone only until it reaches the cohort, then they advance together**, within its
  budget. Once the lead is less than a layer ahead of requests in the middle of their pass (the
  cohort, spread over the experts of a layer), those run first, so that the lead and the cohort
  meet at each op, as long as the lead's slack allows: ``stretch`` times the predicted time of its
  own ops so far, minus the time since it arrived. Newer LS requests behind it catch up the same
  way. Out of slack, the lead runs on alone, so that a stream of LS arrivals never holds back
  the oldest one.
- **Without LS work every ready request is one cohort**, stepped like an iteration-level batch at
  op granularity: requests in the middle of a pass run before requests at a pass boundary, the op
  furthest behind first. So requests left behind (ridden past, or cut by the budget) rejoin the
  cohort at the next step boundary instead of trailing as small batches.
- **With ``pace`` (off by default: ``--policy cohort:pace=true``; qllm/policies/pace.py), LS
  requests past their first token get each next token within their TPOT SLO**: without an LS request waiting for its first token, the LS
  requests decoding run ahead of best-effort work, which rides along only while the cost model
  predicts the LS pass still ends by its deadline, and otherwise runs its ops in the time the LS
  requests do not need (at least ``floor`` of it, default 0.2). When every request fits the budget
  this is the cohort of the rule above: light LS load costs best-effort work nothing.
  ``tpot_scale`` (default 0.9) is the plan's deadline in TPOT SLOs after the latest token; higher
  (``cohort:tpot_scale=2``) cuts riders later, for more best-effort throughput and a slower LS
  stream.
- **Tenants share each class by weight.** Best-effort requests of a tenant more than a quantum
  of weighted op time ahead of the least-served tenant wait where they stand until it catches
  up; requests a rule ranks equally take tenants and clients in turn (qllm/policies/fair.py).
- **At most ``max_batch`` requests run per step.** LS requests are admitted beyond ``max_batch``;
  the best-effort requests beyond it then wait at their pass boundary until requests finish
  (:meth:`CohortPolicy.runnable`), so that the cohort stays one batch instead of running each op
  twice (once for ``max_batch`` requests, once for the rest).

``stretch`` (default 1.0, an option: ``--policy cohort:stretch=1.3``) is the budget: an LS request
waiting for its first token may spend ``stretch - 1`` times its own time on riders and on waiting
for the cohort. At 1.0 it spends only what it gained by running faster than the cost model
predicted: LS prefill runs alone as a rule (LS requests within a layer of each other still
batch), and the best-effort cohort waits whole instead of being split by riders.
``pairs`` (default off, ``--policy cohort:pairs=true``): the next LS request waiting for its first
token catches up with the lead alone, then shares its ops, where the cost model predicts a lower
worse ratio of TTFT to each one's pass alone than the lead finishing first. It is off because
where shared ops cost more than their rows predict (a MoE op on a CPU), sharing makes the LS tail
worse.
``tail`` (default off, ``--policy cohort:tail=true``): an LS request's target is the 90th
percentile of recent LS requests' passes alone where that is longer than its own, so a short one
lets best-effort work ride up to what a long one takes alone: more best-effort throughput for a
worse LS tail.

The default ``stretch`` is 1.0 because on a CPU a MoE op's time grows with the experts its rows
use, so riders cost an LS op far more than their rows suggest: 1.3 buys about no best-effort
throughput for a worse LS TTFT tail (docs/benchmarks.md has the figures). On hardware where
extra rows are nearly free, a larger ``stretch`` lets best-effort work ride.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from qllm.policies.api import KernelView, OpKind, Phase, Policy, RequestView
from qllm.policies.fair import fair_order, fair_share, within_share
from qllm.policies.pace import FREE, SCALE, Pacer

TAIL_WINDOW = 64
"""With ``tail``: how many recent LS requests' passes alone make the floor."""
TAIL_QUANTILE = 0.9
"""With ``tail``: which quantile of them is the floor."""


def cohort_position(r: RequestView) -> tuple:
    """Where a request stands in the cohort: mid-pass before a pass boundary, then furthest behind."""
    return (r.at_boundary, r.progress_key)


class CohortPolicy(Policy):
    name = "cohort"

    def __init__(
        self,
        stretch: float = 1.0,
        pairs: bool = False,
        tail: bool = False,
        pace: bool = False,
        floor: float = 0.2,
        tpot_scale: float = SCALE,
        free: float = FREE,
    ):
        if stretch < 1:
            raise ValueError("stretch must be >= 1 (the LS op's own time is the least it can take)")
        self.stretch = stretch
        self.pairs = pairs  # the next LS request catches up with the lead where that lowers the worse ratio
        self.tail = tail  # an LS request's budget is the tail of LS passes alone, not its own pass
        self.layers = 0  # layers of the model, as seen in the ops so far
        self.solo_s: dict[str, float] = {}  # LS request -> predicted time of its ops run so far, alone
        self.passes: deque[float] = deque(maxlen=TAIL_WINDOW)  # recent LS passes alone, predicted (tail)
        self.floor_s: dict[str, float] = {}  # LS request -> the tail of LS passes when it first led (tail)
        # LS decode within its TPOT budget (qllm/policies/pace.py); its options are checked either way
        pacer = Pacer(floor, tpot_scale, free)
        self.pacer = pacer if pace else None

    def leads(self, ready: Sequence[RequestView]) -> list[RequestView]:
        """LS requests still waiting for their first token, of the best rank, oldest first."""
        urgent = [r for r in ready if r.is_ls and r.phase is Phase.PREFILL]
        rank = min((r.rank for r in urgent), default=0)
        return sorted((r for r in urgent if r.rank == rank), key=lambda r: (r.arrival, r.seq))

    def select(self, kernel: KernelView) -> Sequence[RequestView]:
        ready = self.runnable(kernel)
        if not ready:
            return []
        if len(ready) != len(kernel.ready):
            kernel = replace(kernel, ready=ready)
        layers = (r.progress_key[0] + 1 for r in ready if r.op_kind is not OpKind.HEAD)
        self.layers = max(self.layers, *layers, 0)
        leads = self.leads(ready)
        if not leads:
            paced = self.pacer and self.pacer.select(ready, kernel, cohort_position, self._layer, self.rest_s)
            if paced:
                return paced
            return self.members(min(ready, key=cohort_position).op_key, ready, kernel)
        lead = leads[0]  # the oldest: a newer LS request never delays it beyond its slack
        if self.tail:
            self.note_passes(leads, kernel)
        slack = self.slack_s(lead, kernel)
        batch = self.catch_up(lead, leads, ready, kernel, slack)
        if not batch:
            primary = [r for r in leads if r.op_key == lead.op_key][: kernel.max_batch]
            chosen = {r.id for r in primary}
            riders = fair_order(
                (r for r in ready if r.op_key == lead.op_key and r.id not in chosen), key=lambda r: r.sort_key
            )
            batch = self.fill(primary, riders, kernel, slack)
        for r in batch:
            if r.is_ls and r.phase is Phase.PREFILL:
                self.solo_s[r.id] = self.solo_s.get(r.id, 0.0) + (
                    kernel.costs.predict(r.op_kind, r.rows) or 0.0
                )
        return batch

    def runnable(self, kernel: KernelView) -> Sequence[RequestView]:
        """The ready requests this step may run: those within their tenant's share
        (qllm/policies/fair.py: best-effort requests of a tenant over it wait), and of those all,
        or when more than ``max_batch`` (LS requests are admitted beyond it), the first
        ``max_batch`` of: LS requests waiting for their first token (oldest first), LS requests
        decoding, best-effort requests in the middle of a pass, best-effort requests at a pass
        boundary (tenants and clients in turn). The others wait where they stand, at a pass
        boundary as a rule, until requests finish: else the cohort would run every op twice, once
        for ``max_batch`` requests and once for the excess."""
        ready = kernel.ready
        if len(ready) > 1:
            ready = within_share(ready, kernel)
        if len(ready) <= kernel.max_batch:
            return ready
        order = [
            *sorted(
                (r for r in ready if r.is_ls and r.phase is Phase.PREFILL),
                key=lambda r: (r.rank, r.arrival, r.seq),
            ),
            *fair_order(
                (r for r in ready if r.is_ls and r.phase is not Phase.PREFILL), key=lambda r: r.sort_key
            ),
            *fair_order((r for r in ready if not r.is_ls and not r.at_boundary), key=lambda r: r.sort_key),
            *fair_order((r for r in ready if not r.is_ls and r.at_boundary), key=lambda r: r.sort_key),
        ]
        keep = {r.id for r in order[: kernel.max_batch]}
        return [r for r in ready if r.id in keep]

    def catch_up(
        self,
        lead: RequestView,
        leads: Sequence[RequestView],
        ready: Sequence[RequestView],
        kernel: KernelView,
        slack: float,
    ) -> list[RequestView]:
        """The batch that lets requests behind ``lead`` catch up with it, within ``lead``'s slack
        (empty: ``lead`` runs on). Behind it: the cohort it reached (see :meth:`reached`) and newer
        LS requests still waiting for their first token. The op furthest behind runs, with the
        ready requests at it that fit the slack, most urgent first."""
        reached = self.reached(lead, ready)
        # Newer LS requests less than a layer behind join the lead whatever its slack: they cost
        # it at most a layer of their ops, and save themselves its whole pass.
        close = [r for r in reached if r.is_ls and r.phase is Phase.PREFILL and r.rank == lead.rank]
        if close:
            key = min(close, key=lambda r: r.progress_key).op_key
            primary = [r for r in close if r.op_key == key][: kernel.max_batch]
            others = [r for r in self.members(key, ready, kernel) if r not in primary]
            return self._fit(primary, others, kernel, slack)
        if self.pairs:
            second = next((r for r in leads[1:] if r.progress_key < lead.progress_key), None)
            if second is not None and self.pair_gains(lead, second, kernel):
                return [r for r in leads if r.op_key == second.op_key][: kernel.max_batch]
        behind = {r.id: r for r in reached}
        behind.update((r.id, r) for r in leads if r.progress_key < lead.progress_key)
        if not behind or slack <= 0:
            return []
        key = min(behind.values(), key=lambda r: r.progress_key).op_key
        return self._fit([], self.members(key, ready, kernel), kernel, slack)

    def steady(self, batch: Sequence[RequestView]) -> bool:
        # Without an LS request waiting for its first token, every ready request is one cohort,
        # chosen whole at each op. With one, the budget decides at each op who rides along.
        return not self.leads(batch)

    def interrupts(self, request: RequestView) -> bool:
        # Best-effort newcomers start at a pass boundary, after the cohort's pass: only an LS
        # arrival changes what runs before then, or the first request of a tenant back from idle,
        # which the running tenants may be ahead of by more than their share (qllm/policies/fair.py).
        return request.is_ls or request.tenant_live == 1

    def on_finish(self, request: RequestView, kernel: KernelView) -> None:
        self.solo_s.pop(request.id, None)
        self.floor_s.pop(request.id, None)

    def note_passes(self, leads: Sequence[RequestView], kernel: KernelView) -> None:
        """With ``tail``: each LS request waiting for its first token, the first time it is seen
        with a predictable pass, adds its predicted pass alone to the recent ones and takes their
        ``TAIL_QUANTILE`` as its floor."""
        for r in leads:
            if r.id in self.floor_s or r.id in self.solo_s:
                continue
            whole = self.rest_s(OpKind.ATTENTION, 0, r.rows, kernel) if r.at_boundary else None
            if whole is None:
                continue
            self.passes.append(whole)
            ordered = sorted(self.passes)
            self.floor_s[r.id] = ordered[min(len(ordered) - 1, int(TAIL_QUANTILE * len(ordered)))]

    def members(self, key, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        """Every ready request at op ``key``, most urgent first (clients in turn among equally urgent
        ones, see qllm/policies/fair.py), at most ``max_batch``."""
        return fair_order((r for r in ready if r.op_key == key), key=lambda r: r.sort_key)[: kernel.max_batch]

    def admit(self, request: RequestView, kernel: KernelView) -> bool:
        # A client under its fair share of a full best-effort class may start beyond max_batch.
        return super().admit(request, kernel) or fair_share(request, kernel)

    def _layer(self, r: RequestView) -> int:
        return self.layers if r.op_kind is OpKind.HEAD else r.progress_key[0]

    def reached(self, lead: RequestView, ready: Sequence[RequestView]) -> list[RequestView]:
        """Requests behind ``lead`` by less than a layer: the cohort that ``lead`` caught up with
        (within a layer, requests sit at different experts; at ``lead``'s first layer, requests
        that start their next pass are that close too)."""
        layer = self._layer(lead)
        return [r for r in ready if r.progress_key < lead.progress_key and self._layer(r) >= layer - 1]

    def remaining_s(self, lead: RequestView, kernel: KernelView) -> float | None:
        """Predicted time of ``lead``'s ops alone from its next op through its pass's head (None:
        op kinds of its pass not measured yet, e.g. with per-expert MoE ops)."""
        return self.rest_s(lead.op_kind, lead.progress_key[0], lead.rows, kernel)

    def rest_s(self, kind: OpKind, layer: int, rows: int, kernel: KernelView) -> float | None:
        """Predicted time of a pass's ops of ``rows`` rows alone, from op ``kind`` of ``layer``
        through the head (None: attention or MoE ops not measured yet; an unmeasured head counts
        as nothing)."""
        if kind is OpKind.HEAD:
            return kernel.costs.predict(kind, rows)
        attention = kernel.costs.predict(OpKind.ATTENTION, rows)
        moe = kernel.costs.predict(OpKind.MOE, rows)
        if attention is None or moe is None or kind not in (OpKind.ATTENTION, OpKind.MOE):
            return None
        layers = max(self.layers - layer, 1)
        head = kernel.costs.predict(OpKind.HEAD, 1) or 0.0
        return layers * (attention + moe) - (attention if kind is OpKind.MOE else 0.0) + head

    def pair_gains(self, lead: RequestView, second: RequestView, kernel: KernelView) -> bool:
        """Whether ``second`` (an LS request behind ``lead``, both waiting for their first token)
        catching up with ``lead`` alone and then sharing its ops is predicted to end the two
        passes with a lower worse ratio of TTFT to the request's own pass alone than ``lead``
        finishing first. Catching up costs ``lead`` the time ``second`` takes to reach it, and
        shared ops take longer; waiting costs ``second`` the rest of ``lead``'s pass."""
        layer, kind = self._layer(lead), lead.op_kind
        lead_rest = self.rest_s(kind, layer, lead.rows, kernel)
        second_rest = self.rest_s(second.op_kind, self._layer(second), second.rows, kernel)
        second_from_lead = self.rest_s(kind, layer, second.rows, kernel)
        shared = self.rest_s(kind, layer, lead.rows + second.rows, kernel)
        if None in (lead_rest, second_rest, second_from_lead, shared, kernel.costs.predict(OpKind.HEAD, 1)):
            return False
        now = kernel.now
        lead_alone = self.solo_s.get(lead.id, 0.0) + lead_rest
        second_alone = self.solo_s.get(second.id, 0.0) + second_rest
        if lead_alone <= 0 or second_alone <= 0:
            return False
        one_by_one = max(
            (now + lead_rest - lead.arrival) / lead_alone,
            (now + lead_rest + second_rest - second.arrival) / second_alone,
        )
        end = now + (second_rest - second_from_lead) + shared
        together = max((end - lead.arrival) / lead_alone, (end - second.arrival) / second_alone)
        return together < one_by_one

    def slack_s(self, lead: RequestView, kernel: KernelView) -> float:
        """What ``lead`` may still spend on others (riders, requests catching up): ``stretch``
        times the predicted time of its pass alone (its ops so far and the rest of the pass), less
        the time since it arrived and the rest of its pass alone. When the rest of the pass cannot
        be predicted yet, its next op stands for it."""
        own = kernel.costs.predict(lead.op_kind, lead.rows)
        if own is None:
            return 0.0
        rest = self.remaining_s(lead, kernel)
        rest = own if rest is None else max(rest, own)
        target = max(self.solo_s.get(lead.id, 0.0) + rest, self.floor_s.get(lead.id, 0.0))
        return self.stretch * target - (kernel.now - lead.arrival) - rest

    def budget_s(
        self,
        kind: OpKind,
        lead_rows: int,
        kernel: KernelView,
        slack: float = float("inf"),
        rest: float | None = None,
    ) -> float | None:
        """Longest predicted time an op led by ``lead_rows`` LS rows may take: ``stretch`` times
        the LS rows alone, and never more than the lead's ``slack`` over that (None: not measured).
        With ``tail``, at least this op's share of the slack (its part of ``rest``, the lead's
        pass alone from this op on)."""
        alone = kernel.costs.predict(kind, lead_rows)
        if alone is None:
            return None
        extra = (self.stretch - 1) * alone
        if self.tail and rest and slack < float("inf"):
            extra = max(extra, slack * alone / rest)
        return alone + max(0.0, min(extra, slack))

    def fill(
        self,
        primary: list[RequestView],
        riders: Sequence[RequestView],
        kernel: KernelView,
        slack: float = float("inf"),
    ) -> list[RequestView]:
        """``primary`` plus the riders that keep the op's predicted time within the budget
        (:meth:`budget_s`), in order.

        Before the kernel has measured an op of this kind, the LS rows run alone: their time
        teaches the model, and riders are not bet on an op of unknown cost. A lead out of slack
        runs alone too (the cost model, flattened where noise made more rows look cheaper, would
        otherwise call some riders free).
        """
        kind = primary[0].op_kind
        rest = self.remaining_s(primary[0], kernel) if self.tail else None
        budget = self.budget_s(kind, sum(r.rows for r in primary), kernel, slack, rest)
        if budget is None or slack <= 0:  # a lead out of slack takes nobody along
            return list(primary)
        return self._fit(primary, riders, kernel, budget)

    def _fit(
        self, batch: list[RequestView], candidates: Sequence[RequestView], kernel: KernelView, budget: float
    ) -> list[RequestView]:
        """``batch`` plus the candidates, in order, that keep its predicted time within ``budget``."""
        batch = list(batch)
        rows = sum(r.rows for r in batch)
        for r in candidates:
            if len(batch) >= kernel.max_batch:
                break
            predicted = kernel.costs.predict(r.op_kind, rows + r.rows)
            if predicted is None or predicted > budget:
                continue  # a smaller one further on may still fit
            batch.append(r)
            rows += r.rows
        return batch
