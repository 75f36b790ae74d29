"""The executor's matmul kernel choice keeps results batch-invariant and close to ``F.linear``.

:func:`qllm.models.gemm.linear` runs large float32 weights through qllm's skinny kernel where it
builds on this machine, else through oneDNN; the executor relies on a row's result not depending
on how many rows share the call, at the row padding the probe finds on this machine (none for the
skinny kernel; for oneDNN typically any count from two rows up). A model whose matmuls all run
through one of them pads as its probe found, and batching still gives each request its solo
results. The oneDNN tests turn the skinny kernel off.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tiny_families import greedy, layer_major, run_alone, run_together, torch_threads
from torch.utils._python_dispatch import TorchDispatchMode

from qllm.kernel.runtime.ops import OpKind
from qllm.models import gemm, invariance, load_model, skinny
from qllm.models.executor import pad_rows

needs_onednn = pytest.mark.skipif(not gemm.ONEDNN, reason="this torch build has no oneDNN linear")
needs_skinny = pytest.mark.skipif(not skinny.available(), reason="qllm's skinny kernel does not build here")


@pytest.fixture
def onednn_only(monkeypatch):
    """Large float32 weights through oneDNN, as on a machine where the skinny kernel does not build."""
    monkeypatch.setattr(gemm, "SKINNY", False)


# (in_features, out_features): a big-enough weight for oneDNN, and one with a ragged out size.
SHAPES = [(512, 512), (1024, 1000)]
THREADS = [1, 2]


def make_weight(in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    return weight, torch.randn(out_features, generator=gen)


@needs_onednn
def test_large_float32_weights_use_onednn_and_small_ones_do_not(onednn_only):
    big, _ = make_weight(*SHAPES[0])
    with torch.no_grad():
        assert gemm.uses_onednn(big)
        assert gemm.large_weight_kernel() == ("onednn_packed" if gemm.PACK else "onednn")
        assert not gemm.uses_onednn(torch.zeros(64, 64))
        assert not gemm.uses_onednn(big.to(torch.bfloat16))
    with torch.enable_grad():
        assert not gemm.uses_onednn(big)  # autograd needs F.linear


@needs_onednn
@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}threads")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
def test_padded_row_is_independent_of_batch_mates(in_features, out_features, bias, threads, onednn_only):
    weight, b = make_weight(in_features, out_features)
    b = b if bias else None
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(0)
    with torch_threads(threads), torch.no_grad():
        padding = invariance.find_padding(
            lambda x: gemm.linear(x, weight, b), lambda n: torch.randn(n, in_features, generator=gen), 64
        )
        assert padding is not None, "oneDNN linear is batch-invariant at no tested padding on this machine"
        multiple, minimum = padding
        for _ in range(12):
            row = torch.randn(1, in_features, generator=gen)
            alone = gemm.linear(pad_rows(row, multiple, minimum), weight, b)[0]
            size = rng.randint(2, 70)
            offset = rng.randrange(size)
            batch = torch.randn(size, in_features, generator=gen)
            batch[offset] = row[0]
            together = gemm.linear(pad_rows(batch, multiple, minimum), weight, b)
            assert torch.equal(together[offset], alone), f"batch of {size}, row at {offset}"


@pytest.mark.parametrize("kernel", ["skinny", "onednn"])
@pytest.mark.parametrize("rows", [1, 4, 33])
def test_matches_f_linear(rows, kernel, monkeypatch):
    if kernel == "onednn":
        monkeypatch.setattr(gemm, "SKINNY", False)
    elif not skinny.available():
        pytest.skip("qllm's skinny kernel does not build here")
    weight, b = make_weight(*SHAPES[1])
    x = torch.randn(rows, SHAPES[1][0], generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        ours, reference = gemm.linear(x, weight, b), F.linear(x, weight, b)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, reference + 1e-3)  # the tolerance can fail


@needs_onednn
@pytest.mark.parametrize("kernel", ["skinny", "onednn"])
def test_model_on_one_kernel_stays_batch_invariant_at_its_probed_padding(tiny, monkeypatch, kernel):
    if kernel == "onednn":
        monkeypatch.setattr(gemm, "SKINNY", False)
    elif not skinny.available():
        pytest.skip("qllm's skinny kernel does not build here")
    monkeypatch.setattr(gemm, "ONEDNN_MIN_WEIGHT", 0)  # every weight of the tiny model through the kernel
    with torch_threads(1):
        executor = load_model((tiny.hf, tiny.tokenizer))  # same weights, new executor, probed anew
    assert executor.invariance.verified
    if kernel == "skinny":  # invariant by construction: the probe finds no padding needed
        assert tuple(executor.invariance.padding["EXPERT"]) == (1, 1)
    prompts = [[5, 17, 99, 3, 42, 7, 11], [8, 1, 64], [120, 33, 2, 90, 14], [77]]
    params = greedy(6)
    with torch_threads(1):
        alone = [run_alone(executor, prompt, params) for prompt in prompts]
        calls: list[tuple[OpKind, list[int]]] = []
        together = run_together(
            executor, prompts, params, join_after=[0, 0, 2, 4], choose=layer_major, calls=calls
        )
    for solo, batched in zip(alone, together):
        assert batched.tokens == solo.tokens
        for (key, x), (_, y) in zip(solo.results, batched.results):
            assert all(torch.equal(a, b) for a, b in zip(_tensors(x), _tensors(y))), f"op {key} differs"
    assert any(kind == OpKind.EXPERT and len(rows) > 1 for kind, rows in calls)


def _tensors(result) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else list(result)


needs_packing = pytest.mark.skipif(not gemm.PACK, reason="this torch build cannot pack weights for oneDNN")


@needs_packing
def test_packed_weight_follows_changes_to_the_weight(onednn_only):
    """A weight changed in place, or given new data, is packed again: results follow the weight."""
    weight, b = make_weight(*SHAPES[1])
    fused = torch.stack([weight, weight * 2])  # like a fused expert weight: a view per expert
    x = torch.randn(3, SHAPES[1][0], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first = gemm.linear(x, fused[1], b)
        assert gemm.packed(fused[1]) is gemm.packed(fused[1])  # packed once, then reused
        assert gemm.packed(fused[0]) is not gemm.packed(fused[1])  # one per view
        assert torch.allclose(first, F.linear(x, fused[1], b), rtol=1e-5, atol=1e-5)
        fused[1].mul_(-1)  # in place
        assert torch.allclose(gemm.linear(x, fused[1], b), -first + 2 * b, rtol=1e-5, atol=1e-5)
        param = torch.nn.Parameter(weight.clone(), requires_grad=False)
        before = gemm.linear(x, param, b)
        param.data = weight * 3  # new data under the same parameter
        assert torch.allclose(gemm.linear(x, param, b), 3 * before - 2 * b, rtol=1e-4, atol=1e-4)


@needs_packing
@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}threads")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_projections_of_one_input_run_as_one_batch_invariant_gemm(bias, threads, onednn_only):
    """Query, key and value projections in one call: each output is its projection's (close to
    ``F.linear``), a row's results do not depend on its batch mates at the probed padding, and the
    fused weight follows changes to any of its parts."""
    (q, bq), (k, bk), (v, bv) = (make_weight(512, n) for n in (512, 128, 128))
    weights = (q, k, v)
    biases = (bq, bk, bv) if bias else (None, None, None)
    gen = torch.Generator().manual_seed(2)
    rng = random.Random(1)
    with torch_threads(threads), torch.no_grad():
        x = torch.randn(5, 512, generator=gen)
        outs = gemm.linear_cat(x, weights, biases)
        assert [o.shape for o in outs] == [(5, 512), (5, 128), (5, 128)]
        for out, w, b in zip(outs, weights, biases):
            assert torch.allclose(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)

        def fused(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat(gemm.linear_cat(rows, weights, biases), dim=-1)

        padding = invariance.find_padding(fused, lambda n: torch.randn(n, 512, generator=gen), 64)
        assert padding is not None, "the fused projection is batch-invariant at no tested padding here"
        for _ in range(8):
            row = torch.randn(1, 512, generator=gen)
            alone = fused(pad_rows(row, *padding))[0]
            size, batch = rng.randint(2, 40), torch.randn(40, 512, generator=gen)
            offset = rng.randrange(size)
            batch[offset] = row[0]
            assert torch.equal(fused(pad_rows(batch[:size], *padding))[offset], alone)

        before = gemm.linear_cat(x, weights, biases)[1]
        k.mul_(-1)  # one part changed in place: the fused weight is built again
        after = gemm.linear_cat(x, weights, biases)[1]
        expected = -before + 2 * bk if bias else -before
        assert torch.allclose(after, expected, rtol=1e-5, atol=1e-5)


def test_projections_run_separately_where_weights_are_not_packed(monkeypatch):
    monkeypatch.setattr(gemm, "PACK", False)
    weights = tuple(make_weight(512, n)[0] for n in (512, 128))
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outs = gemm.linear_cat(x, weights, (None, None))
        assert all(torch.equal(o, gemm.linear(x, w)) for o, w in zip(outs, weights))


@needs_skinny
def test_large_float32_weights_use_the_skinny_kernel_where_it_builds():
    big, _ = make_weight(*SHAPES[0])
    with torch.no_grad():
        assert gemm.uses_skinny(big) and not gemm.uses_onednn(big)
        assert gemm.large_weight_kernel() == "skinny"
        assert not gemm.uses_skinny(torch.zeros(64, 64))
        assert not gemm.uses_skinny(big.to(torch.bfloat16))
        assert not gemm.uses_skinny(big.T)  # rows not contiguous: another kernel, always
        assert gemm.pack(big) == 0  # nothing to pack: the kernel reads the weight as it is
    with torch.enable_grad():
        assert not gemm.uses_skinny(big)


@needs_skinny
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(("in_features", "out_features"), [(1024, 1000), (1003, 517), (8, 2**15)])
def test_skinny_row_is_the_same_bits_at_any_row_count_offset_and_thread_count(
    in_features, out_features, bias
):
    """No padding needed: a row alone, at any place in a batch of any size (odd sizes and a
    remainder of columns and of the inner dimension included), and on one or two threads."""
    weight, b = make_weight(in_features, out_features)
    b = b if bias else None
    gen = torch.Generator().manual_seed(3)
    rng = random.Random(2)
    with torch.no_grad():
        rows = torch.randn(40, in_features, generator=gen)
        with torch_threads(1):
            alone = torch.cat([skinny.linear(rows[i : i + 1], weight, b) for i in range(len(rows))])
        assert torch.allclose(alone, F.linear(rows, weight, b), rtol=1e-4, atol=1e-4)
        for threads in THREADS:
            with torch_threads(threads):
                assert torch.equal(skinny.linear(rows, weight, b), alone)
                for _ in range(10):
                    start = rng.randrange(len(rows))
                    stop = rng.randint(start + 1, len(rows))
                    assert torch.equal(skinny.linear(rows[start:stop], weight, b), alone[start:stop])


@needs_skinny
def test_skinny_reads_rows_with_a_stride_and_refuses_what_it_cannot_compute():
    weight, b = make_weight(512, 600)
    wide = torch.randn(6, 700, generator=torch.Generator().manual_seed(6))
    x = wide[:, 100:612]  # rows 700 floats apart
    with torch.no_grad():
        assert torch.equal(skinny.linear(x, weight, b), skinny.linear(x.contiguous(), weight, b))
        # weight rows 700 floats apart (a slice of a wider weight), as many rows as the kernel blocks
        spaced = torch.randn(600, 700, generator=torch.Generator().manual_seed(7))[:, 100:612]
        for n in (1, 5, 6):
            assert torch.equal(skinny.linear(x[:n], spaced, b), skinny.linear(x[:n], spaced.contiguous(), b))
        assert skinny.linear(x[:0], weight, b).shape == (0, 600)
        with pytest.raises(ValueError, match="do not fit"):
            skinny.linear(torch.randn(2, 511), weight, b)
        with pytest.raises(ValueError, match="float32"):
            skinny.linear(x.double(), weight.double(), None)
        with pytest.raises(ValueError, match="contiguous"):
            skinny.linear(torch.randn(2, 600), weight.T, None)


@needs_skinny
@pytest.mark.parametrize("threads", THREADS)
def test_projections_of_one_input_run_in_one_skinny_call_with_each_ones_bits(threads):
    """One call, one parallel region, for a layer's query, key and value: each output the bits of
    its own call, with and without biases, at any row count."""
    (q, bq), (k, bk), (v, _) = (make_weight(512, n) for n in (512, 640, 517))
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(7))
    calls = []
    with torch.no_grad(), torch_threads(threads), _GemmCalls(calls):
        outs = gemm.linear_cat(x, (q, k, v), (bq, bk, None))
    assert calls == ["qllm::skinny_linear_many"]
    with torch.no_grad():
        for out, w, b in zip(outs, (q, k, v), (bq, bk, None)):
            assert torch.equal(out, skinny.linear(x, w, b))
            assert torch.equal(gemm.linear_cat(x[3:4], (q, k, v), (bq, bk, None))[0], outs[0][3:4])
        with pytest.raises(ValueError, match="do not fit"):
            skinny.linear_many(x, [q, torch.randn(8, 511)], [None, None])


class _GemmCalls(TorchDispatchMode):
    """Records the names of qllm's kernel ops called."""

    def __init__(self, calls: list[str]):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("qllm::"):
            self.calls.append(func.name().partition(".")[0])
        return func(*args, **(kwargs or {}))


