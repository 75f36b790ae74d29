"""Batching never changes a request's numbers.

Ops of several requests that run as one :meth:`MoEModel.run` call give each request bit-identical
results to running alone, for every op kind, with prefill and decode requests mixed; so tokens do
not depend on which requests share a batch or in which order a scheduler runs ops. This rests on
the row padding that the executor's probe found batch-invariant on this machine at the thread
count in force (qllm/models/invariance.py, tests/test_invariance.py); checked at 1 and 2 threads.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_families import (
    CASES_BY_NAME,
    Case,
    greedy,
    layer_major,
    random_choice,
    run_alone,
    run_together,
    torch_threads,
)

from qllm.kernel.runtime.ops import OpKind
from qllm.models import load_model

PROMPTS = [[5, 17, 99, 3, 42, 7, 11], [8, 1, 64], [120, 33, 2, 90, 14], [77]]
JOIN_AFTER = [0, 0, 2, 5]  # requests 2 and 3 prefill while 0 and 1 decode
MAX_TOKENS = 8
THREADS = [1, 2]  # 2: the default on a 2-core machine, where OpenMP splits a call's rows


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def identical(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))


CHECKED = [
    *("tiny", "qwen2_moe", "qwen3_moe", "afmoe", "cohere2_moe"),
    *("gpt_oss", "llama4_text", "deepseek_v3", "qwen3_next", "mimo_v2_flash"),
]


@pytest.fixture(scope="module", params=CHECKED)
def executor(request, tiny):
    """The tiny preset, plus families that add SHARED (qwen2_moe) and dense MLP (qwen3_moe) ops,
    gated attention output and post-MoE norms (afmoe), parallel attention/MoE (cohere2_moe),
    attention sinks and biased experts (gpt_oss), chunked attention and expert inputs scaled by
    the routing weight (llama4_text), latent attention (deepseek_v3) and gated DeltaNet layers
    with per-request recurrent state (qwen3_next)."""
    if request.param == "tiny":
        return tiny
    return load_model((CASES_BY_NAME[request.param].build(), None))


@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}threads")
def test_batched_ops_give_each_request_its_solo_results(executor, threads):
    params = greedy(MAX_TOKENS)
    calls: list[tuple[OpKind, list[int]]] = []
    with torch_threads(threads):
        alone = [run_alone(executor, prompt, params) for prompt in PROMPTS]
        together = run_together(
            executor, PROMPTS, params, join_after=JOIN_AFTER, choose=layer_major, calls=calls
        )
    assert executor.invariance.threads == threads and executor.invariance.verified

    for solo, batched in zip(alone, together):
        assert [key for key, _ in batched.results] == [key for key, _ in solo.results]
        for (key, x), (_, y) in zip(solo.results, batched.results):
            assert identical(x, y), f"op {key} differs when batched"
        assert batched.tokens == solo.tokens
    # The check covered every op kind the model has, each batched across requests ...
    kinds = {OpKind(key[0]) for trace in alone for key, _ in trace.results}
    assert kinds == {kind for kind, rows in calls if len(rows) > 1}
    # ... and prefill rows (several per request) shared attention calls with decode rows (one each).
    assert any(kind == OpKind.ATTENTION and 1 in rows and max(rows) > 1 for kind, rows in calls)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_interleavings_give_each_request_its_solo_tokens(tiny, seed):
    """A scheduler may run any pending key next and batch any subset of its requests."""
    params = greedy(MAX_TOKENS)
    alone = [run_alone(tiny, prompt, params).tokens for prompt in PROMPTS]
    choose, subset = random_choice(random.Random(seed))
    calls: list[tuple[OpKind, list[int]]] = []

    together = run_together(
        tiny, PROMPTS, params, join_after=JOIN_AFTER, choose=choose, subset=subset, calls=calls
    )

    assert [trace.tokens for trace in together] == alone
    assert sum(len(rows) > 1 for _, rows in calls) > 10  # the run did batch, in a random order


def test_length_dependent_rotary_stays_batch_invariant():
    """Long-context rotary (Phi-3.5-MoE's longrope) switches factors on the longest position in a
    call: a short request batched with one past the switch must still get its solo results."""
    rope = dict(
        rope_type="longrope",
        rope_theta=10000.0,
        original_max_position_embeddings=16,
        short_factor=[1.0] * 6,
        long_factor=[4.0] * 6,
        short_mscale=1.0,
        long_mscale=1.2,
    )
    case = Case(
        "phimoe-longrope", "phimoe", dict(num_local_experts=8, num_experts_per_tok=2, rope_parameters=rope)
    )
    executor = load_model((case.build(), None))
    prompts = [[1, 2, 3], list(range(5, 25))]  # 3 and 20 tokens: only the second passes 16
    params = greedy(4)
    alone = [run_alone(executor, prompt, params) for prompt in prompts]

    together = run_together(executor, prompts, params, choose=layer_major)

    for solo, batched in zip(alone, together):
        assert all(identical(x, y) for (_, x), (_, y) in zip(solo.results, batched.results))
        assert batched.tokens == solo.tokens
