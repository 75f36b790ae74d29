"""Request lifecycle on a live engine: cancellation at every stage frees what the request held,
stop and drain end every live request, rejected requests change nothing, failures stay contained.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import structlog
from kernel_helpers import Recorder, greedy

import qllm
from qllm.errors import EngineClosed, InvalidRequest
from qllm.policies import load_policy

LONG_PROMPT = list(range(60, 120))  # 60 tokens: 15 prefill passes of 4
PROMPT = [11, 12, 13, 14, 15]


def assert_idle(stats: dict) -> None:
    """Nothing live, nothing queued, no request state held."""
    assert stats["live"] == {"ls": {}, "be": {}}
    assert stats["queues"] == {"waiting": 0, "admitted": 0, "in_flight": 0}
    assert stats["memory"]["resident_bytes"] == 0
    assert stats["memory"]["offloaded_bytes"] == 0
    assert stats["memory"]["requests"] == 0


async def still_serves(engine, model) -> None:
    result = await engine.generate(PROMPT, max_tokens=3, ignore_eos=True)
    chunk = engine.stats()["kernel"]["prefill_chunk"]
    assert (result.status, result.token_ids) == ("length", greedy(model, PROMPT, 3, chunk))


async def test_cancel_mid_prefill_frees_memory_and_ends_the_stream(tiny):
    recorder = Recorder(load_policy("priority-aging"))
    seen = {}
    async with qllm.Engine(model=tiny, policy=recorder, prefill_chunk=4) as engine:
        handle = engine.submit(LONG_PROMPT, max_tokens=8, priority="be")

        def cancel():  # right before batch 30: the request is a few prefill chunks in
            seen["stats"] = engine.stats()
            seen["cancelled"] = engine.cancel(handle.id)

        recorder.at[30] = [cancel]
        chunks = [c async for c in handle]
        result = await handle.result()
        stats = engine.stats()
        await still_serves(engine, tiny)

    before = seen["stats"]
    assert seen["cancelled"] is True
    assert before["memory"]["resident_bytes"] > 0 and before["memory"]["requests"] == 1
    assert before["live"]["be"] == {"running": 1}
    assert (result.status, result.error) == ("aborted", "cancelled")
    assert result.token_ids == [] and result.first_token is None
    assert result.first_scheduled is not None and result.finished >= result.first_scheduled
    assert chunks == []
    assert recorder.ops_of(handle.id) == 31  # batches 0..30; nothing ran after the cancel
    assert_idle(stats)
    assert stats["metrics"]["be"]["requests"]["aborted"] == 1
    assert not engine.cancel(handle.id)  # no longer live


async def test_cancel_mid_decode_keeps_the_tokens_so_far(tiny):
    async with qllm.Engine(model=tiny, policy="qllm", prefill_chunk=4) as engine:
        handle = engine.submit(PROMPT, max_tokens=40, priority="ls", ignore_eos=True)
        chunks = []
        async for chunk in handle:
            chunks.append(chunk)
            if chunk.index == 2:
                mid = engine.stats()
                assert handle.cancel() is True
        result = await handle.result()
        stats = engine.stats()
        await still_serves(engine, tiny)

    assert mid["memory"]["resident_bytes"] > 0 and mid["live"]["ls"] == {"running": 1}
    assert result.status == "aborted" and result.error == "cancelled"
    assert 3 <= len(result.token_ids) < 40
    assert result.token_ids == greedy(tiny, PROMPT, len(result.token_ids), 4)  # greedy: a prefix
    assert [c.token_id for c in chunks] == result.token_ids
    assert len(result.token_times) == len(result.token_ids)
    assert_idle(stats)


async def test_cancel_a_waiting_request(tiny):
    recorder = Recorder(load_policy("fcfs"))
    seen = {}
    async with qllm.Engine(model=tiny, policy=recorder, max_batch=1) as engine:
        first = engine.submit(PROMPT, max_tokens=4, ignore_eos=True)
        second = engine.submit(LONG_PROMPT, max_tokens=4, ignore_eos=True)  # max_batch 1: it waits

        def cancel():
            seen["stats"] = engine.stats()
            seen["cancelled"] = engine.cancel(second.id)

        recorder.at[5] = [cancel]
        waited = await second.result()
        done = await first.result()
        stats = engine.stats()

    assert seen["cancelled"] is True
    assert seen["stats"]["queues"]["waiting"] == 1
    assert seen["stats"]["live"]["be"] == {"running": 1, "waiting": 1}
    assert seen["stats"]["memory"]["requests"] == 1  # a waiting request holds no state yet
    assert waited.status == "aborted" and waited.token_ids == []
    assert waited.first_scheduled is None and waited.first_token is None
    assert recorder.ops_of(second.id) == 0
    assert done.status == "length"
    assert done.token_ids == greedy(tiny, PROMPT, 4)
    assert_idle(stats)


async def test_cancel_unknown_or_finished_request_returns_false(tiny):
    async with qllm.Engine(model=tiny) as engine:
        assert engine.cancel("no-such-request") is False
        handle = engine.submit(PROMPT, max_tokens=2)
        await handle.result()
        assert engine.cancel(handle.id) is False
        assert handle.cancel() is False
        assert (await handle.result()).status in ("length", "stopped")


async def test_cancelling_the_awaiting_task_cancels_the_request(tiny):
    async with qllm.Engine(model=tiny, prefill_chunk=4) as engine:
        task = asyncio.create_task(engine.generate(LONG_PROMPT, max_tokens=50, ignore_eos=True))
        chunks = engine.stream(PROMPT, max_tokens=50, ignore_eos=True)
        async with contextlib.aclosing(chunks):
            async for _ in chunks:  # the first request is live and computing by now
                break  # leaving the stream early cancels its request too
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await still_serves(engine, tiny)  # arrives after both cancellations were handled
        stats = engine.stats()
    assert stats["metrics"]["be"]["requests"]["aborted"] == 2
    assert_idle(stats)


async def test_stop_aborts_every_live_request_and_closes_the_engine(tiny):
    engine = qllm.Engine(model=tiny, prefill_chunk=4)
    with pytest.raises(EngineClosed):
        engine.submit(PROMPT)  # not started
    await engine.start()
    handles = [
        engine.submit(LONG_PROMPT, max_tokens=30, priority="be"),
        engine.submit(LONG_PROMPT[:20], max_tokens=30, priority="ls", ignore_eos=True),
        engine.submit(PROMPT, max_tokens=30, priority="be"),
    ]
    chunks = aiter(handles[1])
    await anext(chunks)  # the LS request is decoding
    await chunks.aclose()
    await engine.stop()

    results = [await h.result() for h in handles]
    assert all(r.status == "aborted" and r.error == "engine stopped" for r in results)
    assert len(results[1].token_ids) >= 1
    # Every stream ends (the LS stream's first chunk was consumed above).
    streams = [[c.token_id async for c in h] for h in handles]
    assert streams == [results[0].token_ids, results[1].token_ids[1:], results[2].token_ids]
    assert_idle(engine.stats())
    assert engine.accepting is False and not engine.busy
    with pytest.raises(EngineClosed):
        engine.submit(PROMPT)
    await engine.stop()  # a second stop is a no-op


async def test_drain_lets_live_requests_finish_then_refuses_new_ones(tiny):
    async with qllm.Engine(model=tiny) as engine:
        handles = [engine.submit(PROMPT, max_tokens=3, ignore_eos=True) for _ in range(2)]
        await engine.drain(timeout=None)
        assert [(await h.result()).status for h in handles] == ["length", "length"]
        with pytest.raises(EngineClosed):
            engine.submit(PROMPT)
    async with qllm.Engine(model=tiny) as engine:
        handle = engine.submit(LONG_PROMPT, max_tokens=50)
        await engine.drain(timeout=0)
        result = await handle.result()
        assert (result.status, result.error) == ("aborted", "server shutting down")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(max_tokens=2.5),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-1),
        dict(priority="urgent"),
        dict(prompt=[]),
        dict(prompt=[1, 10**6]),
        dict(prompt=""),
        dict(rank="high"),
        dict(ttft_deadline=0),
        dict(stop=[""]),
    ],
    ids=repr,
)
async def test_invalid_request_raises_and_changes_nothing(tiny, kwargs):
    async with qllm.Engine(model=tiny) as engine:
        live = engine.submit(PROMPT, max_tokens=3, ignore_eos=True, request_id="live")
        before = engine.stats()
        prompt = kwargs.pop("prompt", PROMPT)
        with pytest.raises(InvalidRequest):
            engine.submit(prompt, **kwargs)
        with pytest.raises(InvalidRequest, match="already live"):
            engine.submit(PROMPT, request_id="live")
        assert engine.stats() == before
        result = await live.result()
        assert result.status == "length"
        assert result.token_ids == greedy(tiny, PROMPT, 3)
        assert sum(engine.stats()["metrics"]["be"]["requests"].values()) == 1


async def test_a_failing_batch_errors_its_requests_and_the_kernel_goes_on(tiny, monkeypatch):
    run = tiny.run
    calls = {"n": 0}

    def flaky(ops, stop=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device fell over")
        return run(ops, stop)

    monkeypatch.setattr(tiny, "run", flaky)
    async with qllm.Engine(model=tiny, policy="fcfs") as engine:
        with structlog.testing.capture_logs() as logs:
            failed = await engine.generate(PROMPT, max_tokens=3)
        await still_serves(engine, tiny)
        stats = engine.stats()
    assert failed.status == "error" and failed.error == "RuntimeError: device fell over"
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["batch_failed"]
    assert_idle(stats)


async def test_threads_sets_torchs_intra_op_pool_and_rejects_nonsense(tiny):
    import torch

    before = torch.get_num_threads()
    try:
        async with qllm.Engine(model=tiny, threads=2) as engine:
            assert torch.get_num_threads() == 2
            assert (await engine.generate([5, 6, 7], max_tokens=2)).status in ("length", "stopped")
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        qllm.Engine(model=tiny, threads=0)


class InterruptsRaise(Recorder):
    def interrupts(self, request):
        raise RuntimeError("broken interrupts hook")


async def test_an_arrival_stops_the_op_in_flight_only_when_the_policy_says_so(tiny):
    """Under ``cohort`` a best-effort arrival of a tenant with requests live leaves a grouped MoE
    op running whole (it would not run before that pass ends); an LS arrival, the first request of
    a tenant back from idle, a cancellation, or a policy whose hook raises stop it at the next
    expert. Every request still gets its result."""
    policies = {"cohort": load_policy("cohort"), "raising": InterruptsRaise(load_policy("cohort"))}
    for name, policy in policies.items():
        async with qllm.Engine(model=tiny, policy=policy) as engine:
            runner = engine._dispatcher.runner
            runner.interrupt_requested = False  # as when an op starts
            first = engine.submit([3, 4, 5], max_tokens=2, ignore_eos=True)
            assert runner.interrupt_requested  # its tenant was idle
            runner.interrupt_requested = False
            be = engine.submit([3, 4, 5], max_tokens=2, ignore_eos=True)
            assert runner.interrupt_requested is (name == "raising")
            runner.interrupt_requested = False
            ls = engine.submit([6, 7], max_tokens=2, priority="ls", ignore_eos=True)
            assert runner.interrupt_requested
            runner.interrupt_requested = False
            engine.cancel(be.id)
            assert runner.interrupt_requested
            assert len((await ls.result()).token_ids) == 2
            assert (await be.result()).status in ("aborted", "length")
            assert len((await first.result()).token_ids) == 2
            assert engine.stats()["kernel"]["policy_errors"] == (
                3 if name == "raising" else 0
            )  # one per arrival
