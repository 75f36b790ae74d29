from qllm.generation import generate
from qllm.sampling import SamplingParams


def test_tiny_generates_requested_number_of_tokens(tiny):
    result = generate(tiny, "hello", SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(result.token_ids) == 5
    assert result.stop_reason == "length"


async def test_event_loop_is_uvloop():
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
