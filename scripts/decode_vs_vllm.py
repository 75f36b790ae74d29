"""Decode speed at a fixed batch, qllm beside vLLM: where the gap between the two servers lies.

For each batch size, that many identical-length requests arrive at once, greedy, ``ignore_eos``,
on a qllm engine (``--policy``, default fcfs) and on ``vllm serve`` (``make peers``), in
``--rounds`` rounds that alternate which goes first; vLLM is let go quiet before each qllm run
(qllm/bench/peer_process.py). Prints one JSON object: per batch size, each system's mean time per
output token (TPOT, the median over rounds), vLLM's speed over qllm's, and qllm's mean op times at
that batch (the kernel's cost model: attention, MoE and head ops by rows), so that the gap can be
split by op kind.

    .venv/bin/python scripts/decode_vs_vllm.py --batches 1,4,8,16 --rounds 2 \\
        --json docs/results/decode-vs-vllm-batch.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from qllm.bench.stats import rounded
from qllm.bench.systems import EngineSystem
from qllm.bench.trace import Item
from qllm.bench.vllm import VllmSystem
from qllm.models import load_model


def items(batch: int, prompt: int, tokens: int) -> list[Item]:
    """``batch`` requests arriving together, each with its own prompt of ``prompt`` token ids."""
    return [
        Item(
            arrival_s=0.0,
            cls="be",
            prompt_len=prompt,
            prompt=tuple((7 * i + 3 * j) % 500 + 3 for j in range(prompt)),
            output_len=tokens,
        )
        for i in range(batch)
    ]


async def tpot(system, batch: list[Item], timeout: float) -> float:
    records = await system.run(batch, timeout=timeout)
    values = [r.tpot for r in records if r.tpot is not None]
    if len(values) != len(batch):
        raise RuntimeError(f"{system.name}: {len(batch) - len(values)} requests gave no TPOT")
    return statistics.mean(values)


async def main(args: argparse.Namespace) -> dict:
    model = load_model(args.model)
    qllm = EngineSystem(model, args.policy, max_batch=max(args.batches), prefill_chunk=args.prefill_chunk)
    vllm = await VllmSystem.start(
        model,
        max_batch=max(args.batches),
        prefill_chunk=args.prefill_chunk,
        max_len=args.prompt + args.tokens,
        python=args.vllm_python,
    )
    rows = []
    try:
        warm = items(2, args.prompt, 4)
        await vllm.run(warm, timeout=args.timeout)
        await vllm.quiesce()
        await qllm.run(warm, timeout=args.timeout)
        for size in args.batches:
            batch = items(size, args.prompt, args.tokens)
            times: dict[str, list[float]] = {"qllm": [], "vllm": []}
            for r in range(args.rounds):
                order = [("qllm", qllm), ("vllm", vllm)] if r % 2 == 0 else [("vllm", vllm), ("qllm", qllm)]
                for name, system in order:
                    if system is qllm:
                        await vllm.quiesce()
                    times[name].append(await tpot(system, batch, args.timeout))
            ops = qllm.last_stats["op_costs"] if qllm.last_stats else None  # its last round's
            q, v = statistics.median(times["qllm"]), statistics.median(times["vllm"])
            rows.append(
                {
                    "batch": size,
                    "qllm_tpot_s": q,
                    "vllm_tpot_s": v,
                    "vllm_speed_over_qllm": q / v,
                    "qllm_tpot_rounds_s": times["qllm"],
                    "vllm_tpot_rounds_s": times["vllm"],
                    "qllm_op_costs": ops,
                }
            )
            print(f"batch {size}: qllm {q:.4f} s, vllm {v:.4f} s per token", file=sys.stderr, flush=True)
    finally:
        await vllm.close()
    return rounded(
        {
            "bench": "decode_vs_vllm",
            "model": args.model,
            "policy": args.policy,
            "prompt_tokens": args.prompt,
            "output_tokens": args.tokens,
            "rounds": args.rounds,
            "vllm": vllm.describe(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "batches": rows,
        }
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="small-random", help="preset or model directory (default small-random)"
    )
    parser.add_argument("--policy", default="fcfs", help="qllm policy (default fcfs)")
    parser.add_argument(
        "--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16], help="batch sizes"
    )
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens per request (default 8)")
    parser.add_argument("--tokens", type=int, default=40, help="output tokens per request (default 40)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per batch size, alternating order")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="prefill chunk tokens (default 128)")
    parser.add_argument(
        "--vllm-python", default=None, help="the vLLM venv's interpreter (default .venv-peers)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before giving up")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    result = asyncio.run(main(arguments))
    text = json.dumps(result, indent=1)
    if arguments.json:
        with open(arguments.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
