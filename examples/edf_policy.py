"""Earliest deadline first on TTFT deadlines: a complete qllm policy plugin.

Requests still waiting for their first token that carry a ``ttft_deadline`` run in order of
their absolute deadline (arrival + deadline); all others follow in the default order. Register
it under the entry-point group ``qllm.policies`` (see docs/policies.md) or pass
``--policy edf_policy:EDFPolicy`` from this directory (a module is looked for on the Python path,
then in the current directory). ``python examples/edf_policy.py`` shows it at work.
"""

from __future__ import annotations

import asyncio

from qllm.policies.api import Policy, batch_for


class EDFPolicy(Policy):
    name = "edf"

    def urgency(self, r) -> tuple:
        if r.ttft_deadline is not None and r.first_token is None:
            return (0, r.arrival + r.ttft_deadline, r.seq)
        return (1, *r.sort_key)

    def order(self, ready, kernel):
        return sorted(ready, key=self.urgency)

    def select(self, kernel):
        ordered = self.order(kernel.ready, kernel)  # the most urgent op runs, with all others at it
        return batch_for(ordered[0].op_key, ordered, (), kernel.max_batch) if ordered else []

    def precedence(self, request) -> tuple:
        return self.urgency(request)[:2]  # a nearer deadline preempts


async def main() -> None:
    import qllm

    async with qllm.Engine(model="tiny", policy=EDFPolicy(), max_batch=1) as engine:
        deadlines = (3.0, 1.0, None, 2.0)
        handles = [engine.submit("Hello", max_tokens=1, priority="ls", ttft_deadline=d) for d in deadlines]
        results = [await h.result() for h in handles]
    for deadline, r in sorted(zip(deadlines, results), key=lambda p: p[1].first_token):
        print(f"ttft_deadline={deadline}: first token after {r.ttft * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
