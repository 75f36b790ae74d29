"""The row padding that makes batching exact is found by probing this machine's kernels.

A fake GEMM whose tail rows round differently unless a call's rows are a multiple of some block
stands in for a CPU kernel of any vendor: the probe must find that block, and must report, not
hide, a kernel no padding can fix. The executor pads each op kind as the probe found, caches the
finding per machine and thread count, and says in stats what it verified.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from structlog.testing import capture_logs
from tiny_families import greedy, layer_major, run_alone, run_together, torch_threads

from qllm.kernel.runtime.ops import OpKind
from qllm.models import invariance, load_model

WEIGHT = torch.randn(32, 24, generator=torch.Generator().manual_seed(0))


def blocked_gemm(block: int):
    """``x @ WEIGHT.T`` where full blocks of ``block`` rows are computed one way (in float64, then
    rounded) and the rows past the last full block another (in float32, row by row), as a kernel's
    remainder loop would: invariant only at multiples of ``block``."""

    def gemm(x: torch.Tensor) -> torch.Tensor:
        full = x.shape[0] - x.shape[0] % block
        head = (x[:full].double() @ WEIGHT.T.double()).float()
        tail = [row @ WEIGHT.T for row in x[full:]]
        return torch.cat([head, *(t[None] for t in tail)])

    return gemm


def random_rows(n: int) -> torch.Tensor:
    return torch.randn(n, WEIGHT.shape[1])


def test_the_fake_kernel_really_differs_on_ragged_tails():
    x = random_rows(20)
    gemm = blocked_gemm(16)
    assert not torch.equal(
        gemm(x)[:4], gemm(x[:4])
    )  # same rows, another path: the probe has something to find
    assert torch.equal(gemm(x[:16]), gemm(x)[:16])


@pytest.mark.parametrize("block", [2, 4, 8, 16, 32])
def test_probe_finds_the_multiple_a_kernel_needs(block):
    assert invariance.find_padding(blocked_gemm(block), random_rows, max_rows=96) == (block, block)


def test_probe_finds_that_a_lone_row_is_the_only_odd_one():
    def lone_row_differs(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x[0][None] @ WEIGHT.T
        return (x.double() @ WEIGHT.T.double()).float()

    assert invariance.find_padding(lone_row_differs, random_rows, max_rows=64) == (1, 2)


def test_probe_reports_a_kernel_no_padding_fixes():
    def depends_on_every_mate(x: torch.Tensor) -> torch.Tensor:
        return (x.double() @ WEIGHT.T.double()).float() + x.sum() * 1e-3  # each row moves with its mates

    assert invariance.find_padding(depends_on_every_mate, random_rows, max_rows=64) is None


def test_combined_padding_keeps_every_gemm_invariant():
    assert invariance.combine([(1, 2), (4, 4), (16, 16)]) == (16, 16)
    assert invariance.combine([(1, 2)]) == (1, 2)
    assert invariance.combine([]) == invariance.NO_PADDING
    both = invariance.combine([(4, 4), (8, 8)])
    for block in (4, 8):
        assert invariance.is_invariant(blocked_gemm(block), random_rows, both, max_rows=64)


@pytest.mark.parametrize("threads", [1, 2], ids=lambda n: f"{n}threads")
@pytest.mark.parametrize(
    ("in_features", "out_features", "bias"), [(48, 96, False), (256, 64, True), (1024, 512, False)]
)
def test_real_linear_is_invariant_at_the_padding_found_here(in_features, out_features, bias, threads):
    """On this machine's F.linear, at 1 and 2 threads: a row among random batch mates (checked
    independently of the probe's own procedure) equals its solo result at the probed padding."""
    gen = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    b = torch.randn(out_features, generator=gen) if bias else None
    with torch_threads(threads), torch.no_grad():
        padding = invariance.find_padding(
            lambda x: F.linear(x, weight, b), lambda n: torch.randn(n, in_features), 96
        )
        if padding is None:
            pytest.skip(
                f"F.linear {out_features}x{in_features} is not batch-invariant at any tested padding here"
            )
        for size in range(1, 71, 3):
            offset = size // 2
            batch = torch.randn(size, in_features, generator=gen)
            alone = F.linear(pad(batch[offset : offset + 1], padding), weight, b)[0]
            together = F.linear(pad(batch, padding), weight, b)
            assert torch.equal(together[offset], alone), (
                f"batch of {size}, row at {offset}, padding {padding}"
            )


def pad(x: torch.Tensor, padding: invariance.Padding) -> torch.Tensor:
    from qllm.models.executor import pad_rows

    return pad_rows(x, *padding)


# ------------------------------------------------------------------ the executor's calibration


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "qllm" / "invariance.json"


