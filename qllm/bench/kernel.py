"""Kernel benchmark: LS latency under BE load per policy, batch decode, time outside ops, placement.

Prints one JSON object with four parts, all measured side by side in one run:

- ``policies``: for each policy, ``--be`` best-effort requests are put in flight and ``--ls``
  latency-sensitive requests arrive among them, ``--ls-interval`` seconds apart. Reported: LS TTFT
  p50/p99, LS preemption latency (arrival to its first op) p50/p99, LS TTFT under load divided by
  the isolated LS TTFT (the same LS request alone on the idle engine), BE tokens/s and its ratio
  to ``fcfs``, and the op durations seen (the one-expert-op yardstick of the preemption latency).
- ``batch32``: decode tokens/s of 32 requests batched by the engine versus transformers
  ``model.generate`` with a static batch of 32 (same prompts, greedy, fixed length), after a
  warm-up of both, in ``--rounds`` rounds that alternate which side goes first; ``ratio`` is the
  median of the rounds' ratios (``ratio_min_max`` their range). Beside it ``single``: the same
  comparison for one request (a batch of 1, the first prompt), over ``--single-rounds`` rounds.
- ``overhead``: ``--overhead-requests`` BE requests on an idle engine under ``fcfs`` and under the
  default policy (compute mode the engine's default): the time the kernel spends between one
  batched op and the next while busy (median/p99 in us and the number of gaps, from the kernel's
  ``overhead`` stats; None where the kernel does not report them), wall time, tokens/s and the
  share of the wall time spent inside ops.
- ``placement``: compute in a worker thread versus inline on the event loop: BE throughput and
  the event loop's lag (how late a 1 ms timer fires) while computing; medians over ``--rounds``
  alternating runs.
- ``kv``: the KV layouts side by side: ``--batch`` requests decoded by an engine whose caches are
  growable buffers and by one whose caches are blocks of ``--kv-block-size`` tokens from a pool
  (qllm/kernel/runtime/cache.py), in ``--rounds`` alternating rounds: decode tokens/s and its ratio (blocks over
  buffers, the median of the rounds' ratios), the most KV memory held at once (sampled every
  5 ms; with blocks, the pool's spare blocks included) and whether the tokens are equal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from typing import Any

from qllm.bench.kv import alternate, kv_layouts
from qllm.bench.stats import percentile as _pct
from qllm.bench.stats import rounded as _round

POLICIES = ("fcfs", "qllm", "priority-aging", "cohort")
PARTS = ("policies", "batch32", "overhead", "placement", "kv")
"""The parts of the benchmark, in the order they run (``--skip`` names them)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="small-random", help="preset name or model directory (default small-random)"
    )
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies to compare")
    parser.add_argument("--be", type=int, default=16, help="best-effort requests in flight (default 16)")
    parser.add_argument("--be-prompt", type=int, default=32, help="BE prompt tokens (default 32)")
    parser.add_argument("--be-tokens", type=int, default=32, help="BE output tokens (default 32)")
    parser.add_argument("--ls", type=int, default=8, help="latency-sensitive requests (default 8)")
    parser.add_argument("--ls-prompt", type=int, default=16, help="LS prompt tokens (default 16)")
    parser.add_argument("--ls-tokens", type=int, default=4, help="LS output tokens (default 4)")
    parser.add_argument(
        "--ls-interval", type=float, default=0.5, help="seconds between LS arrivals (default 0.5)"
    )
    parser.add_argument(
        "--ls-start", type=float, default=0.5, help="first LS arrival after the BE load starts (s)"
    )
    parser.add_argument(
        "--batch", type=int, default=32, help="static batch size for the decode comparison (default 32)"
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=16, help="tokens per request in the batch comparison"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of the batch and placement comparisons (default 2)"
    )
    parser.add_argument(
        "--single-rounds",
        type=int,
        default=6,
        help="rounds of the single-request decode comparison (default 6; a round takes seconds)",
    )
    parser.add_argument("--prefill-chunk", type=int, default=128, help="engine prefill chunk (default 128)")
    parser.add_argument(
        "--overhead-requests", type=int, default=32, help="BE requests of the overhead part (default 32)"
    )
    parser.add_argument(
        "--skip",
        default="",
        help=f"comma-separated parts to skip: {','.join(PARTS)} (single runs with batch32)",
    )
    parser.add_argument(
        "--kv-block-size", type=int, default=16, help="block size of the kv part, tokens (default 16)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")


