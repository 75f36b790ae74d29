"""``fcfs``: iteration-level first-come-first-served continuous batching (the baseline).

Requests join only at iteration boundaries (when every running request has finished its current
forward pass), in arrival order, up to ``max_batch``; classes and ranks are ignored; nothing is
preempted. This is the scheduler class of TGI / transformers' continuous batching.
"""

from __future__ import annotations

from collections.abc import Sequence

from qllm.policies.api import KernelView, Policy, RequestView, batch_for


class FCFSPolicy(Policy):
    name = "fcfs"

    def order(self, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        return sorted(ready, key=lambda r: (r.arrival, r.seq))

    def select(self, kernel: KernelView) -> Sequence[RequestView]:
        ordered = self.order(kernel.ready, kernel)
        if not ordered:
            return []
        key = min(ordered, key=lambda r: r.progress_key).op_key
        return batch_for(key, ordered, (), kernel.max_batch)

    def steady(self, batch: Sequence[RequestView]) -> bool:
        return True  # every ready request at the op furthest behind: the same batch at its next op

    def interrupts(self, request: RequestView) -> bool:
        return False  # a newcomer joins at the next iteration boundary, whatever its class

    def precedence(self, request: RequestView) -> tuple:
        return ()  # all requests are equal: nothing is ever preempted

    def admit(self, request: RequestView, kernel: KernelView) -> bool:
        at_boundary = all(r.at_boundary for r in kernel.live)
        return at_boundary and len(kernel.live) < kernel.max_batch
