"""qllm's SwiGLU expert kernels: one call per expert, one call per MoE layer, the same bits either way.

An expert computed by :func:`qllm.models.swiglu.expert` is close to torch's
``(silu(x @ gate.T) * (x @ up.T)) @ down.T`` and a row's result does not depend on its batch mates;
:func:`qllm.models.swiglu.moe` adds a layer's routed experts to the rows' sums with exactly the bits
of the per-expert calls summed in ascending expert order, and stops between experts when the
kernel's :class:`~qllm.kernel.runtime.ops.StopFlag` is raised, so a resumed op ends where an
unstopped one does. A model whose experts run on the kernel still matches transformers.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from tiny_families import greedy, run_alone, run_forward, torch_threads

from qllm.kernel.runtime.ops import Op, OpKind, Partial, StopFlag
from qllm.models import gemm, load_model, presets, skinny, swiglu
from qllm.models.executor import expert_rows

pytestmark = pytest.mark.skipif(not skinny.available(), reason="qllm's skinny kernel does not build here")

HIDDEN, INTER, EXPERTS = 1003, 517, 5
"""Neither a multiple of the kernel's lanes (16 or 8) nor of its six-column blocks."""


class Experts(torch.nn.Module):
    """Fused SwiGLU experts as transformers lays them out."""

    def __init__(self, hidden: int = HIDDEN, inter: int = INTER, experts: int = EXPERTS, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.gate_up_proj = torch.nn.Parameter(
            torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
        )
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inter, generator=gen) / inter**0.5)
        self.act_fn = torch.nn.SiLU()


def reference(x: torch.Tensor, experts: Experts, e: int) -> torch.Tensor:
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[e])


@pytest.fixture(scope="module")
def experts() -> Experts:
    return Experts().requires_grad_(False)


def test_expert_matches_torch_and_a_row_is_the_same_bits_in_any_batch(experts):
    rows = torch.randn(13, HIDDEN, generator=torch.Generator().manual_seed(1))
    gate_up, down = experts.gate_up_proj[2], experts.down_proj[2]
    with torch.no_grad(), torch_threads(1):
        alone = torch.cat([swiglu.expert(rows[i : i + 1], gate_up, down) for i in range(len(rows))])
    expected = reference(rows, experts, 2)
    assert torch.allclose(alone, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, expected + 1e-3)  # the tolerance can fail
    rng = random.Random(0)
    for threads in (1, 2):
        with torch.no_grad(), torch_threads(threads):
            assert torch.equal(swiglu.expert(rows, gate_up, down), alone)
            for _ in range(8):
                start = rng.randrange(len(rows))
                stop = rng.randint(start + 1, len(rows))
                assert torch.equal(swiglu.expert(rows[start:stop], gate_up, down), alone[start:stop])


def routed(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, list[int], list[int]]]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, HIDDEN, generator=gen)
    indices = torch.stack([torch.randperm(EXPERTS, generator=gen)[:2] for _ in range(rows)])
    weights = torch.rand(rows, 2, generator=gen)
    return x, weights, expert_rows(indices.tolist())


def per_expert_sum(x, weights, plan, experts) -> torch.Tensor:
    """The executor's sum of per-expert results: ascending experts, ``weight * output`` added per row."""
    out = torch.zeros_like(x)
    for e, rows, slots in plan:
        at = torch.tensor(rows)
        y = swiglu.expert(x[at], experts.gate_up_proj[e], experts.down_proj[e])
        out.index_put_((at,), y * weights[at, torch.tensor(slots)][:, None], accumulate=True)
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_a_layer_in_one_call_is_the_per_expert_sum_bit_for_bit(experts, threads):
    x, weights, plan = routed(11, seed=threads)
    with torch.no_grad(), torch_threads(threads):
        expected = per_expert_sum(x, weights, plan, experts)
        out = torch.zeros_like(x)
        assert swiglu.moe(x, out, experts, plan, weights) == len(plan)
    assert torch.equal(out, expected)


def test_a_raised_stop_flag_ends_the_layer_between_experts_and_the_rest_completes_it(experts):
    x, weights, plan = routed(9, seed=5)
    assert len(plan) > 2
    flag = StopFlag()
    flag.set(True)
    with torch.no_grad():
        expected = per_expert_sum(x, weights, plan, experts)
        out = torch.zeros_like(x)
        assert swiglu.moe(x, out, experts, plan, weights, flag.address) == 1  # the first expert, then stop
        assert not torch.equal(out, expected)
        flag.set(False)
        assert swiglu.moe(x, out, experts, plan[1:], weights, flag.address) == len(plan) - 1
        assert torch.equal(out, expected)
        # a stop that only Python can call is polled between experts, one call each
        polled = torch.zeros_like(x)
        asked = []
        done = swiglu.run_layer(experts, x, weights, plan, polled, lambda: asked.append(1) or len(asked) == 2)
        assert done == 2 and len(asked) == 2
        swiglu.run_layer(experts, x, weights, plan[done:], polled, None)
        assert torch.equal(polled, expected)