def run(args: argparse.Namespace) -> int:
    unknown = set(filter(None, args.skip.split(","))) - set(PARTS)
    if unknown:
        raise ValueError(f"--skip: unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    if args.overhead_requests < 1:
        raise ValueError("--overhead-requests must be at least 1")
    if args.rounds < 1 or args.single_rounds < 1:
        raise ValueError("--rounds and --single-rounds must be at least 1")
    if args.kv_block_size < 1:
        raise ValueError("--kv-block-size must be at least 1")
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    import uvloop

    print(json.dumps(uvloop.run(_main(args))))
    return 0


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from qllm.models import load_model

    model = load_model(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = min(model.vocab_size, len(model.tokenizer) if model.tokenizer is not None else model.vocab_size)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    be_prompts = [prompt(args.be_prompt) for _ in range(args.be)]
    ls_prompts = [prompt(args.ls_prompt) for _ in range(args.ls)]
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, Any] = {
        "bench": "kernel",
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "workload": {
            "be": args.be, "be_prompt": args.be_prompt, "be_tokens": args.be_tokens,
            "ls": args.ls, "ls_prompt": args.ls_prompt, "ls_tokens": args.ls_tokens,
            "ls_interval_s": args.ls_interval, "overhead_requests": args.overhead_requests,
        },
    }  # fmt: skip
    if "policies" not in skip:
        policies = [p for p in args.policies.split(",") if p]
        out["policies"] = {p: await _mixed(model, p, be_prompts, ls_prompts, args) for p in policies}
        base = out["policies"].get("fcfs")
        for result in out["policies"].values():
            if base and base["be_tokens_per_s"]:
                result["be_tokens_per_s_vs_fcfs"] = result["be_tokens_per_s"] / base["be_tokens_per_s"]
    if "batch32" not in skip:
        prompts = [prompt(args.be_prompt) for _ in range(args.batch)]
        out["batch32"] = await _batch_decode(model, prompts, args, args.rounds)
        out["single"] = await _batch_decode(model, prompts[:1], args, args.single_rounds)
    if "overhead" not in skip:
        out["overhead"] = await _overheads(
            model, [prompt(args.be_prompt) for _ in range(args.overhead_requests)], args
        )
    if "placement" not in skip:
        rounds = await alternate(
            args.rounds, ("thread", "loop"), lambda mode: _placement(model, be_prompts, args, mode)
        )
        out["placement"] = {
            mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"rounds": len(runs)}
            for mode, runs in rounds.items()
        }
    if "kv" not in skip:
        out["kv"] = await kv_layouts(model, [prompt(args.be_prompt) for _ in range(args.batch)], args)
    return _round(out)


async def _mixed(model: Any, policy: str, be_prompts, ls_prompts, args) -> dict[str, Any]:
    from qllm.engine import Engine

    async with Engine(model=model, policy=policy, prefill_chunk=args.prefill_chunk) as engine:
        isolated = []
        for p in ls_prompts[:3]:
            r = await engine.generate(p, max_tokens=args.ls_tokens, ignore_eos=True, priority="ls")
            isolated.append(r.ttft)
        isolated_ttft = statistics.median(isolated)
        engine.reset_stats()  # count the loaded phase only
        start = time.monotonic()
        be = [engine.submit(p, max_tokens=args.be_tokens, ignore_eos=True, priority="be") for p in be_prompts]
        ls_results = []
        await asyncio.sleep(args.ls_start)
        for p in ls_prompts:
            handle = engine.submit(p, max_tokens=args.ls_tokens, ignore_eos=True, priority="ls")
            ls_results.append(await handle.result())
            await asyncio.sleep(args.ls_interval)
        be_results = [await h.result() for h in be]
        op_times = engine.stats()["kernel"]["op_times"]
    ttft = [r.ttft for r in ls_results]
    latency = [r.first_scheduled - r.arrival for r in ls_results]
    be_end = max(r.finished for r in be_results)
    be_tokens = sum(len(r.token_ids) for r in be_results)
    expert = op_times.get("expert", {})
    return {
        "ls_ttft_p50_s": _pct(ttft, 0.5),
        "ls_ttft_p99_s": _pct(ttft, 0.99),
        "ls_isolated_ttft_s": isolated_ttft,
        "ls_ttft_over_isolated_p50": _pct(ttft, 0.5) / isolated_ttft,
        "ls_ttft_over_isolated_p99": _pct(ttft, 0.99) / isolated_ttft,
        "preemption_latency_p50_s": _pct(latency, 0.5),
        "preemption_latency_p99_s": _pct(latency, 0.99),
        "expert_op_mean_s": expert.get("mean_s"),
        "expert_op_max_s": expert.get("max_s"),
        "op_max_s": max((v["max_s"] for v in op_times.values()), default=None),
        "preemption_latency_p99_over_expert_op_plus_1ms": (
            _pct(latency, 0.99) / (expert["mean_s"] + 0.001) if expert else None
        ),
        "be_tokens_per_s": be_tokens / (be_end - start),
        "be_turnaround_mean_s": statistics.mean(r.turnaround for r in be_results),
        "be_preemptions": sum(r.preemptions for r in be_results),
        "ls_all_completed": all(r.status == "length" for r in ls_results),
        "be_all_completed": all(r.status == "length" for r in be_results),
    }


