"""Prefix caching (qllm/kernel/runtime/prefix.py, docs/engine.md "Prefix caching").

What a user relies on: a request whose prompt starts with a cached prefix gets exactly the tokens
it gets alone (under every policy, preempted, batched, under a memory budget), while computing
only the rest of its prompt; a prefix is published once the chunks that computed it finished every
layer, so an LS request reuses what a running BE prefill has done; every family either reads a
cached prefix exactly or is excluded; nothing is left held once every request ended; the switch
turns it all off (tests/test_prefix_index.py tests the index itself: sharing counted once,
eviction order, pinning, offload of private blocks only).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import Recorder, isolated, run
from test_kernel_exactness import Spec
from test_kernel_exactness import serve as serve_schedule
from tiny_families import CASES

import qllm
from qllm.commands import serve as serve_command
from qllm.kernel.runtime.prefix import reusable
from qllm.models import load_model
from qllm.policies import load_policy

POLICIES = ("fcfs", "qllm", "priority-aging", "cohort")


def greedy(after: int, prompt: tuple[int, ...], max_tokens: int, priority: str) -> Spec:
    """A greedy request of ``schedule``: submitted right after ``after`` batches ran (0: at once)."""
    return Spec(after, prompt, max_tokens, priority, rank=0, temperature=0.0, seed=None, ignore_eos=True)


async def serve(
    model, policy: str, schedule: list[Spec], *, chunk: int, blocks: int, budget=None, on=True, moe="layer"
):
    """Run ``schedule`` (tests/test_kernel_exactness.py) with caching ``on``: ``(spec, result)`` by
    id, and the engine's stats."""
    results, _, by_id, _, stats, _ = await serve_schedule(
        model, policy, schedule, chunk=chunk, max_batch=8, budget=budget, moe=moe, blocks=blocks, prefix=on
    )
    return {rid: (by_id[rid], result) for rid, result in results.items()}, stats


def assert_nothing_held(stats: dict) -> None:
    memory, prefix = stats["memory"], stats["prefix"]
    pool = memory["kv_blocks"]
    assert memory["resident_bytes"] == 0 and memory["requests"] == 0
    assert pool["blocks_in_use"] == 0 and pool["bytes_in_use"] == 0
    # Every block is spare, cached or freed (over a budget the pool frees spare blocks).
    assert pool["blocks_free"] + pool["blocks_cached"] <= pool["blocks_allocated"]
    assert prefix["referenced_bytes"] == 0 and prefix["cached_bytes"] == pool["bytes_cached"]


SYSTEM = [tuple(range(100, 124)), tuple(range(300, 317))]  # two shared "system prompts"


@st.composite
def shared_prompts(draw) -> tuple[int, ...]:
    head = draw(st.sampled_from(SYSTEM))
    head = head[: draw(st.integers(0, len(head)))]
    return head + tuple(draw(st.lists(st.integers(1, 511), max_size=6)))


specs = st.builds(
    greedy,
    after=st.one_of(st.just(0), st.integers(1, 80)),
    prompt=shared_prompts().filter(bool),
    max_tokens=st.integers(1, 4),
    priority=st.sampled_from(["ls", "be"]),
)


@pytest.mark.parametrize("policy", POLICIES)
@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=st.lists(specs, min_size=2, max_size=5),
    chunk=st.sampled_from([2, 4]),
    blocks=st.sampled_from([2, 3, 4]),
    budget=st.sampled_from([None, 4096, 1 << 16]),
    moe=st.sampled_from(["layer", "expert"]),
)
def test_requests_sharing_prefixes_get_exactly_their_isolated_tokens(
    tiny, policy, schedule, chunk, blocks, budget, moe
):
    """Arrivals at random ops (LS ones preempt), a budget that evicts and offloads: every request's
    tokens are those of its run alone, the cache hit what it says, and nothing stays held."""
    results, stats = run(serve(tiny, policy, schedule, chunk=chunk, blocks=blocks, budget=budget, moe=moe))

    assert len(results) == len(schedule)
    span = stats["prefix"]["span_tokens"]
    for rid, (spec, result) in results.items():
        assert result.status == "length" and result.error is None
        ref = isolated(tiny, spec.prompt, spec.params, chunk, moe)
        assert result.token_ids == ref.token_ids, f"{rid} {spec}"
        assert result.cached_tokens % span == 0 and result.cached_tokens <= reusable(len(spec.prompt), chunk)
    assert stats["prefix"]["tokens_hit"] == sum(r.cached_tokens for _, r in results.values())
    assert stats["prefix"]["tokens_looked_up"] == sum(len(s.prompt) for s, _ in results.values())
    assert stats["kernel"]["policy_errors"] == 0
    assert_nothing_held(stats)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_repeated_prompt_computes_only_its_last_chunk_and_outputs_match_caching_off(tiny, policy):
    prompt = tuple(range(100, 126))  # 26 tokens: 24 reusable with chunks of 4
    schedule = [
        greedy(0, prompt, 3, "be"),
        greedy(0, (*prompt[:20], 7, 8, 9), 3, "ls"),
        greedy(200, prompt, 3, "ls"),
    ]
    on, stats = run(serve(tiny, policy, schedule, chunk=4, blocks=4))
    off, _ = run(serve(tiny, policy, schedule, chunk=4, blocks=4, on=False))

    tokens = {spec: r.token_ids for spec, r in off.values()}
    cached = {spec: r.cached_tokens for spec, r in on.values()}
    assert {spec: r.token_ids for spec, r in on.values()} == tokens
    for spec in schedule:
        assert tokens[spec] == isolated(tiny, spec.prompt, spec.params, 4).token_ids
    assert cached[schedule[2]] == 24  # the repeat, once the first ones ended
    assert cached[schedule[1]] % 4 == 0 and cached[schedule[1]] <= 20  # depends on when it was admitted
    assert_nothing_held(stats)


