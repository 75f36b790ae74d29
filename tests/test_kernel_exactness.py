"""Preemption exactness: under any schedule, every request gets exactly its isolated run.

Random LS/BE arrival schedules (arrivals at random ops, random prompts, lengths, classes, ranks,
seeded sampling, prefill chunk sizes and batch limits) run under each built-in policy. Each
request's tokens, text and status must equal its run alone with the same prefill chunking; every
request finishes exactly once, runs exactly its own ops (nothing recomputed, nothing skipped),
streams exactly its tokens, and its timestamps are consistent. Nothing stays resident afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from dataclasses import dataclass

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import Recorder, isolated, run
from tiny_families import CASES_BY_NAME, torch_threads

import qllm
from qllm.models import load_model
from qllm.models.presets import tiny_tokenizer
from qllm.policies import load_policy
from qllm.spec import SamplingParams

POLICIES = ("fcfs", "qllm", "priority-aging", "cohort")
MOE = st.sampled_from(["layer", "expert"])  # one grouped op per MoE layer, or one op per expert
BLOCKS = st.sampled_from([None, 3, 16])  # growable buffers, or blocks of 3 or 16 tokens from a pool


@dataclass(frozen=True)
class Spec:
    after: int  # submitted right after this many batches ran (0: before the first)
    prompt: tuple[int, ...]
    max_tokens: int
    priority: str
    rank: int
    temperature: float
    seed: int
    ignore_eos: bool

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )

    def submit_kwargs(self) -> dict:
        return dict(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            priority=self.priority,
            rank=self.rank,
        )


specs = st.builds(
    Spec,
    after=st.one_of(st.just(0), st.integers(0, 120)),
    prompt=st.lists(st.integers(1, 511), min_size=1, max_size=14).map(tuple),
    max_tokens=st.integers(1, 6),
    priority=st.sampled_from(["ls", "be"]),
    rank=st.integers(0, 2),
    temperature=st.sampled_from([0.0, 0.0, 0.8]),
    seed=st.integers(0, 2**16),
    ignore_eos=st.booleans(),
)
schedules = st.lists(specs, min_size=1, max_size=4)
SCHEDULED = dict(
    schedule=schedules,
    chunk=st.sampled_from([2, 5, 128]),
    max_batch=st.sampled_from([2, 32]),
    moe=MOE,
    blocks=BLOCKS,
)
"""What the property tests draw: a schedule and the engine's settings it runs under."""


async def serve(
    model,
    policy: str,
    schedule: list[Spec],
    *,
    chunk: int,
    max_batch: int,
    budget: int | None = None,
    moe: str = "layer",
    blocks: int | None = None,
    prefix: bool = False,
):
    """Run ``schedule`` on an engine; results, streamed chunks and specs by id, the recorder, stats, logs.

    Prefix caching is off unless ``prefix``: a request that takes a cached prefix runs fewer ops
    than its isolated run, which these tests count (tests/test_prefix_cache.py draws it)."""
    recorder = Recorder(load_policy(policy))
    handles: dict[str, object] = {}
    by_id: dict[str, Spec] = {}
    async with qllm.Engine(
        model=model,
        policy=recorder,
        prefill_chunk=chunk,
        max_batch=max_batch,
        memory_budget=budget,
        moe_granularity=moe,
        kv_block_size=blocks,
        prefix_cache=prefix,
    ) as engine:

        def submit(spec: Spec) -> None:
            handle = engine.submit(list(spec.prompt), **spec.submit_kwargs())
            handles[handle.id] = handle
            by_id[handle.id] = spec

        with structlog.testing.capture_logs() as logs:
            for spec in schedule:
                if spec.after == 0:
                    submit(spec)
                else:
                    recorder.at.setdefault(spec.after, []).append(lambda s=spec: submit(s))
            async with asyncio.timeout(120):
                while True:
                    pending = list(handles.values())
                    await asyncio.gather(*(h.result() for h in pending))
                    if len(handles) == len(pending):  # nothing was submitted meanwhile
                        if not recorder.at:
                            break
                        recorder.fire_all()  # idle before the scheduled batch: submit the rest now
            results = {rid: await h.result() for rid, h in handles.items()}
            streamed = {rid: [c async for c in h] for rid, h in handles.items()}
            stats = engine.stats()
    return results, streamed, by_id, recorder, stats, logs


