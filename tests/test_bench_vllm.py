"""vLLM as a bench peer: the interpreter lookup and its errors, the server process's lifecycle, the
``vllm serve`` settings, and (with the peer venv of ``make peers``) a small replay against it."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from qllm.bench import vllm
from qllm.bench.peer_process import PeerFailed, PeerProcess, PeerUnavailable, group_cpu_s
from qllm.bench.trace import FIRST_ID, Item


def test_vllm_python_pointing_nowhere_says_what_to_do(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(
        PeerUnavailable, match=r"--vllm-python .*no-venv.* not an executable file.*make peers"
    ):
        vllm.vllm_python(str(missing))


def test_environment_variable_names_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv(vllm.VLLM_PYTHON_ENV, str(tmp_path / "python"))
    with pytest.raises(PeerUnavailable, match=rf"{vllm.VLLM_PYTHON_ENV} .* not an executable file"):
        vllm.vllm_python()


def test_interpreter_without_vllm_is_refused():
    with pytest.raises(PeerUnavailable, match="cannot import vllm"):
        vllm.vllm_python(sys.executable)  # qllm's own venv has no vllm


async def test_start_with_missing_interpreter_fails_before_any_work(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(PeerUnavailable, match="--vllm-python"):
        await vllm.connect(tiny, max_batch=4, prefill_chunk=16, max_len=64, python=str(tmp_path / "python"))
    assert list(tmp_path.iterdir()) == []  # no model saved, no server started


def test_serve_args_match_the_bench(tiny):
    args = vllm.serve_args(tiny, max_batch=16, prefill_chunk=128, max_len=112, eager=True)
    flags = dict(zip(args, [*args[1:], None]))
    assert flags["--scheduling-policy"] == "priority"
    assert flags["--max-num-seqs"] == "16"
    assert flags["--max-num-batched-tokens"] == "144"
    assert flags["--max-model-len"] == "112"
    assert flags["--dtype"] == "float32"
    assert "--no-enable-prefix-caching" in args
    assert "--enforce-eager" in args
    assert "--enforce-eager" not in vllm.serve_args(
        tiny, max_batch=16, prefill_chunk=128, max_len=112, eager=False
    )
    with pytest.raises(ValueError, match="max_batch"):
        vllm.serve_args(tiny, max_batch=0, prefill_chunk=128, max_len=112, eager=False)


def test_kv_cache_holds_a_full_batch_of_the_longest_requests(tiny):
    config = tiny.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    for max_batch, max_len in [(1, 1), (16, 112), (32, 4096)]:
        size = vllm.kv_cache_bytes(tiny, max_batch=max_batch, max_len=max_len)
        assert size >= max_batch * max_len * per_token * vllm.KV_SPARE
        assert size % per_token == 0


def test_server_env_isolates_the_peer_venv_and_binds_every_cpu(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/qllm")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    env = vllm.server_env()
    assert "PYTHONPATH" not in env
    assert env["HF_HUB_OFFLINE"] == "1"
    assert sorted(map(int, env["VLLM_CPU_OMP_THREADS_BIND"].split(","))) == sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert vllm.server_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # the user's choice stands


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init
    except FileNotFoundError:
        return True


IGNORES_SIGTERM = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


async def test_stop_kills_a_server_and_its_children_that_ignore_sigterm(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    process = PeerProcess.start(
        [sys.executable, "-c", IGNORES_SIGTERM], log=tmp_path / "log", workdir=work, grace=0.5
    )
    while not (tmp_path / "log").read_text().strip():
        await asyncio.sleep(0.05)
    child = int((tmp_path / "log").read_text())
    started = time.monotonic()
    await process.stop()
    assert time.monotonic() - started < 10
    assert not process.running
    assert _pid_gone(process.popen.pid) and _pid_gone(child)
    assert not work.exists()
    await process.stop()  # a second stop does nothing


def test_a_server_left_unstopped_is_stopped_when_dropped(tmp_path):
    """The bench may fail before it closes its systems: the server must not outlive them."""
    process = PeerProcess.start([sys.executable, "-c", "import time; time.sleep(600)"], log=tmp_path / "log")
    pid = process.popen.pid
    del process
    gc.collect()
    assert _pid_gone(pid)


SPINS = """
import pathlib, sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
pathlib.Path(sys.argv[2]).write_text("done")
time.sleep(600)
"""


async def test_quiesce_waits_until_the_servers_workers_stop_spinning(tmp_path):
    done = tmp_path / "done"
    # The spinning process is a child of the leader, as vLLM's engine workers are.
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SPINS!r}, '1.5', {str(done)!r}]); time.sleep(600)"
    process = PeerProcess.start([sys.executable, "-c", leader], log=tmp_path / "log")
    try:
        await asyncio.sleep(0.5)  # the child is spinning by now
        waited = await process.quiesce(limit=60)
        assert done.exists()  # it returned only once the spinning stopped
        assert waited < 60
        assert await process.quiesce(limit=60) < 60  # quiet now: returns at once, within the window
    finally:
        await process.stop()


async def test_quiesce_gives_up_after_its_limit(tmp_path):
    process = PeerProcess.start(
        [sys.executable, "-c", SPINS, "600", str(tmp_path / "never")], log=tmp_path / "log"
    )
    try:
        await asyncio.sleep(0.3)
        assert await process.quiesce(limit=1.0) >= 1.0
        assert not (tmp_path / "never").exists()
    finally:
        await process.stop()


def test_group_cpu_time_of_an_idle_server_and_of_a_busy_group(tmp_path):
    process = PeerProcess.start([sys.executable, "-c", "import time; time.sleep(600)"], log=tmp_path / "log")
    try:
        assert group_cpu_s(process.popen.pid) < 5.0  # a sleeping interpreter, started just now
        assert group_cpu_s(os.getpgrp()) > 0  # this test process's own group has used CPU
    finally:
        process.popen.kill()
        process.popen.wait()


async def test_a_server_that_exits_before_it_is_ready_fails_with_its_log(tmp_path):
    process = PeerProcess.start(
        [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"], log=tmp_path / "log"
    )
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9") as client:
        with pytest.raises(PeerFailed, match=r"(?s)status 3 before it was ready.*no model here"):
            await process.wait_ready(client, "/health", timeout=60)
    await process.stop()


# ---------------------------------------------------------------- against vLLM itself


@pytest.fixture(scope="module")
def peer_python() -> Path:
    try:
        return vllm.vllm_python()
    except PeerUnavailable as exc:
        pytest.skip(f"no vLLM peer interpreter: {exc}")


def _small_mixtral():
    """A Mixtral with 32-wide heads (vLLM's CPU attention has no 16-wide kernel, the tiny preset's)."""
    import torch

    from qllm.models import load_model
    from qllm.models.presets import random_mixtral, tiny_tokenizer

    tok = tiny_tokenizer()
    pair = random_mixtral(
        torch.float32,
        seed=0,
        tokenizer=tok,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    return load_model(pair)


@pytest.mark.slow
async def test_replay_against_vllm(peer_python):
    model = _small_mixtral()
    system = await vllm.connect(
        model, max_batch=4, prefill_chunk=32, max_len=64, python=str(peer_python), eager=True
    )
    try:
        assert system.describe()["kind"] == "peer"
        items = [
            Item(0.0, "be", 12, 6, tuple(range(FIRST_ID, FIRST_ID + 12))),
            Item(0.05, "ls", 8, 4, tuple(range(FIRST_ID + 20, FIRST_ID + 28))),
            Item(0.1, "be", 20, 5, tuple(range(FIRST_ID + 40, FIRST_ID + 60))),
        ]
        records = await system.run(items, slo_s=1.0, timeout=300)
        too_long = Item(0.0, "ls", 80, 4, tuple(FIRST_ID + i % 200 for i in range(80)))  # > max_len
        with pytest.raises(PeerFailed, match=r"vllm refused a request \(400\)"):
            await system.run([too_long], timeout=60)
    finally:
        await system.close()
    assert not system.process.running
    assert not system.process.workdir.exists()
    for item, record in zip(items, records, strict=True):
        assert record.cls == item.cls
        assert record.prompt_tokens == item.prompt_len
        assert record.output_tokens == item.output_len
        assert record.arrival >= item.arrival_s - 1e-3
        assert record.first_token is not None and record.first_token > record.arrival
        assert record.finished is not None and record.finished >= record.first_token
        assert record.inter_token_s is not None and record.inter_token_s > 0