def test_executor_pads_each_op_kind_as_the_probe_found(tiny, probe_cache, monkeypatch):
    """A kernel needing blocks of 8 on every GEMM: every op kind pads to 8 and batching stays exact."""
    probed = []

    def probe(gemm):
        probed.append(gemm.signature())
        return (8, 8)

    monkeypatch.setattr(invariance, "probe_gemm", probe)
    executor = load_model((tiny.hf, tiny.tokenizer))
    summary = executor.invariance.summary()
    assert summary["verified"] and summary["probed"] == len(probed) > 0
    assert summary["padding"] == {kind: [8, 8] for kind in ("ATTENTION", "ROUTER", "EXPERT", "HEAD")}
    calls: list[tuple[OpKind, list[int]]] = []
    with torch_threads(executor.invariance.threads):
        prompts = [[5, 17, 99, 3], [8, 1, 64]]
        alone = [run_alone(executor, p, greedy(4)).tokens for p in prompts]
        together = run_together(executor, prompts, greedy(4), choose=layer_major, calls=calls)
    assert [t.tokens for t in together] == alone


def test_findings_are_cached_per_machine_and_thread_count(tiny, probe_cache, monkeypatch):
    probed = []
    monkeypatch.setattr(invariance, "probe_gemm", lambda gemm: probed.append(gemm) or (4, 4))
    with torch_threads(1):
        first = load_model((tiny.hf, tiny.tokenizer)).invariance
        assert first.probed == len(probed) > 0 and first.probed + first.cached == first.gemms
        assert probe_cache.exists()
        again = load_model((tiny.hf, tiny.tokenizer)).invariance  # a restart: nothing probed, nothing traced
        assert again.probed == 0 and again.padding == first.padding and len(probed) == first.probed
    with torch_threads(2):
        other = load_model((tiny.hf, tiny.tokenizer)).invariance
        assert other.threads == 2 and other.probed == first.probed  # another thread count: probed anew
    saved = json.loads(probe_cache.read_text())
    assert len(saved["models"]) == 2 and len(saved["gemms"]) == 2 * first.probed


def test_executor_recalibrates_when_the_thread_count_changes(tiny, probe_cache):
    executor = load_model((tiny.hf, tiny.tokenizer))
    other = 2 if executor.invariance.threads == 1 else 1
    with torch_threads(other):
        run_alone(executor, [1, 2, 3], greedy(1))
        assert executor.invariance.threads == other


def test_a_kernel_no_padding_fixes_is_reported_and_not_padded(tiny, probe_cache, monkeypatch):
    monkeypatch.setattr(
        invariance, "probe_gemm", lambda gemm: None if gemm.rows_in.shape[1] == 64 else (4, 4)
    )
    with capture_logs() as logs:
        executor = load_model((tiny.hf, tiny.tokenizer))
    summary = executor.invariance.summary()
    assert not summary["verified"] and summary["unverified"]
    assert all(summary["padding"][kind] == [1, 1] for kind in summary["unverified"])
    warnings = [e for e in logs if e["event"] == "batch_invariance_unverified"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"


def test_cache_file_that_is_garbage_is_ignored(tiny, probe_cache):
    probe_cache.parent.mkdir(parents=True)
    probe_cache.write_text("{not json")
    executor = load_model((tiny.hf, tiny.tokenizer))
    assert executor.invariance.probed > 0  # probed afresh
    assert "models" in json.loads(probe_cache.read_text())


def test_without_batch_invariance_nothing_is_probed_or_padded(tiny, probe_cache):
    executor = load_model((tiny.hf, tiny.tokenizer), batch_invariant=False)
    assert executor.invariance is None and not probe_cache.exists()
    assert set(executor._padding.values()) == {invariance.NO_PADDING}


def test_an_ops_row_wise_work_besides_gemms_is_checked_too(tiny):
    """A router whose scores go through work that differs on a ragged tail of rows (as a vectorised
    activation's scalar remainder loop does): the op check pads the router to the block it needs,
    though its GEMM alone needs less."""
    executor = load_model((tiny.hf, tiny.tokenizer), batch_invariant=False)
    executor.batch_invariant = True
    route = executor.route

    def tail_sensitive_route(block, x):
        weights, indices = route(block, x)
        full = weights.shape[0] - weights.shape[0] % 8
        bumped = torch.cat([weights[:full], weights[full:] * (1 + 2**-20)])  # the tail rounds elsewhere
        return bumped, indices

    executor.route = tail_sensitive_route
    found = executor.calibrate(invariance.ProbeCache(persist=False))
    assert found.verified and found.ops_checked > 0
    multiple, _ = found.padding["ROUTER"]
    assert multiple % 8 == 0


def test_the_models_sigmoid_gives_an_element_the_same_bits_at_any_tensor_size():
    """torch's sigmoid computes the last elements that do not fill a vector chunk on another
    path; the routers' sigmoid (qllm.models.base.sigmoid) does not depend on the size."""
    from qllm.models.base import sigmoid

    x = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 4
    whole = sigmoid(x)
    assert torch.allclose(whole, torch.sigmoid(x), rtol=0, atol=1e-6)
    for n in range(1, 130):
        assert torch.equal(sigmoid(x[:n].clone()), whole[:n]), n
    assert torch.equal(sigmoid(x.view(3, 100)), whole.view(3, 100))
