"""Passes never change a request's numbers.

The kernel computes requests in passes (qllm/kernel/runtime/passes.py): one forward pass over the rows of
several requests, split and merged at any op as the policy chooses, with each MoE layer as one
grouped op, as one op per expert, or a grouped op stopped between experts. Whatever the schedule,
every request's logits and tokens must equal its solo run bit for bit; checked here under random
schedules, on families with every kind of op, at 1 and 2 threads.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_families import CASES_BY_NAME, greedy, torch_threads

from qllm.kernel.program import Forward, generation_passes
from qllm.kernel.runtime.ops import OpKind, Partial, Token
from qllm.kernel.runtime.passes import Pass, Stage
from qllm.models import load_model
from qllm.models.base import MoEModel

PROMPTS = [[5, 17, 99, 3, 42, 7, 11], [8, 1, 64], [120, 33, 2, 90, 14], [77], [3, 3, 3, 3]]
CHUNK = 3  # prompts longer than this prefill in chunks, some of them without logits
MAX_TOKENS = 5
CHECKED = [
    "tiny",
    "qwen2_moe",
    "qwen3_moe",
    "afmoe",
    "cohere2_moe",
    "llama4_text",
    "deepseek_v3",
    "qwen3_next",
]


@pytest.fixture(scope="module", params=CHECKED)
def executor(request, tiny):
    """Families with a shared expert (qwen2_moe), dense layers (qwen3_moe), per-request output
    transforms (afmoe), a parallel MoE (cohere2_moe), expert inputs scaled by the routing weight
    (llama4_text), latent attention (deepseek_v3) and recurrent state (qwen3_next)."""
    if request.param == "tiny":
        return tiny
    return load_model((CASES_BY_NAME[request.param].build(), None))


def solo(model: MoEModel, prompt: list[int], moe: str) -> tuple[list[int], list[torch.Tensor | None]]:
    """One request alone, every op run as soon as it is yielded: its tokens and each pass's logits."""
    cache = model.new_cache()
    steps = generation_passes(model, prompt, greedy(MAX_TOKENS), prefill_chunk=CHUNK)
    tokens, logits, result = [], [], None
    while True:
        try:
            item = steps.send(result)
        except StopIteration:
            return tokens, logits
        if isinstance(item, Token):
            tokens.append(item.token_id)
            result = None
            continue
        forward = model.forward(cache, item.token_ids, logits=item.logits, moe_granularity=moe)
        op = next(forward)
        while True:
            try:
                op = forward.send(model.run([op])[0])
            except StopIteration as stop:
                result = stop.value
                break
        logits.append(result)


class Schedule:
    """Drives every prompt's passes at random: new passes from random subsets of the requests
    between passes, random passes run, split at random and merged when at the same op, grouped MoE
    ops stopped after a random number of experts."""

    def __init__(self, model: MoEModel, rng: random.Random):
        self.model, self.rng = model, rng
        self.caches = [model.new_cache() for _ in PROMPTS]
        self.steps = [generation_passes(model, p, greedy(MAX_TOKENS), prefill_chunk=CHUNK) for p in PROMPTS]
        self.tokens: list[list[int]] = [[] for _ in PROMPTS]
        self.logits: list[list[torch.Tensor | None]] = [[] for _ in PROMPTS]
        self.between: dict[int, Forward] = {}
        self.passes: list[Pass] = []
        self.kinds: set[OpKind] = set()
        self.partials = self.resumed = self.splits = self.merges = 0
        for i in range(len(PROMPTS)):
            self.resume(i, None)

    def resume(self, i: int, result) -> None:
        while True:
            try:
                item = self.steps[i].send(result)
            except StopIteration:
                return
            if isinstance(item, Token):
                self.tokens[i].append(item.token_id)
                result = None
                continue
            self.between[i] = item
            return

    def run(self) -> None:
        rng = self.rng
        while self.between or self.passes:
            move = rng.random()
            if self.between and (not self.passes or move < 0.25):
                chosen = rng.sample(sorted(self.between), rng.randint(1, len(self.between)))
                parts = [
                    (self.caches[i], self.between[i].token_ids, self.between[i].logits, i) for i in chosen
                ]
                for i in chosen:
                    del self.between[i]
                granularity = "expert" if rng.random() < 0.5 else "layer"
                self.passes.append(Pass.start(self.model, parts, moe_granularity=granularity))
            elif move < 0.35:
                self.split()
            elif move < 0.45:
                self.merge()
            else:
                self.step(rng.choice(self.passes))

    def step(self, p: Pass) -> None:
        op = p.pending
        self.kinds.add(op.kind)
        budget = self.rng.randint(0, 3)
        calls = iter(range(budget + 1))
        (result,) = self.model.run([op], stop=lambda: next(calls, budget) >= budget)
        self.partials += isinstance(result, Partial)
        self.resumed += op.partial is not None
        p.advance(result)
        self.settle(p)

    def settle(self, p: Pass) -> None:
        """A complete pass hands each request its logits (a split can complete a part: prefill
        chunks at the head that want no logits)."""
        if p.done:
            self.passes.remove(p)
            for segment, logits in zip(p.segments, p.logits):
                self.logits[segment.owner].append(logits)
                self.resume(segment.owner, logits)

    def split(self) -> None:
        candidates = [p for p in self.passes if len(p.segments) > 1]
        if not candidates:
            return
        p = self.rng.choice(candidates)
        keep = self.rng.sample(range(len(p.segments)), self.rng.randint(1, len(p.segments) - 1))
        self.passes.remove(p)
        parts = p.split(keep)
        self.passes.extend(parts)
        self.splits += 1
        for part in parts:
            self.settle(part)

    def merge(self) -> None:
        by_key: dict[tuple, list[Pass]] = {}
        for p in self.passes:
            by_key.setdefault((p.pending.key, p.moe_granularity), []).append(p)
        groups = [g for g in by_key.values() if len(g) > 1]
        if not groups:
            return
        group = self.rng.choice(groups)
        for p in group:
            self.passes.remove(p)
        self.passes.append(Pass.merge(group))
        self.merges += 1