def _gemm_choice(env: dict[str, str]) -> list[str]:
    import os
    import subprocess
    import sys

    code = (
        "import torch; from qllm.models import gemm, skinny; w = torch.zeros(1024, 1024)\n"
        "with torch.no_grad():\n"
        "    y = gemm.linear(torch.ones(2, 1024), w)\n"
        "    print(skinny.available(), gemm.uses_skinny(w), gemm.uses_onednn(w), float(y.abs().sum()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_without_a_compiler_or_with_qllm_skinny_0_large_weights_run_on_onednn(tmp_path):
    for env in ({"CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path)}, {"QLLM_SKINNY": "0"}):
        assert _gemm_choice(env) == ["False", "False", str(gemm.ONEDNN), "0.0"], env


@needs_skinny
def test_the_kernel_is_built_once_per_machine_into_the_cache(tmp_path):
    assert _gemm_choice({"XDG_CACHE_HOME": str(tmp_path)}) == ["True", "True", "False", "0.0"]
    built = list((tmp_path / "qllm").glob("skinny-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _gemm_choice({"XDG_CACHE_HOME": str(tmp_path)})[0] == "True"
    assert [p.stat().st_mtime_ns for p in (tmp_path / "qllm").glob("skinny-*.so")] == [stamp]


def test_doctor_names_the_kernel_of_large_weights():
    import json
    import subprocess
    import sys

    def doctor(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "qllm", "doctor", "--model", "tiny", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    report = json.loads(doctor("--json"))
    assert report["batch_invariance"]["large_weight_gemm"] == gemm.large_weight_kernel()
    expected = "qllm's skinny kernel" if gemm.large_weight_kernel() == "skinny" else "oneDNN"
    assert f"GEMM:      large float32 weights on {expected}" in doctor()
