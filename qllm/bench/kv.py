"""The kernel benchmark's ``kv`` part (qllm/bench/kernel.py): the KV layouts side by side, in
rounds that alternate which goes first (:func:`alternate`, also used by its ``placement`` part)."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable
from typing import Any


async def alternate(
    rounds: int, sides: tuple[str, str], measure: Callable[[str], Awaitable[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """``measure`` each side ``rounds`` times, the order reversed every round so that drift of the
    machine hits both alike: each side's results in order."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for i in range(rounds):
        for side in sides[:: 1 if i % 2 == 0 else -1]:
            runs[side].append(await measure(side))
    return runs


async def kv_layouts(model: Any, prompts: list[list[int]], args) -> dict[str, Any]:
    """The kv part: buffers against blocks, ``--rounds`` alternating rounds."""
    runs = await alternate(
        args.rounds, ("buffers", "blocks"), lambda layout: _kv_run(model, prompts, args, layout)
    )
    out: dict[str, Any] = {
        layout: {
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
            "peak_kv_bytes": max(r["peak_kv_bytes"] for r in rs),
        }
        for layout, rs in runs.items()
    }
    ratios = [
        b["decode_tokens_per_s"] / a["decode_tokens_per_s"] for a, b in zip(runs["buffers"], runs["blocks"])
    ]
    out["blocks"]["kv_blocks"] = runs["blocks"][-1]["kv_blocks"]
    return out | {
        "batch": len(prompts),
        "tokens_per_request": args.batch_tokens,
        "block_size": args.kv_block_size,
        "rounds": args.rounds,
        "decode_ratio": statistics.median(ratios),
        "decode_ratio_min_max": [min(ratios), max(ratios)],
        "peak_kv_ratio": out["blocks"]["peak_kv_bytes"] / max(out["buffers"]["peak_kv_bytes"], 1),
        "tokens_equal": all(
            r["token_ids"] == runs["buffers"][0]["token_ids"] for rs in runs.values() for r in rs
        ),
        "note": "ratios are blocks over buffers; peak_kv_bytes: most KV memory held at once, sampled "
        "every 5 ms (blocks: the pool's spare blocks included)",
    }


async def _kv_run(model: Any, prompts: list[list[int]], args, layout: str) -> dict[str, Any]:
    from qllm.engine import Engine

    block_size = args.kv_block_size if layout == "blocks" else None
    engine = Engine(
        model=model, policy="fcfs", max_batch=len(prompts), prefill_chunk=args.prefill_chunk,
        kv_block_size=block_size,
    )  # fmt: skip
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.kv_bytes())
            await asyncio.sleep(0.005)

    n = args.batch_tokens
    async with engine, asyncio.TaskGroup() as tg:
        tg.create_task(sample())
        handles = [engine.submit(p, max_tokens=n, ignore_eos=True) for p in prompts]
        results = [await h.result() for h in handles]
        done.set()
        kv_blocks = engine.stats()["memory"]["kv_blocks"]
    first = max(r.first_token for r in results)
    last = max(r.finished for r in results)
    return {
        "decode_tokens_per_s": len(prompts) * (n - 1) / max(last - first, 1e-9),
        "peak_kv_bytes": peak,
        "kv_blocks": kv_blocks,
        "token_ids": [r.token_ids for r in results],
    }
