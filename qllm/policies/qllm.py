"""``qllm``: the research system's policy: LS first at expert granularity, four FCFS queues.

Queues LS-prefill, LS-decode, BE-prefill, BE-decode; the batch builder (their Algorithm 1):
1. LS-decode holds a full batch: run it;
2. else LS-prefill is non-empty: run it, fill the batch from BE-prefill;
3. else LS-decode is non-empty: run it, fill from BE-decode;
4. else BE-decode (filled from BE-prefill), then BE-prefill.
"Run a queue" means: the op of that queue that is furthest behind, with every request of the queue
at the same op, then fill-queue requests at that op. A preempted BE request keeps its state and
resumes where it stopped; prefill is preemptible too (at every op; a grouped MoE op stops between
experts when a request arrives).
"""

from __future__ import annotations

from collections.abc import Sequence

from qllm.policies.api import KernelView, Phase, Policy, RequestView, batch_for


def queues(kernel: KernelView, order) -> tuple[list[RequestView], ...]:
    """(LS-prefill, LS-decode, BE-prefill, BE-decode), each in ``order``."""
    ls_p, ls_d, be_p, be_d = [], [], [], []
    for r in order(kernel.ready, kernel):
        if r.is_ls:
            (ls_p if r.phase is Phase.PREFILL else ls_d).append(r)
        else:
            (be_p if r.phase is Phase.PREFILL else be_d).append(r)
    return ls_p, ls_d, be_p, be_d


def algorithm1(ls_p, ls_d, be_p, be_d, max_batch: int) -> tuple[list[RequestView], list[RequestView]]:
    """The (primary, fill) queues the batch builder runs next."""
    if len(ls_d) >= max_batch:
        return ls_d, []
    if ls_p:
        return ls_p, be_p
    if ls_d:
        return ls_d, be_d
    if be_d:
        return be_d, be_p
    return be_p, []


class QLLMPolicy(Policy):
    name = "qllm"

    def order(self, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        return sorted(ready, key=lambda r: (r.rank, r.arrival, r.seq))

    def select(self, kernel: KernelView) -> Sequence[RequestView]:
        primary, fill = algorithm1(*queues(kernel, self.order), kernel.max_batch)
        if not primary:
            return []
        key = min(primary, key=lambda r: r.progress_key).op_key
        return batch_for(key, primary, fill, kernel.max_batch)

    def steady(self, batch: Sequence[RequestView]) -> bool:
        # Queues change only when a pass ends (prefill to decode) or requests come and go, so a
        # batch that took every ready request is chosen again at its next op.
        return True