async def _batch_decode(model: Any, prompts: list[list[int]], args, rounds: int) -> dict[str, Any]:
    """Decode tokens/s of the engine and of ``model.generate`` on ``prompts``, ``rounds`` rounds
    after an unmeasured warm-up of both, alternating which goes first; the ratio is the median of
    the rounds' ratios (each round's two runs are seconds apart, so drift of the machine cancels)."""
    import torch

    from qllm.engine import Engine

    n = args.batch_tokens
    ids = torch.tensor(prompts)

    def hf_generate(tokens: int) -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return time.perf_counter() - t, out[:, ids.shape[1] :]

    def hf_rate() -> tuple[float, torch.Tensor]:
        t1, _ = hf_generate(1)
        tn, out = hf_generate(n)
        return len(prompts) * (n - 1) / max(tn - t1, 1e-9), out

    async def engine_rate() -> tuple[float, list[list[int]]]:
        handles = [engine.submit(p, max_tokens=n, ignore_eos=True) for p in prompts]
        results = [await h.result() for h in handles]
        first = max(r.first_token for r in results)
        last = max(r.finished for r in results)
        return len(prompts) * (n - 1) / (last - first), [r.token_ids for r in results]

    engine_rates, hf_rates, same = [], [], True
    async with Engine(
        model=model, policy="fcfs", max_batch=len(prompts), prefill_chunk=args.prefill_chunk
    ) as engine:
        await asyncio.gather(*(engine.generate(p, max_tokens=2, ignore_eos=True) for p in prompts))
        hf_generate(2)
        for i in range(rounds):
            if i % 2:
                h, out = hf_rate()
                e, tokens = await engine_rate()
            else:
                e, tokens = await engine_rate()
                h, out = hf_rate()
            engine_rates.append(e)
            hf_rates.append(h)
            same = same and out.tolist() == tokens
    ratios = [e / h for e, h in zip(engine_rates, hf_rates)]
    return {
        "batch": len(prompts),
        "tokens_per_request": n,
        "rounds": rounds,
        "engine_decode_tokens_per_s": statistics.median(engine_rates),
        "transformers_decode_tokens_per_s": statistics.median(hf_rates),
        "ratio": statistics.median(ratios),
        "ratio_min_max": [min(ratios), max(ratios)],
        "tokens_equal": same,
        "note": "transformers decode time = generate(n) - generate(1); engine = first to last token; "
        "ratio = median over rounds of engine / transformers",
    }


async def _overheads(model: Any, prompts: list[list[int]], args) -> dict[str, Any]:
    """The overhead part: ``fcfs`` and the default policy, each on a fresh engine."""
    from qllm.engine import Engine
    from qllm.policies import DEFAULT_POLICY

    # First use of each shape on this model, on an engine of its own: the measured engines' stats
    # then hold the measured requests only.
    async with Engine(model=model, policy="fcfs", prefill_chunk=args.prefill_chunk) as engine:
        await asyncio.gather(
            *(engine.generate(p, max_tokens=2, ignore_eos=True, priority="be") for p in prompts)
        )
    return {
        policy: await _overhead(model, policy, prompts, args) | {"default_policy": policy == DEFAULT_POLICY}
        for policy in dict.fromkeys(("fcfs", DEFAULT_POLICY))
    }


async def _overhead(model: Any, policy: str, prompts: list[list[int]], args) -> dict[str, Any]:
    from qllm.engine import Engine

    engine = Engine(model=model, policy=policy, prefill_chunk=args.prefill_chunk)
    async with engine:
        start = time.perf_counter()
        handles = [
            engine.submit(p, max_tokens=args.be_tokens, ignore_eos=True, priority="be") for p in prompts
        ]
        results = [await h.result() for h in handles]
        wall = time.perf_counter() - start
        kernel = engine.stats()["kernel"]
    gaps = kernel.get("overhead") or {}  # {"count", "median_s", "p99_s"} where the kernel reports it
    in_op = sum(op["count"] * op["mean_s"] for op in kernel["op_times"].values())
    return {
        "compute": kernel["compute"],
        "overhead_median_us": _us(gaps.get("median_s")),
        "overhead_p99_us": _us(gaps.get("p99_s")),
        "overhead_count": gaps.get("count"),
        "wall_s": wall,
        "tokens_per_s": sum(len(r.token_ids) for r in results) / wall,
        "in_op_s": in_op,
        "in_op_over_wall": in_op / wall,
        "all_completed": all(r.status == "length" for r in results),
    }


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


async def _placement(model: Any, prompts, args, mode: str) -> dict[str, Any]:
    from qllm.engine import Engine

    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    engine = Engine(model=model, policy="fcfs", compute=mode, prefill_chunk=args.prefill_chunk)
    async with engine, asyncio.TaskGroup() as tg:
        tg.create_task(ticker())
        start = time.perf_counter()
        handles = [engine.submit(p, max_tokens=args.be_tokens, ignore_eos=True) for p in prompts]
        results = [await h.result() for h in handles]
        elapsed = time.perf_counter() - start
        stop.set()
    return {
        "tokens_per_s": sum(len(r.token_ids) for r in results) / elapsed,
        "loop_lag_p50_s": _pct(lags, 0.5),
        "loop_lag_p99_s": _pct(lags, 0.99),
        "loop_lag_max_s": max(lags) if lags else None,
    }
