"""Expert parallel at the op: a grouped MoE op with remote experts equals the one-process op bit
for bit, stopped after any expert and resumed (alone or merged with another stopped op), at any
window; nothing posted is computed twice and nothing is left in flight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_families import torch_threads

from qllm.kernel.config import EngineConfig
from qllm.kernel.runtime.ops import Op, OpKind, Partial
from qllm.models import load_model
from qllm.models.executor import expert_rows
from qllm.parallel.group import ExpertGroup
from qllm.parallel.ranks import rank_spec


@pytest.fixture(scope="module")
def pair():
    """One-process tiny and a two-rank tiny (round-robin: remote and local experts interleave)."""
    with torch_threads(1):
        alone = load_model("tiny")
        split = load_model("tiny")
        config = EngineConfig(model="tiny", threads=1, expert_parallel=2, expert_placement="round-robin")
        group = ExpertGroup.start(split, rank_spec(config, "tiny", "cpu"), 2, window=2)
        split.remote = group
        try:
            yield alone, split, group
        finally:
            group.close()


def moe_op(model, layer: int, x: torch.Tensor) -> Op:
    residual = x if model.moe_adds_residual else None
    return Op(OpKind.MOE, layer, x, residual=residual)


def experts_of(model, layer: int, x: torch.Tensor) -> list[int]:
    _, _, indices, _ = model._route([moe_op(model, layer, x)])
    return [e for e, _, _ in expert_rows(indices.tolist())]


def stop_after(n: int):
    polls = [0]

    def stop() -> bool:
        polls[0] += 1
        return polls[0] == n

    return stop


def resume(model, ops: list[Op], parts: list[Partial]) -> list:
    return model.run(
        [
            Op(OpKind.MOE, o.layer, p.x, expert=p.next_expert, residual=o.residual, partial=p)
            for o, p in zip(ops, parts)
        ]
    )


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b, strict=True))
    return (a is None and b is None) or torch.equal(a, b)


rows = st.integers(1, 9)


@settings(
    deadline=None,
    max_examples=12,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    rows=rows,
    other=rows,
    layer=st.integers(0, 1),
    window=st.sampled_from([1, 2, 8]),
    seed=st.integers(0, 2**16),
)
def test_a_remote_moe_op_stopped_after_every_expert_resumes_to_the_same_bits(
    pair, rows, other, layer, window, seed
):
    alone, split, group = pair
    gen = torch.Generator().manual_seed(seed)
    hidden = alone.config.hidden_size
    x, y = torch.randn(rows, hidden, generator=gen), torch.randn(other, hidden, generator=gen)
    group.window = window
    with torch_threads(1):
        expected = alone.run([moe_op(alone, layer, x), moe_op(alone, layer, y)])
        assert all(
            same(a, b)
            for a, b in zip(split.run([moe_op(split, layer, x), moe_op(split, layer, y)]), expected)
        )
        count = len(experts_of(alone, layer, torch.cat([x, y])))
        remote = sum(1 for e in experts_of(alone, layer, torch.cat([x, y])) if not group.holds(layer, e))
        for n in range(1, count):  # stop after the n-th expert
            ops = [moe_op(split, layer, x), moe_op(split, layer, y)]
            before = group.counters.calls
            parts = split.run(ops, stop_after(n))
            assert all(isinstance(p, Partial) for p in parts)
            # Resumed together, or each by itself: the same bits as never stopping.
            assert all(same(a, b) for a, b in zip(resume(split, ops, parts), expected))
            assert group.counters.calls - before == remote  # posted before the stop: kept, not called again
            alone_parts = [resume(split, [o], [p])[0] for o, p in zip(ops, parts)]
            assert all(same(a, b) for a, b in zip(alone_parts, expected))
        assert group.healthy


def test_an_op_that_fails_leaves_nothing_in_flight(pair, monkeypatch):
    alone, split, group = pair
    x = torch.randn(6, alone.config.hidden_size, generator=torch.Generator().manual_seed(3))
    local = [e for e in experts_of(alone, 0, x) if group.holds(0, e)]
    assert local
    real = split.expert

    def failing(block, e, rows):
        if e == local[-1]:
            raise RuntimeError("boom")
        return real(block, e, rows)

    monkeypatch.setattr(split, "expert", failing)
    group.window = 8
    with torch_threads(1), pytest.raises(RuntimeError, match="boom"):
        split.run([moe_op(split, 0, x)])
    monkeypatch.undo()
    # Every reply posted before the failure was collected: the next op's exchange lines up.
    with torch_threads(1):
        assert same(split.run([moe_op(split, 0, x)])[0], alone.run([moe_op(alone, 0, x)])[0])
    assert group.healthy


def test_a_pass_split_and_merged_inside_a_stopped_remote_op_keeps_its_remote_outputs(pair):
    """A pass of three requests stops its MoE op after the first expert with replies collected;
    it is split (one request leaves, as under preemption) and merged again; each part resumes
    without asking a rank again for what it collected, and every request's logits equal its
    one-process run."""
    from qllm.kernel.runtime.passes import Pass

    alone, split, group = pair
    prompts = [torch.tensor([5, 17, 99, 3]), torch.tensor([8, 1]), torch.tensor([40, 41, 42])]
    group.window = 8
    with torch_threads(1):
        expected = [
            _logits(alone, Pass.start(alone, [(alone.new_cache(), p, True, None)]))[0] for p in prompts
        ]
        whole = Pass.start(split, [(split.new_cache(), p, True, i) for i, p in enumerate(prompts)])
        whole.advance(split.run([whole.pending])[0])  # layer 0 attention
        (partial,) = split.run([whole.pending], stop=lambda: True)
        assert isinstance(partial, Partial) and partial.ready  # remote replies collected at the stop
        whole.advance(partial)
        before = group.counters.calls
        first, rest = whole.split([1])
        assert set(first.ready) == set(rest.ready) == set(partial.ready)
        first.advance(split.run([first.pending])[0])  # the leaving request finishes the layer alone
        rest.advance(split.run([rest.pending])[0])
        # The window posted every remote expert of the layer before the stop: both parts finish
        # the layer from what they hold, without a call.
        assert group.counters.calls == before
        merged = Pass.merge([rest, first])  # both at layer 1's attention
        for segment, logits in zip(merged.segments, _logits(split, merged)):
            assert torch.equal(logits, expected[segment.owner])


def _logits(model, p) -> list[torch.Tensor]:
    while not p.done:
        p.advance(model.run([p.pending])[0])
    return p.logits
