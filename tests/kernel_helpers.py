"""Helpers for the kernel tests: isolated reference runs, a recording policy wrapper, a loop runner.

:func:`isolated` runs one request by itself (every op computed as soon as it is yielded, with the
same prefill chunking as the engine), which is what a request's tokens must equal under any
schedule. :class:`Recorder` wraps a policy: it records every batch the policy selects and can
act (submit, cancel) right before a given batch is chosen, so arrivals happen at a chosen op and
a test's schedule is the same on every run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import uvloop

from qllm.kernel.program import generation_steps
from qllm.kernel.runtime.ops import Token
from qllm.kernel.view import KernelView, RequestView
from qllm.models.base import MoEModel
from qllm.policies import Policy
from qllm.spec import SamplingParams
from qllm.text import finish_text

STATUS = {"length": "length", "stop": "stopped"}
"""RequestResult.status for each generation StopReason."""


@dataclass(frozen=True)
class Reference:
    """A request's isolated run: its tokens, text, final status and number of ops."""

    token_ids: list[int]
    text: str
    status: str
    ops: int


def isolated(
    model: MoEModel, prompt_ids: Sequence[int], params: SamplingParams, chunk: int, moe: str = "layer"
) -> Reference:
    """Run one request alone through ``generation_steps`` with ``prefill_chunk=chunk``, its MoE
    layers at granularity ``moe`` (the engine's default is ``layer``)."""
    steps = generation_steps(model, list(prompt_ids), params, prefill_chunk=chunk, moe_granularity=moe)
    tokens: list[int] = []
    ops = 0
    result = None
    while True:
        try:
            item = steps.send(result)
        except StopIteration as stop:
            return Reference(tokens, finish_text(model, tokens, params.stop), STATUS[stop.value], ops)
        if isinstance(item, Token):
            tokens.append(item.token_id)
            result = None
        else:
            ops += 1
            result = model.run([item])[0]


def greedy(model: MoEModel, prompt_ids: Sequence[int], max_tokens: int, chunk: int = 128) -> list[int]:
    """Tokens of an isolated greedy run that ignores EOS."""
    return isolated(
        model, prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), chunk
    ).token_ids


class Recorder(Policy):
    """Delegates every decision to ``inner``; records the batches and runs ``at`` callbacks.

    ``at[n]`` callbacks run right before batch ``n`` (0-based) is selected, so what they submit
    arrives after batch ``n`` ran, before batch ``n + 1`` is chosen. When the kernel runs out of
    work before batch ``n``, the earliest pending callbacks run at the next request's finish.
    """

    def __init__(self, inner: Policy, at: dict[int, list[Callable[[], object]]] | None = None):
        self.inner = inner
        self.name = f"recorded-{inner.name}"
        self.at = dict(at or {})
        self.batches: list[list[str]] = []

    def _fire(self, n: int) -> None:
        for fn in self.at.pop(n, ()):
            fn()

    def fire_all(self) -> None:
        for n in sorted(self.at):
            self._fire(n)

    def order(self, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        return self.inner.order(ready, kernel)

    def select(self, kernel: KernelView) -> Sequence[RequestView]:
        self._fire(len(self.batches))
        chosen = list(self.inner.select(kernel))
        self.batches.append([r.id for r in chosen])
        return chosen

    def admit(self, request: RequestView, kernel: KernelView) -> bool:
        return self.inner.admit(request, kernel)

    def steady(self, batch: Sequence[RequestView]) -> bool:
        return False  # asked at every op, so that every batch is recorded

    def precedence(self, request: RequestView) -> tuple:
        return self.inner.precedence(request)

    def interrupts(self, request: RequestView) -> bool:
        return self.inner.interrupts(request)

    def on_arrival(self, request: RequestView, kernel: KernelView) -> None:
        self.inner.on_arrival(request, kernel)

    def on_finish(self, request: RequestView, kernel: KernelView) -> None:
        self.inner.on_finish(request, kernel)
        if not kernel.live and not kernel.waiting and self.at:
            self._fire(min(self.at))

    def first_batch(self, request_id: str) -> int | None:
        """Index of the first batch that ran ``request_id``'s op."""
        return next((i for i, ids in enumerate(self.batches) if request_id in ids), None)

    def ops_of(self, request_id: str) -> int:
        return sum(ids.count(request_id) for ids in self.batches)


def run(coro) -> object:
    """Run ``coro`` on a fresh uvloop event loop (for tests that cannot be async, e.g. hypothesis)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def mixed_load(
    model: object,
    policy: Policy,
    be_prompts: Sequence[Sequence[int]],
    ls_prompt: Sequence[int],
    *,
    arrivals: Sequence[int] = (40, 160, 300),
    on_start: Callable[[object], None] | None = None,
    **settings: object,
) -> tuple[list, dict]:
    """Long BE requests (10 tokens each), and LS requests (4 tokens) arriving right before the
    batches numbered in ``arrivals``, so that every run schedules alike: the results in submission
    order and the engine's stats. ``settings`` go to the engine; ``on_start`` sees it first."""
    import qllm

    recorder = Recorder(policy)
    handles = []
    async with qllm.Engine(model=model, policy=recorder, prefill_chunk=8, **settings) as engine:
        if on_start is not None:
            on_start(engine)

        def submit_ls():
            handles.append(engine.submit(list(ls_prompt), max_tokens=4, priority="ls", ignore_eos=True))

        for at in arrivals:
            recorder.at[at] = [submit_ls]
        handles += [engine.submit(list(p), max_tokens=10, priority="be", ignore_eos=True) for p in be_prompts]
        results = [await h.result() for h in handles]
        while recorder.at:  # an LS request scheduled past the end still runs
            recorder.fire_all()
            results += [await h.result() for h in handles[len(results) :]]
        stats = engine.stats()
    return results, stats
