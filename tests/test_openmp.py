"""The engine keeps one OpenMP pool while it computes, and the ``qllm`` command makes idle helpers
sleep unless the environment says otherwise (qllm/kernel/openmp.py).

GNU OpenMP gives each thread that runs a parallel op a pool of helper threads; with two pools in
the process the helpers stop spinning between parallel regions and every op of the compute worker
waits for them to wake. These tests count the process's threads at two torch threads (Linux and
libgomp; skipped elsewhere).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import torch

from qllm.engine import Engine
from qllm.kernel.openmp import configure_openmp, drop_pool

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


def test_configure_openmp_sets_passive_unless_the_environment_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert configure_openmp() is False  # torch is in: libgomp has read its settings already
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def _gomp_settings(argv: list[str]) -> dict[str, str]:
    """The settings libgomp starts with in a fresh ``python argv`` (``OMP_DISPLAY_ENV=VERBOSE``)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    environ["OMP_DISPLAY_ENV"] = "VERBOSE"
    proc = subprocess.run([sys.executable, *argv], env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pairs = (line.strip().split(" = ", 1) for line in proc.stderr.splitlines() if " = '" in line)
    return {k: v.strip("'") for k, v in pairs}


def test_qllm_command_makes_helpers_sleep_and_import_qllm_changes_nothing():
    # The qllm command: passive before torch loads libgomp, so helpers never spin.
    command = _gomp_settings(["-m", "qllm", "policies", "--json"])
    assert (command["OMP_WAIT_POLICY"], command["GOMP_SPINCOUNT"]) == ("PASSIVE", "0")
    # import qllm (before torch) leaves libgomp at its own default, which spins a while.
    library = _gomp_settings(["-c", "import qllm, torch; torch.ones(1)"])
    assert library["GOMP_SPINCOUNT"] != "0"
