"""``cohort`` (default): LS first within a latency budget; best-effort work rides along and stays whole.

- **An LS request waiting for its first token leads.** Its op (the op furthest behind among such
  LS requests, so that they converge) runs next, and every other ready request at that same op
  rides along, LS decode first, then BE (decode rows and prefill chunks alike), for as long as the
  op's predicted time (the kernel's cost model, :attr:`KernelView.costs`) stays within the budget:
  ``stretch`` times the predicted time of the LS rows alone. Riding is what makes preemption cheap
  for best-effort work: the weights an LS op reads anyway serve the BE rows too.
- **Otherwise every ready request belongs to one cohort** that advances like an iteration-level
  batch at op granularity: requests in the middle of a forward pass run before requests at a pass
  boundary, the op furthest behind first. So a new LS request runs alone only until it reaches
  the op where the cohort stands and then advances with it, and requests that were left behind
  (ridden past, or cut by the budget) catch up and rejoin the cohort at the next step boundary
  instead of trailing as small batches.
- **A cohort about to finish its pass is not split.** An LS request about to start a pass waits
  when every request in the middle of a pass has at most ``wait_share`` of its layers left: the
  cohort reaches the step boundary and the LS request's whole pass runs with it, instead of a
  catch-up that best-effort work would pay for.

The budget follows from the LS target, a first token within 1.5x the time alone: ``stretch``
(1.2) bounds what riders add to each op, ``wait_share`` (0.25) what waiting for the cohort adds.
"""

from __future__ import annotations

from collections.abc import Sequence

from qllm.kernel.request import Phase
from qllm.kernel.view import KernelView, RequestView
from qllm.ops import OpKind
from qllm.policies.base import Policy


def cohort_position(r: RequestView) -> tuple:
    """Where a request stands in the cohort: mid-pass before a pass boundary, then furthest behind."""
    return (r.at_boundary, r.progress_key)


class CohortPolicy(Policy):
    name = "cohort"

    def __init__(self, stretch: float = 1.2, wait_share: float = 0.125):
        if stretch < 1:
            raise ValueError("stretch must be >= 1 (the LS op's own time is the least it can take)")
        if not 0 <= wait_share < 1:
            raise ValueError("wait_share must be in [0, 1)")
        self.stretch = stretch
        self.wait_share = wait_share
        self.layers = 0  # layers of the model, as seen in the ops so far

    def leads(self, ready: Sequence[RequestView]) -> list[RequestView]:
        """LS requests still waiting for their first token, best rank first."""
        urgent = [r for r in ready if r.is_ls and r.phase is Phase.PREFILL]
        if not urgent:
            return []
        rank = min(r.rank for r in urgent)
        return sorted((r for r in urgent if r.rank == rank), key=lambda r: (r.arrival, r.seq))

    def select(self, kernel: KernelView) -> Sequence[RequestView]:
        ready = kernel.ready
        if not ready:
            return []
        layers = (r.progress_key[0] + 1 for r in ready if r.op_kind is not OpKind.HEAD)
        self.layers = max(self.layers, *layers, 0)
        leads = self.leads(ready)
        if leads:
            lead = min(leads, key=lambda r: r.progress_key)
            primary = [r for r in leads if r.op_key == lead.op_key][: kernel.max_batch]
            behind = self.reached(lead, ready)
            if behind:  # the lead reached the cohort: it waits for the part still behind it
                return self.members(min(behind, key=lambda r: r.progress_key).op_key, ready, kernel)
            if not self.cohort_finishing(primary, ready):
                chosen = {r.id for r in primary}
                riders = (r for r in ready if r.op_key == lead.op_key and r.id not in chosen)
                return self.fill(primary, sorted(riders, key=lambda r: r.sort_key), kernel)
        return self.members(min(ready, key=cohort_position).op_key, ready, kernel)

    def members(self, key, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        """Every ready request at op ``key``, most urgent first, at most ``max_batch``."""
        return sorted((r for r in ready if r.op_key == key), key=lambda r: r.sort_key)[: kernel.max_batch]

    def _layer(self, r: RequestView) -> int:
        return self.layers if r.op_kind is OpKind.HEAD else r.progress_key[0]

    def reached(self, lead: RequestView, ready: Sequence[RequestView]) -> list[RequestView]:
        """Requests in the middle of a pass, behind ``lead`` by less than a layer: the cohort that
        ``lead`` caught up with (within a layer, requests sit at different experts)."""
        layer = self._layer(lead)
        return [
            r
            for r in ready
            if not r.at_boundary and r.progress_key < lead.progress_key and self._layer(r) >= layer - 1
        ]

    def cohort_finishing(self, primary: Sequence[RequestView], ready: Sequence[RequestView]) -> bool:
        """Whether LS requests about to start a pass should let the requests in the middle of one
        finish it first: all of those have at most ``wait_share`` of the model's layers left."""
        mid_pass = [r for r in ready if not r.at_boundary]
        if not (mid_pass and self.wait_share and self.layers) or not all(r.at_boundary for r in primary):
            return False
        return self.layers - min(map(self._layer, mid_pass)) <= self.wait_share * self.layers

    def budget_s(self, kind: OpKind, lead_rows: int, kernel: KernelView) -> float | None:
        """Longest predicted time an op led by ``lead_rows`` LS rows may take (None: not measured yet)."""
        alone = kernel.costs.predict(kind, lead_rows)
        return None if alone is None else self.stretch * alone

    def fill(
        self, primary: list[RequestView], riders: Sequence[RequestView], kernel: KernelView
    ) -> list[RequestView]:
        """``primary`` plus the riders that keep the op's predicted time within the budget, in order.

        Before the kernel has measured an op of this kind, every rider comes along: the first
        measurement teaches the model.
        """
        kind = primary[0].op_kind
        rows = sum(r.rows for r in primary)
        budget = self.budget_s(kind, rows, kernel)
        batch = list(primary)
        for r in riders:
            if len(batch) >= kernel.max_batch:
                break
            if budget is not None and (kernel.costs.predict(kind, rows + r.rows) or 0.0) > budget:
                continue  # a smaller rider further on may still fit
            batch.append(r)
            rows += r.rows
        return batch