@pytest.mark.parametrize("threads", [1, 2], ids=lambda n: f"{n}threads")
def test_random_pass_schedules_give_each_request_its_solo_logits(executor, threads):
    with torch_threads(threads):
        alone = [solo(executor, p, "expert") for p in PROMPTS]
        for seed in range(2):
            schedule = Schedule(executor, random.Random(seed))
            schedule.run()
            for i, (tokens, logits) in enumerate(alone):
                assert schedule.tokens[i] == tokens, f"request {i}, seed {seed}"
                assert len(schedule.logits[i]) == len(logits)
                for a, b in zip(logits, schedule.logits[i]):
                    assert (a is None and b is None) or torch.equal(a, b), f"request {i}, seed {seed}"
            # The schedules exercised what they claim to: splits, merges, stopped MoE ops resumed.
            assert schedule.splits and schedule.merges and schedule.partials and schedule.resumed
    assert executor.invariance.verified


def test_grouped_and_per_expert_moe_give_the_same_bits(executor):
    for prompt in PROMPTS:
        (grouped_tokens, grouped), (split_tokens, split) = (
            solo(executor, prompt, "layer"),
            solo(executor, prompt, "expert"),
        )
        assert grouped_tokens == split_tokens
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grouped, split))


def test_a_stopped_moe_op_resumes_as_one_grouped_op(tiny):
    """A grouped MoE op that stops after its first expert returns the routing and partial sums;
    the pass then resumes the layer as one grouped op from the next expert (stoppable again) and
    ends where the uninterrupted op would, bit for bit."""
    cache_a, cache_b = tiny.new_cache(), tiny.new_cache()
    ids = torch.tensor([5, 17, 99, 3])
    whole = Pass.start(tiny, [(cache_a, ids, True, None)])
    cut = Pass.start(tiny, [(cache_b, ids, True, None)])
    for p in (whole, cut):
        p.advance(tiny.run([p.pending])[0])  # layer 0 attention
    assert whole.pending.kind is OpKind.MOE
    (full,) = tiny.run([whole.pending])
    (partial,) = tiny.run([cut.pending], stop=lambda: True)
    assert isinstance(partial, Partial)
    cut.advance(partial)
    resumed = cut.pending
    assert cut.stage is Stage.MOE and resumed.kind is OpKind.MOE and resumed.expert == partial.next_expert
    assert resumed.key != whole.pending.key  # only ops stopped at the same expert batch together
    stops = 0
    while cut.stage is Stage.MOE:
        (result,) = tiny.run([cut.pending], stop=lambda: True)
        stops += isinstance(result, Partial)
        cut.advance(result)
    assert stops >= 1  # the resumed op stopped again, and resumed again
    assert cut.stage is Stage.ATTENTION
    whole.advance(full)
    assert cut.layer == whole.layer == 1
    assert torch.equal(cut.h, whole.h)
