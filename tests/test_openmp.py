"""The engine keeps one OpenMP pool while it computes (qllm/kernel/openmp.py).

GNU OpenMP gives each thread that runs a parallel op a pool of helper threads; with two pools in
the process the helpers stop spinning between parallel regions and every op of the compute worker
waits for them to wake. These tests count the process's threads at two torch threads (Linux and
libgomp; skipped elsewhere).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
import torch

from qllm.engine import Engine
from qllm.kernel.openmp import drop_pool

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not drop_pool(), reason="needs Linux and GNU OpenMP"
)


@pytest.fixture(autouse=True)
def two_threads():
    """Two torch threads (the suite runs at one), so that a parallel op has a helper."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _quiet_count() -> int:
    """The thread count once no thread has come or gone for 50 ms (helpers of pools that earlier
    tests' workers left behind exit on their own)."""
    count, since = _threads(), time.monotonic()
    deadline = since + 5.0
    while time.monotonic() < deadline and time.monotonic() - since < 0.05:
        time.sleep(0.005)
        now = _threads()
        if now != count:
            count, since = now, time.monotonic()
    return count


async def _settles_at(count: int) -> int:
    """The thread count once exiting threads are gone (a pool's helpers exit on their own)."""
    for _ in range(200):
        if _threads() == count:
            break
        await asyncio.sleep(0.01)
    return _threads()


def _parallel_op() -> None:
    """An op torch splits among its threads (a large elementwise op), run on this thread."""
    torch.ones(1 << 22).mul_(2.0)


def test_drop_pool_lets_this_threads_helpers_go_and_they_come_back_on_demand():
    drop_pool()
    bare = _quiet_count()
    _parallel_op()
    with_pool = _threads()
    assert with_pool == bare + 1
    assert drop_pool()  # joins the helpers before it returns
    assert _threads() == bare
    _parallel_op()  # a later parallel op on this thread makes its pool again
    assert _threads() == with_pool
    assert torch.ones(1 << 22).mul_(2.0).sum().item() == 2.0 * (1 << 22)


async def test_engine_drops_the_loop_threads_pool_and_its_own_when_idle(tiny):
    drop_pool()
    bare = _quiet_count()
    _parallel_op()  # the loop thread holds a pool, as after loading a model
    assert _threads() == bare + 1
    async with Engine(model=tiny, policy="fcfs", compute="thread") as engine:
        # The engine's first hand-off drops the loop thread's pool; the worker makes its own.
        result = await engine.generate([5, 6, 7, 8] * 16, max_tokens=3, ignore_eos=True)
        assert result.status == "length"
        # Idle now: the worker (still there) lets its helpers go too.
        assert await _settles_at(bare + 1) == bare + 1
        # Busy again, and the tokens are what they were.
        again = await engine.generate([5, 6, 7, 8] * 16, max_tokens=3, ignore_eos=True)
        assert again.token_ids == result.token_ids
    assert await _settles_at(bare) == bare  # the worker is gone, and its pool with it