@pytest.mark.parametrize("policy", POLICIES)
@settings(deadline=None, max_examples=8, suppress_health_check=[HealthCheck.too_slow])
@given(**SCHEDULED)
def test_every_request_equals_its_isolated_run(tiny, policy, schedule, chunk, max_batch, moe, blocks):
    """The reference runs alone with growable buffers: the KV layout never changes a token."""
    results, streamed, by_id, recorder, stats, logs = run(
        serve(tiny, policy, schedule, chunk=chunk, max_batch=max_batch, moe=moe, blocks=blocks)
    )

    # Nothing lost or duplicated: one result and one canonical log line per submitted request.
    assert len(results) == len(schedule)
    finished = Counter(e["request_id"] for e in logs if e["event"] == "request_finished")
    assert finished == Counter(results.keys())
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert stats["kernel"]["policy_errors"] == 0
    for ids in recorder.batches:
        assert len(ids) == len(set(ids)) and 1 <= len(ids) <= max_batch
    assert stats["kernel"]["batches"] == len(recorder.batches)

    for rid, result in results.items():
        spec = by_id[rid]
        ref = isolated(tiny, spec.prompt, spec.params, chunk, moe)
        assert result.id == rid
        assert result.token_ids == ref.token_ids, f"{rid} {spec}"
        assert result.text == ref.text
        assert result.status == ref.status
        assert result.error is None
        assert result.priority == spec.priority
        assert result.prompt_tokens == len(spec.prompt)
        # Preempted work resumes where it stopped: exactly the isolated run's ops, none recomputed.
        assert recorder.ops_of(rid) == ref.ops
        assert [c.token_id for c in streamed[rid]] == ref.token_ids
        assert [c.index for c in streamed[rid]] == list(range(len(ref.token_ids)))
        # Timestamps.
        assert len(result.token_times) == len(result.token_ids) >= 1
        assert result.token_times == sorted(result.token_times)
        assert result.arrival <= result.first_scheduled <= result.first_token == result.token_times[0]
        assert result.token_times[-1] <= result.finished
        assert result.preemptions >= 0
        if policy == "fcfs":
            assert result.preemptions == 0  # fcfs never preempts

    # Everything released; the engine is idle.
    assert stats["memory"]["resident_bytes"] == 0
    if blocks is not None:  # every block back in the pool, none lost
        pool = stats["memory"]["kv_blocks"]
        assert pool["blocks_in_use"] == 0 and pool["bytes_in_use"] == 0
        assert pool["blocks_free"] == pool["blocks_allocated"] > 0
    assert stats["memory"]["requests"] == 0
    assert stats["live"] == {"ls": {}, "be": {}}
    assert stats["queues"] == {"waiting": 0, "admitted": 0, "in_flight": 0}
    counts = {c: sum(stats["metrics"][c]["requests"].values()) for c in ("ls", "be")}
    submitted = Counter(s.priority for s in by_id.values())
    assert counts == {"ls": submitted["ls"], "be": submitted["be"]}


@pytest.mark.parametrize("policy", ["qllm", "priority-aging"])
@settings(deadline=None, max_examples=3, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules)
def test_preempted_tokens_equal_isolated_at_two_threads(tiny, policy, schedule):
    """At 2 threads (the default of a 2-core server) OpenMP splits a call's rows among threads; the
    padding probed for that thread count keeps preempted and batched requests exact."""
    with torch_threads(2):
        results, _, by_id, _, stats, _ = run(serve(tiny, policy, schedule, chunk=5, max_batch=32))
        assert stats["kernel"]["batch_invariance"]["threads"] == 2
        assert stats["kernel"]["batch_invariance"]["verified"]
        for rid, result in results.items():
            spec = by_id[rid]
            assert result.token_ids == isolated(tiny, spec.prompt, spec.params, 5).token_ids, f"{rid} {spec}"


def test_reference_is_the_single_request_driver(tiny):
    """The isolated reference equals qllm.kernel.program.generate, and a one-request engine when chunked."""
    from qllm.kernel.program import generate

    prompt = [5, 17, 300, 42, 9, 77, 128]
    for params in (
        SamplingParams(max_tokens=6, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.8, seed=3),
    ):
        assert isolated(tiny, prompt, params, 128).token_ids == generate(tiny, prompt, params).token_ids

    async def one(chunk: int):
        async with qllm.Engine(model=tiny, policy="fcfs", prefill_chunk=chunk) as engine:
            return await engine.generate(prompt, max_tokens=6, ignore_eos=True)

    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert run(one(2)).token_ids == isolated(tiny, prompt, params, 2).token_ids


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_next"])
def stateful(request):
    """A model whose per-request state is not per-head keys and values: latent attention
    (deepseek_v3: latents and rotary keys of different widths) or gated DeltaNet layers
    (qwen3_next: a convolution window and a recurrent state beside the KV of full attention)."""
    case = CASES_BY_NAME[request.param]
    tokenizer = tiny_tokenizer()
    hf = dataclasses.replace(case, config={**case.config, "vocab_size": len(tokenizer)}).build()
    return load_model((hf, tokenizer))


@pytest.mark.parametrize("policy", POLICIES)
@settings(deadline=None, max_examples=4, suppress_health_check=[HealthCheck.too_slow])
@given(**SCHEDULED)
def test_latent_and_linear_attention_requests_equal_their_isolated_runs(
    stateful, policy, schedule, chunk, max_batch, moe, blocks
):
    """The same property for latent-attention and linear-attention state, under a memory budget
    small enough that suspended requests' caches are offloaded (compacted on CPU) and restored,
    with buffers or blocks (latent attention's keys and values are blocks of different widths)."""
    results, streamed, by_id, recorder, stats, _ = run(
        serve(
            stateful, policy, schedule, chunk=chunk, max_batch=max_batch, budget=4096, moe=moe, blocks=blocks
        )
    )

    assert len(results) == len(schedule)
    for rid, result in results.items():
        spec = by_id[rid]
        ref = isolated(stateful, spec.prompt, spec.params, chunk, moe)
        assert result.token_ids == ref.token_ids, f"{rid} {spec}"
        assert result.status == ref.status
        assert recorder.ops_of(rid) == ref.ops
        assert [c.token_id for c in streamed[rid]] == ref.token_ids
    assert stats["memory"]["resident_bytes"] == 0
