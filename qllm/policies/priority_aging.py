"""``priority-aging``: the ``qllm`` policy plus starvation protection.

LS work still goes first at expert granularity, but best-effort work is guaranteed a share of
compute: when BE work is ready and BE batches got less than ``be_share`` of the compute time of
the recent past (an exponentially weighted window of ``window_s`` seconds), or no BE batch has run
for ``max_wait_s`` while BE work waited, one BE batch runs next. Each guard grants BE one op at a
time, so an LS request never waits behind more than one BE op because of them. LS batches take BE
requests at the same op along only up to ``fill_rows`` rows, so that riding along is almost free
for the LS request (batched matmuls are padded to 4 rows anyway). Best-effort requests of a tenant
over its weighted share wait until the others catch up (qllm/policies/fair.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qllm.policies.api import KernelView, Policy, RequestView, batch_for
from qllm.policies.fair import fair_order, fair_share, runnable, within_share
from qllm.policies.qllm import algorithm1, queues


class PriorityAgingPolicy(Policy):
    name = "priority-aging"

    def __init__(
        self, be_share: float = 0.1, max_wait_s: float = 2.0, window_s: float = 2.0, fill_rows: int = 4
    ):
        if not 0 <= be_share < 1:
            raise ValueError("be_share must be in [0, 1)")
        self.be_share = be_share
        self.max_wait_s = max_wait_s
        self.window_s = window_s
        self.fill_rows = fill_rows
        self._be_time = 0.0  # decayed seconds spent on BE-led batches
        self._all_time = 0.0
        self._last: tuple[float, bool] | None = None  # (decision time, last batch was BE-led)
        self._be_last_run = -math.inf  # when the last BE-led batch ran

    # Fairness between tenants and clients (qllm/policies/fair.py): equally ranked requests of
    # different tenants and connections take turns, and one's surplus cannot crowd out another's share.
    def order(self, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        return fair_order(ready, key=lambda r: (r.rank, r.arrival, r.seq), group=lambda r: r.rank)

    def admit(self, request: RequestView, kernel: KernelView) -> bool:
        return super().admit(request, kernel) or fair_share(request, kernel)

    def _account(self, now: float) -> None:
        if self._last is not None:
            then, was_be = self._last
            decay = math.exp(-(now - then) / self.window_s)
            spent = now - then
            self._be_time = self._be_time * decay + (spent if was_be else 0.0)
            self._all_time = self._all_time * decay + spent

    def _be_starved(self, be: list[RequestView], now: float) -> bool:
        if not be:
            return False
        if self._all_time > 0 and self._be_time / self._all_time < self.be_share:
            return True
        waiting_since = max(self._be_last_run, min(r.arrival for r in be))
        return now - waiting_since > self.max_wait_s

    def select(self, kernel: KernelView) -> Sequence[RequestView]:
        now = kernel.now
        self._account(now)
        ls_p, ls_d, be_p, be_d = queues(kernel, self.order)
        # Fairness between tenants (BE requests of a tenant over its share wait) and clients.
        allowed = {r.id for r in within_share(kernel.ready, kernel)}
        be_p, be_d = ([r for r in q if r.id in allowed] for q in (be_p, be_d))
        be_p, be_d = runnable((be_p, be_d), kernel.max_batch)
        if (ls_p or ls_d) and self._be_starved(be_d + be_p, now):
            primary, fill = (be_d, be_p) if be_d else (be_p, [])
        else:
            primary, fill = algorithm1(ls_p, ls_d, be_p, be_d, kernel.max_batch)
        if not primary:
            self._last = None
            return []
        key = min(primary, key=lambda r: r.progress_key).op_key
        batch = batch_for(key, primary, (), kernel.max_batch)
        if fill:
            rows = sum(r.rows for r in batch)
            for r in batch_for(key, fill, (), kernel.max_batch - len(batch)):
                if rows + r.rows > self.fill_rows and r.is_ls != batch[0].is_ls:
                    break
                batch.append(r)
                rows += r.rows
        be_led = not batch[0].is_ls
        self._last = (now, be_led)
        if be_led:
            self._be_last_run = now
        return batch
