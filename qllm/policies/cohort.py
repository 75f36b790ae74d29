"""``cohort`` (default): LS first within a latency budget; best-effort work rides along and stays whole.

Two rules, one for each situation:

- **An LS request is waiting for its first token**: it leads. Its op (the op furthest behind among
  such LS requests, so they converge) runs next, and every other ready request at that same op
  rides along, LS decode first, then BE (decode rows and prefill chunks alike), for as long as the
  op's predicted time (the kernel's cost model, :attr:`KernelView.costs`) stays within the budget:
  ``stretch`` times the predicted time of the LS rows alone. Riding is what makes preemption cheap
  for best-effort work: the weights an LS op reads anyway serve the BE rows too.
- **Otherwise** every ready request belongs to one cohort that advances like an iteration-level
  batch, at op granularity: requests in the middle of a forward pass run before requests at a pass
  boundary, the op furthest behind first. So an LS request runs alone only until it reaches the op
  where the cohort stands and then advances with it, and requests that were left behind (ridden
  past, or cut by the budget) catch up and rejoin the cohort at the next step boundary instead of
  trailing as small batches.

The budget follows from the LS target: an LS request's first token may take at most 1.5x its
time alone; ``stretch`` (1.3) spends most of that margin on riders and leaves the rest for the op
that is in flight when the request arrives.
"""

from __future__ import annotations

from collections.abc import Sequence

from qllm.kernel.request import Phase
from qllm.kernel.view import KernelView, RequestView
from qllm.policies.base import Policy


def cohort_position(r: RequestView) -> tuple:
    """Where a request stands in the cohort: mid-pass before a pass boundary, then furthest behind."""
    return (r.at_boundary, r.progress_key)


class CohortPolicy(Policy):
    name = "cohort"

    def __init__(self, stretch: float = 1.3):
        if stretch < 1:
            raise ValueError("stretch must be >= 1 (the LS op's own time is the least it can take)")
        self.stretch = stretch

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
        leads = self.leads(ready)
        if not leads:
            key = min(ready, key=cohort_position).op_key
            members = sorted((r for r in ready if r.op_key == key), key=lambda r: r.sort_key)
            return members[: kernel.max_batch]
        key = min(leads, key=lambda r: r.progress_key).op_key
        primary = [r for r in leads if r.op_key == key][: kernel.max_batch]
        chosen = {r.id for r in primary}
        riders = sorted(
            (r for r in ready if r.op_key == key and r.id not in chosen), key=lambda r: r.sort_key
        )
        return self.fill(primary, riders, kernel)

    def budget_s(self, kind, lead_rows: int, kernel: KernelView) -> float | None:
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