@pytest.mark.parametrize("policy", ["qllm", "priority-aging", "cohort"])
def test_an_ls_request_reuses_the_chunks_a_running_be_prefill_finished(tiny, policy):
    """The LS request arrives after a few chunks of the BE request's long prompt were computed,
    preempts it, and takes those chunks from the cache; a tight budget evicts and reclaims."""
    prompt = tuple(range(10, 60))  # 50 tokens, chunks of 2: 25 passes
    schedule = [greedy(0, prompt, 2, "be"), greedy(30, (*prompt[:40], 5), 2, "ls")]
    results, stats = run(serve(tiny, policy, schedule, chunk=2, blocks=2, budget=8192))

    be, ls = (next(r for spec, r in results.values() if spec.priority == cls) for cls in ("be", "ls"))
    assert 0 < ls.cached_tokens < 40 and be.cached_tokens == 0
    assert be.preemptions >= 1
    for spec, result in results.values():
        assert result.token_ids == isolated(tiny, spec.prompt, spec.params, 2).token_ids
    assert_nothing_held(stats)


def test_the_switch_and_the_layouts_without_caching(tiny):
    schedule = [greedy(0, tuple(range(100, 120)), 2, "be"), greedy(50, tuple(range(100, 120)), 2, "be")]
    _, stats = run(serve(tiny, "fcfs", schedule, chunk=4, blocks=4, on=False))
    assert stats["prefix"] == {"enabled": False}

    async def buffers():
        async with qllm.Engine(model=tiny, prefill_chunk=4) as engine:
            await engine.generate(list(range(100, 120)), max_tokens=2)
            return engine.stats()["prefix"], engine.pin_prefix(list(range(100, 120)))

    assert run(buffers()) == ({"enabled": False}, 0)


def test_serve_has_a_switch_off():
    import argparse

    parser = argparse.ArgumentParser()
    serve_command.add_parser(parser.add_subparsers())
    on = serve_command.overrides(parser.parse_args(["serve"]))
    off = serve_command.overrides(parser.parse_args(["serve", "--no-prefix-cache"]))
    assert on["engine"]["prefix_cache"] is None  # the config file's, else the default (on)
    assert off["engine"]["prefix_cache"] is False


def test_linear_attention_families_are_excluded():
    from qllm.models.linear_attention import HybridLinearAttention
    from qllm.models.mla import LatentAttention

    assert not HybridLinearAttention.prefix_cacheable
    assert LatentAttention.prefix_cacheable


def test_the_prefix_figures_are_exposed_to_prometheus_and_documented(tiny):
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    from qllm.server.prometheus import exposition

    prompt = tuple(range(100, 126))
    _, stats = run(
        serve(tiny, "cohort", [greedy(0, prompt, 2, "be"), greedy(100, prompt, 2, "ls")], chunk=4, blocks=4)
    )
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(exposition(stats).decode())
        for s in family.samples
    }
    assert samples["qllm_prefix_tokens_hit_total"] == 24
    assert samples["qllm_prefix_tokens_looked_up_total"] == 52
    assert samples["qllm_prefix_cached_bytes"] == stats["prefix"]["cached_bytes"] > 0
    assert samples["qllm_memory_kv_blocks_bytes_cached"] == stats["prefix"]["cached_bytes"]
    text = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    documented = {
        n
        for line in text.splitlines()
        if line.startswith("| `qllm_")
        for n in re.findall(r"`(qllm_[a-z_]+)`", line.split("|")[1])
    }
    exposed = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in samples}
    assert {n for n in exposed if n.startswith(("qllm_prefix", "qllm_memory_kv"))} <= documented