def test_fits_only_silu_experts_without_biases_on_the_skinny_kernel(experts):
    with torch.no_grad():
        assert swiglu.fits(experts)
        gelu = Experts(hidden=64, inter=32).requires_grad_(False)
        gelu.act_fn = torch.nn.GELU()
        assert not swiglu.fits(gelu)
        biased = Experts().requires_grad_(False)
        biased.gate_up_proj_bias = torch.zeros(EXPERTS, 2 * INTER)
        assert not swiglu.fits(biased)
        assert not swiglu.fits(Experts().to(torch.bfloat16).requires_grad_(False))


@pytest.fixture
def on_kernel(monkeypatch):
    """The tiny preset with every weight large enough for the skinny kernel: its experts run fused."""
    monkeypatch.setattr(gemm, "ONEDNN_MIN_WEIGHT", 0)
    hf, tokenizer = presets.PRESETS["tiny"].build(torch.float32)
    with torch_threads(1):
        executor = load_model((hf, tokenizer))
    with torch.no_grad():
        assert all(executor.swiglu_experts(block) is not None for block in executor.moe_blocks)
    return hf, executor


def test_a_model_on_the_kernel_matches_transformers(on_kernel):
    hf, executor = on_kernel
    prompt = [5, 17, 99, 3, 42, 7, 11]
    with torch.no_grad(), torch_threads(1):
        ours = run_forward(executor, executor.new_cache(), prompt)
        theirs = hf(torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert run_alone(executor, prompt, greedy(8)).tokens == generated[0, len(prompt) :].tolist()


def test_a_moe_op_on_the_kernel_stopped_and_resumed_gives_the_unstopped_bits(on_kernel):
    _, executor = on_kernel
    x = torch.randn(6, executor.config.hidden_size, generator=torch.Generator().manual_seed(3))
    flag = StopFlag()
    with torch.no_grad(), torch_threads(2):
        (whole,) = executor.run([Op(OpKind.MOE, 1, x)])
        # the per-expert ops of the layer, summed as the executor's passes sum them
        (routed_x, weights, indices) = executor.run([Op(OpKind.ROUTER, 1, x)])[0]
        expected = torch.zeros_like(routed_x)
        for e, rows, slots in expert_rows(indices.tolist()):
            at = torch.tensor(rows)
            op = Op(OpKind.EXPERT, 1, routed_x[at], expert=e, weight=weights[at, torch.tensor(slots)])
            expected.index_put_((at,), executor.run([op])[0], accumulate=True)
        assert torch.equal(whole[0], expected)
        flag.set(True)
        (part,) = executor.run([Op(OpKind.MOE, 1, x)], flag)
        assert isinstance(part, Partial)
        flag.set(False)
        (resumed,) = executor.run([Op(OpKind.MOE, 1, x, expert=part.next_expert, partial=part)], flag)
    assert torch.equal(resumed[0], whole[0])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 instruction sets")
def test_the_kernels_built_without_avx512_give_a_row_the_same_bits_in_any_batch(tmp_path):
    """The build for CPUs with AVX2 but no AVX-512 (other lanes and blocks) is checked here too,
    whatever this machine has: a row alone and in any batch, GEMM and expert alike."""
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        pytest.skip("no C compiler")
    lib_path = tmp_path / "skinny-avx2.so"
    flags = [*skinny.FLAGS, "-march=x86-64-v3", str(skinny.SOURCE), "-o", str(lib_path)]
    done = subprocess.run([cc, *flags], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"the compiler cannot build for x86-64-v3: {done.stderr[-200:]}")
    lib = ctypes.CDLL(str(lib_path))
    long, ptr = ctypes.c_long, ctypes.c_void_p
    gemm_fn, expert_fn = lib.qllm_skinny_linear, lib.qllm_swiglu_expert
    gemm_fn.argtypes = [ptr, long, ptr, long, ptr, ptr, long, long, long, long, ctypes.c_int]
    expert_fn.argtypes = [ptr, long, long, ptr, long, ptr, long, long, long, ptr, ptr, long, ctypes.c_int]
    small = Experts(hidden=203, inter=37, experts=1).requires_grad_(False)
    gate_up, down = small.gate_up_proj[0].contiguous(), small.down_proj[0].contiguous()
    rows = torch.randn(11, 203, generator=torch.Generator().manual_seed(4))

    def linear(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], gate_up.shape[0])
        gemm_fn(
            x.data_ptr(),
            203,
            gate_up.data_ptr(),
            203,
            None,
            y.data_ptr(),
            y.shape[1],
            x.shape[0],
            y.shape[1],
            203,
            2,
        )
        return y

    def expert(x: torch.Tensor) -> torch.Tensor:
        y, h = torch.empty(x.shape[0], 203), torch.empty(x.shape[0], 37)
        expert_fn(
            x.data_ptr(),
            203,
            x.shape[0],
            gate_up.data_ptr(),
            203,
            down.data_ptr(),
            37,
            203,
            37,
            h.data_ptr(),
            y.data_ptr(),
            203,
            2,
        )
        return y

    with torch.no_grad():
        for f, expected in ((linear, F.linear(rows, gate_up)), (expert, reference(rows, small, 0))):
            whole = f(rows)
            assert torch.allclose(whole, expected, rtol=1e-5, atol=1e-5)
            for start, stop in ((0, 1), (3, 4), (2, 9), (5, 11), (0, 7)):
                assert torch.equal(f(rows[start:stop].contiguous()), whole[start:stop])
