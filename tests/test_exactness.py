"""The executor computes what transformers computes, for every supported family.

For each tiny random model: the prefill logits and 32 greedy decode steps equal transformers'
own forward with its KV cache (fp32, atol 1e-5), and the greedy tokens of qllm's op stream equal
``model.generate(do_sample=False)``. A perturbed expert must make the same check fail.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_families import CASES, CASES_BY_NAME, greedy, run_alone, run_forward, torch_threads

from qllm.kernel.runtime.ops import OpKind
from qllm.models import FAMILIES, load_model

MULTIMODAL = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text"}
"""Multimodal model types whose checkpoints qllm runs as the text model's type."""

ATOL = 1e-5
DECODE_STEPS = 32
PROMPT_LEN = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@dataclasses.dataclass
class Comparison:
    """Executor vs transformers over one prefill and ``DECODE_STEPS`` greedy decode steps."""

    diffs: list[float]  # max |logit difference| per step (prefill first)
    close: list[bool]  # torch.allclose(atol=ATOL) per step
    reference_tokens: list[int]  # transformers' greedy tokens, one per step
    seen: set[OpKind]

    @property
    def exact(self) -> bool:
        return all(self.close)


def prompt_for(model) -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), generator=gen).tolist()


def compare(hf, executor, prompt: list[int]) -> Comparison:
    """Step both models through the same tokens (transformers' greedy choices) and compare logits."""
    diffs, close, tokens, seen = [], [], [], set()
    cache = executor.new_cache()
    hf_cache = None
    step_ids = prompt
    for _ in range(1 + DECODE_STEPS):
        with torch.no_grad():
            out = hf(torch.tensor([step_ids]), cache=hf_cache, use_cache=True)
        hf_cache = out.cache
        reference = out.logits[0, -1]
        ours = run_forward(executor, cache, step_ids, seen)
        diffs.append(float((ours - reference).abs().max()))
        close.append(torch.allclose(ours, reference, rtol=0, atol=ATOL))
        tokens.append(int(reference.argmax()))
        step_ids = [tokens[-1]]
    return Comparison(diffs, close, tokens, seen)


def hf_generate(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_transformers_forward_and_generate(case):
    hf = case.build()
    executor = load_model((hf, None))
    assert executor.config.model_type == case.model_type
    prompt = prompt_for(hf)

    result = compare(hf, executor, prompt)

    assert result.exact, f"max |diff| per step: {result.diffs}"
    assert case.kinds <= result.seen, f"{case.name} never yielded {case.kinds - result.seen}"
    steps = 1 + DECODE_STEPS
    generated = hf_generate(hf, prompt, steps)
    assert result.reference_tokens == generated  # the reference steps are generate()'s own
    assert run_alone(executor, prompt, greedy(steps)).tokens == generated


def test_every_family_has_an_exactness_case():
    # Multimodal checkpoints load as their text model (tests/test_models_loading.py checks it).
    tested = {case.model_type for case in CASES} | set(MULTIMODAL)
    assert {t for fam in FAMILIES for t in fam.model_types} <= tested


def routed_expert(executor, prompt: list[int]) -> tuple[int, int]:
    """(layer, expert) that the prompt's last token is routed to in the first MoE layer."""
    cache = executor.new_cache()
    steps = executor.forward(cache, torch.tensor(prompt))
    result = None
    while True:
        op = steps.send(result)
        if op.kind == OpKind.EXPERT:
            return op.layer, op.expert
        result = executor.run([op])[0]


# One family per expert layout and attention mechanism: fused SwiGLU, biased and clamped experts with
# sinks (gpt_oss), input-weighted experts (llama4_text), latent attention, gated DeltaNet.
NEGATIVE_CONTROLS = ["mixtral", "qwen2_moe", "gpt_oss", "llama4_text", "deepseek_v3", "qwen3_next"]


@pytest.mark.parametrize("case", [CASES_BY_NAME[name] for name in NEGATIVE_CONTROLS], ids=lambda c: c.name)
def test_perturbed_expert_is_detected(case):
    """Negative control: a 1% change to one expert's weights fails the exactness check."""
    hf = case.build()
    executor = load_model((copy.deepcopy(hf), None))
    prompt = prompt_for(hf)
    assert compare(hf, executor, prompt).exact  # the copy itself is exact

    layer, expert = routed_expert(executor, prompt)
    experts = executor.moe_blocks[layer].experts
    with torch.no_grad():
        experts.down_proj[expert].mul_(1.01)
    result = compare(hf, executor, prompt)

    assert not result.close[0], f"prefill logits still within {ATOL}: {result.diffs[0]}"
    assert not result.exact
    # The reference model itself is untouched: the failure comes from the perturbed expert only.
    assert compare(hf, load_model((copy.deepcopy(hf), None)), prompt).exact
