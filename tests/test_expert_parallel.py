"""Expert parallel through the engine and the server: two ranks give the tokens of one process,
a worker that dies or hangs ends its requests with an error within the timeout and makes the
server unhealthy, SIGTERM stops the workers, and torchrun's env:// launch serves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kernel_helpers import mixed_load
from serving import serve_process
from tiny_families import torch_threads

import qllm
from qllm import protocol as p
from qllm.errors import ExpertParallelError
from qllm.parallel.placement import Placement
from qllm.parallel.ranks import check_reports
from qllm.paths import free_port
from qllm.policies import DEFAULT_POLICY, load_policy

LS_PROMPT = [5, 17, 42, 7]
BE_PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9]]


def test_placement_deals_every_expert_to_one_rank():
    for kind in ("contiguous", "round-robin"):
        for ranks in (1, 2, 3):
            placement = Placement(ranks, kind)
            held = [placement.held_by(r, 8) for r in range(ranks)]
            assert sorted(e for h in held for e in h) == list(range(8))
            assert max(map(len, held)) - min(map(len, held)) <= 2
    assert Placement(2).held_by(0, 8) == [0, 1, 2, 3]
    assert Placement(2, "round-robin").held_by(1, 8) == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="placement"):
        Placement(2, "random")  # type: ignore[arg-type]


def test_ranks_that_disagree_on_padding_are_refused_in_exact_mode():
    reports = [{"rank": 0, "padding": {"EXPERT": [4, 0]}}, {"rank": 1, "padding": {"EXPERT": [16, 0]}}]
    with pytest.raises(ExpertParallelError, match="disagree on batch-invariance padding"):
        check_reports(reports, batch_invariant=True)
    check_reports(reports, batch_invariant=False)
    check_reports([reports[0], {**reports[1], "padding": {"EXPERT": [4, 0]}}], batch_invariant=True)
    with pytest.raises(ExpertParallelError, match="rank 1 failed to start: OSError"):
        check_reports([reports[0], {"rank": 1, "error": "OSError: no such model"}], batch_invariant=True)


def test_a_loaded_model_cannot_be_split():
    from qllm.models import load_model

    with pytest.raises(ValueError, match="preset name or a model directory"):
        qllm.Engine(model=load_model("tiny"), expert_parallel=2)


async def mixed(model: str, ranks: int, **settings):
    """Two long BE requests and LS requests arriving at fixed decisions, under the default policy
    with a memory budget that forces offloads."""
    return await mixed_load(
        model,
        load_policy(DEFAULT_POLICY),
        BE_PROMPTS,
        LS_PROMPT,
        arrivals=(30, 120, 250),
        threads=1,
        expert_parallel=ranks,
        memory_budget=16 * 1024,
        **settings,
    )


@pytest.mark.parametrize(
    ("model", "placement", "moe"),
    [
        ("tiny", "contiguous", "layer"),
        ("small-random", "round-robin", "layer"),
        ("tiny", "round-robin", "expert"),
    ],
)
async def test_two_ranks_give_the_tokens_of_one_process(model, placement, moe):
    with torch_threads(1):
        one, one_stats = await mixed(model, 1, moe_granularity=moe)
        two, stats = await mixed(model, 2, expert_placement=placement, moe_granularity=moe)
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    assert len(two) == 5 and all(r.status == "length" for r in two)
    assert sum(r.preemptions for r in two) > 0  # LS preempted BE mid-layer
    assert stats["memory"]["offloads"] > 0  # and the budget moved suspended requests' state
    ep = stats["expert_parallel"]
    assert ep["ranks"] == 2 and ep["healthy"] and ep["remote_calls"] > 0
    assert ep["bytes_exchanged"] > 0 and ep["bytes_per_token"] > 0
    first, second = ep["expert_bytes"]
    assert first == second > 0  # each rank holds half of the routed experts' weights
    assert one_stats["expert_parallel"] == {"ranks": 1}


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL expert parallel needs two CUDA devices (one per rank); scripts/gpu-check.sh runs it",
)
async def test_two_ranks_on_nccl_give_the_tokens_of_one_process():
    one, _ = await mixed("small-random", 1, device="cuda")
    two, stats = await mixed("small-random", 2, device="cuda")
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    assert stats["expert_parallel"]["remote_calls"] > 0


# Families with a shared expert, biases in the fused expert weights, routing weights on the expert
# input, experts fused in 2-D weights (kept whole on every rank), latent attention, linear attention.
SPLIT_FAMILIES = ["qwen2_moe", "gpt_oss", "llama4_text", "dbrx", "deepseek_v3", "qwen3_next"]


@pytest.mark.parametrize("name", SPLIT_FAMILIES)
async def test_a_saved_checkpoint_of_each_family_splits_without_changing_its_tokens(name, tmp_path):
    import dataclasses

    from tiny_families import CASES_BY_NAME

    from qllm.models.presets import tiny_tokenizer

    case = CASES_BY_NAME[name]
    tokenizer = tiny_tokenizer()
    hf = dataclasses.replace(case, config={**case.config, "vocab_size": len(tokenizer)}).build()
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [[5, 9, 14, 3], [7, 7, 2]]

    async def tokens(ranks: int) -> tuple[list[list[int]], dict]:
        async with qllm.Engine(model=str(tmp_path), threads=1, expert_parallel=ranks) as engine:
            handles = [engine.submit(p, max_tokens=6, ignore_eos=True) for p in prompts]
            return [(await h.result()).token_ids for h in handles], engine.stats()["expert_parallel"]

    with torch_threads(1):
        one, _ = await tokens(1)
        two, stats = await tokens(2)
    assert two == one
    assert stats["remote_calls"] > 0


def worker_pid(engine: qllm.Engine) -> int:
    return engine.experts.processes.processes[0].pid


@pytest.mark.parametrize("fault", ["killed", "hung"])
async def test_a_failed_worker_ends_its_requests_within_the_timeout(fault):
    timeout = 3.0
    with torch_threads(1):
        async with qllm.Engine(model="tiny", threads=1, expert_parallel=2, expert_timeout=timeout) as engine:
            assert engine.healthy
            handle = engine.submit(BE_PROMPTS[0], max_tokens=400, ignore_eos=True)
            while engine.progress < 50:
                await asyncio.sleep(0.01)
            pid = worker_pid(engine)
            os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
            start = time.monotonic()
            try:
                result = await asyncio.wait_for(handle.result(), timeout + 10)
                took = time.monotonic() - start
                assert result.status == "error"
                assert "ExpertParallelError" in result.error and "rank 1" in result.error
                if fault == "hung":
                    assert took >= timeout * 0.5  # it waited for the worker, then gave up
                assert not engine.healthy
                assert engine.stats()["expert_parallel"]["healthy"] is False
                later = await asyncio.wait_for(engine.submit("hi", max_tokens=3).result(), 10)
                assert later.status == "error" and "rank 1" in later.error
            finally:
                if fault == "hung":
                    os.kill(pid, signal.SIGKILL)


def health(proc) -> p.HealthReply:
    with proc.connect() as sock:
        sock.sendall(p.encode_frame(p.Health(id=1)))
        from serving import recv_frame

        reply = recv_frame(sock)
    assert isinstance(reply, p.HealthReply)
    return reply


def test_the_server_reports_a_dead_worker_and_stops_on_sigterm(tmp_path):
    with serve_process(tmp_path, "", "--expert-parallel", "2", "--expert-timeout", "3") as proc:
        assert health(proc).status == "ok"
        (ready,) = [e for e in proc.events() if e.get("event") == "expert_parallel_ready"]
        workers = ready["pids"][1:]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while health(proc).status != "unhealthy":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0


def test_sigterm_stops_the_workers(tmp_path):
    with serve_process(tmp_path, "", "--expert-parallel", "2") as proc:
        (ready,) = [e for e in proc.events() if e.get("event") == "expert_parallel_ready"]
        workers = ready["pids"][1:]
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0
    assert workers and not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_torchrun_launch_serves_the_tokens_of_one_process(tmp_path):
    path = tmp_path / "qllm.sock"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "qllm", "serve", "--model", "tiny", "--expert-parallel", "2", "--threads", "1",
        "--socket", str(path), "--log-format", "json",
    ]  # fmt: skip
    with open(tmp_path / "stderr", "wb") as stderr:
        proc = subprocess.Popen(argv, stderr=stderr, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "server_ready" not in (tmp_path / "stderr").read_text():  # the socket opens before the load
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        from qllm.client import Client

        with Client(str(path)) as client:
            served = client.generate("the rank zero", max_tokens=8, ignore_eos=True)
        with torch_threads(1):
            alone = qllm.Engine(model="tiny", threads=1)
            expected = asyncio.run(_generate(alone, "the rank zero"))
        assert served.token_ids == expected
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    events = (tmp_path / "stderr").read_text()
    assert "expert_parallel_ready" in events and "server_stopped" in events


async def _generate(engine: qllm.Engine, prompt: str) -> list[int]:
    async with engine:
        return (await engine.generate(prompt, max_tokens=8, ignore_eos=True)).token_ids


def test_bench_runs_each_policy_split_beside_one_process(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "qllm", "bench", "--model", "tiny", "--systems", "cohort", "--expert-parallel",
           "2", "--rates", "20", "--requests", "4", "--isolated", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(out.read_text())
    assert [s["name"] for s in result["systems"]] == ["cohort", "cohort@ep2"]
    split = result["headline"]["expert_parallel"]["cohort@ep2"]
    first, second = split["expert_bytes_by_rank"]
    assert first == second > 0
    assert split["throughput_vs_one_process"] > 0 and split["bytes_per_token"] > 0
    assert set(split["ls_ttft_p99_over_isolated_by_rate"]) == {"1", "2"}
    # Both systems completed every request, each with all its output tokens.
    tokens = {c["system"]: [r[6] for r in c["records"]] for c in result["cells"]}
    assert tokens["cohort"] == tokens["cohort@ep2"] and len(tokens["cohort"]) == 4 and all(tokens["cohort"])
