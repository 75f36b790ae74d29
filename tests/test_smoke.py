import pytest
import torch

from qllm.kernel.program import generate
from qllm.sampling import Sampler, SamplingParams, argmax


def test_tiny_generates_requested_number_of_tokens(tiny):
    result = generate(tiny, "hello", SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(result.token_ids) == 5
    assert result.stop_reason == "length"


async def test_event_loop_is_uvloop():
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_greedy_pick_is_torch_argmax_with_ties_nans_and_strided_rows(dtype):
    # Greedy sampling takes numpy's argmax on CPU (faster); it must pick what torch.argmax picks.
    gen = torch.Generator().manual_seed(0)
    for trial in range(100):
        x = torch.randn(8, 1000, generator=gen).to(dtype)
        if trial % 3 == 0:  # ties: the first of the largest
            x[:, torch.randint(0, 1000, (5,), generator=gen)] = x.max()
        if trial % 7 == 0:  # a NaN counts as the largest
            x[:, torch.randint(0, 1000, (2,), generator=gen)] = float("nan")
        if trial % 11 == 0:
            x[:] = float("-inf")
        for row in (x[trial % 8], x[:, ::2][trial % 8], x.t().contiguous().t()[trial % 8]):
            assert argmax(row) == int(torch.argmax(row))
    assert Sampler(SamplingParams())(x[0]) == int(torch.argmax(x[0]))