def test_cached_tokens_reach_the_http_usage_and_the_stats_summary(tiny):
    from qllm.commands.stats import summary
    from qllm.server.openai_api import Reply

    prompt = tuple(range(100, 126))
    results, stats = run(
        serve(tiny, "cohort", [greedy(0, prompt, 2, "be"), greedy(100, prompt, 2, "ls")], chunk=4, blocks=4)
    )
    usages = sorted(Reply.usage(r)["prompt_tokens_details"]["cached_tokens"] for _, r in results.values())
    assert usages == [0, 24]
    assert "prefix  hit 24 of 52 prompt tokens" in summary(stats)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_every_family_takes_cached_prefixes_with_unchanged_tokens_or_is_excluded(case):
    """Each family's state (keys and values, latents, sliding windows, sinks, per-layer head
    counts) read from a cached prefix gives the tokens of a run without the cache; families whose
    state is not per-token keys and values cache nothing."""
    model = load_model((case.build(), None))
    prompt = list(range(100, 117))

    async def serve_family(on: bool):
        async with qllm.Engine(
            model=model, policy="cohort", kv_block_size=3, prefill_chunk=3, prefix_cache=on
        ) as engine:
            first = await engine.generate(prompt, max_tokens=4, ignore_eos=True, priority="be")
            again = await engine.generate([*prompt, 5], max_tokens=4, ignore_eos=True, priority="ls")
            return [first.token_ids, again.token_ids], again.cached_tokens, engine.stats()["prefix"]

    off, _, _ = await serve_family(False)
    on, cached, stats = await serve_family(True)
    assert on == off
    if model.prefix_cacheable:
        assert cached == 15 and stats["tokens_hit"] == 15
    else:
        assert cached == 0 and stats == {"enabled": False}


def test_a_pass_stopped_mid_layer_publishes_nothing(tiny):
    """A BE prefill in chunks of 4: each chunk is one pass of 8 ops (4 layers, attention and MoE).
    An LS request arriving after 12 ops finds chunk 0 cached, not chunk 1, which is half done
    (``qllm`` admits and runs it at once, the BE pass suspended mid-layer)."""
    assert tiny.num_layers == 4 and all(b is not None for b in tiny.moe_blocks)
    prompt = tuple(range(100, 120))
    schedule = [greedy(0, prompt, 2, "be"), greedy(12, (*prompt, 5), 2, "ls")]
    results, stats = run(serve(tiny, "qllm", schedule, chunk=4, blocks=4))

    be, ls = (next(r for spec, r in results.values() if spec.priority == c) for c in ("be", "ls"))
    assert ls.cached_tokens == 4 and be.preemptions >= 1
    for spec, result in results.values():
        assert result.token_ids == isolated(tiny, spec.prompt, spec.params, 4).token_ids
    assert_nothing_held(stats)


async def test_a_pinned_prefix_survives_a_budget_that_evicts_the_rest(tiny):
    system, other = list(range(100, 116)), list(range(300, 316))
    async with qllm.Engine(model=tiny, kv_block_size=4, prefill_chunk=4, memory_budget=1 << 30) as engine:
        assert engine.pin_prefix(system) == 16
        for prompt in (system, other):
            await engine.generate([*prompt, 1, 2], max_tokens=2, ignore_eos=True)
        engine._tensors.budget_bytes = 1  # a budget nothing unpinned fits in
        await engine.generate([7], max_tokens=1)  # a step enforces it
        pinned = await engine.generate([*system, 3], max_tokens=1)
        evicted = await engine.generate([*other, 3], max_tokens=1)
        stats = engine.stats()["prefix"]
    assert (pinned.cached_tokens, evicted.cached_tokens) == (16, 0)
    assert stats["pinned_entries"] == 4 and stats["evictions"] >= 4


async def test_policies_see_the_prefill_a_cached_prefix_leaves(tiny):
    seen: dict[str, list[tuple[int, int]]] = {}

    class Watching(Recorder):
        def select(self, kernel):
            for r in kernel.ready:
                seen.setdefault(r.id, []).append((r.cached_tokens, r.prefill_remaining))
            return super().select(kernel)

    prompt = list(range(100, 126))  # 26 tokens
    async with qllm.Engine(
        model=tiny, policy=Watching(load_policy("cohort")), kv_block_size=4, prefill_chunk=4
    ) as engine:
        first = await engine.generate(prompt, max_tokens=2, ignore_eos=True)
        again = await engine.generate(prompt, max_tokens=2, ignore_eos=True)
    assert seen[first.id][0] == (0, 26) and seen[again.id][0] == (24, 2)
    assert (seen[first.id][-1], seen[again.id][-1]) == ((0, 0), (24, 0))  # decoding
    remaining = sorted({left for _, left in seen[first.id]}, reverse=True)
    assert remaining == [26, 22, 18, 14, 10, 6, 2, 0]  # chunk by chunk, as each pass completes
