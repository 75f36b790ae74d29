"""Tenants sharing one engine: weighted shares, Jain's index, and light tenants beside a flood.

Prints one JSON object with two parts, measured in one process on one engine (``cohort`` unless
``--policy``):

- ``shares``: tenants of the weights ``--weights`` (default ``1,1,2``) each keep ``--backlog``
  best-effort requests in flight (a finished one is replaced at once) for ``--warmup`` seconds,
  then for ``--window`` seconds, during which the op time each tenant received is read from the
  engine's ledger (``stats()["tenants"][...]["service_s"]``: the kernel's measured op cost).
  Reported per tenant: its weight's share, the share of op time it received and the relative
  error; Jain's index over the service divided by weight (1: exactly the weighted share); and the
  tokens generated per second in all (what the share costs: compare ``--policy qllm``).
- ``flood``: a tenant submits ``--flood`` long best-effort requests at once; while they run, a
  light tenant sends ``--light`` short best-effort requests and another ``--light`` LS requests,
  one at a time, each ``--light-interval`` seconds apart. Each light request's turnaround (BE) or
  TTFT (LS) is divided by the same request's on the idle engine, measured before the flood;
  reported: the median and the worst of those ratios, and whether every light request's tokens
  equal its solo run's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from qllm.bench.stats import rounded

PARTS = ("shares", "flood")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="small-random", help="preset name or model directory (default small-random)"
    )
    parser.add_argument("--policy", default="cohort", help="scheduling policy (default cohort)")
    parser.add_argument(
        "--weights", default="1,1,2", help="weights of the backlogged tenants (default 1,1,2)"
    )
    parser.add_argument(
        "--backlog", type=int, default=4, help="requests each backlogged tenant keeps in flight (default 4)"
    )
    parser.add_argument(
        "--backlog-tokens",
        type=int,
        default=1024,
        help="tokens of a backlogged request (default 1024; a finished one is replaced)",
    )
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens of every request (default 32)")
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds before the shares window (default 10)"
    )
    parser.add_argument(
        "--window", type=float, default=60.0, help="seconds the shares are measured over (default 60)"
    )
    parser.add_argument(
        "--flood", type=int, default=64, help="long BE requests of the flooding tenant (default 64)"
    )
    parser.add_argument(
        "--flood-tokens", type=int, default=256, help="tokens of each flood request (default 256)"
    )
    parser.add_argument("--light", type=int, default=3, help="light requests of each kind (default 3)")
    parser.add_argument(
        "--light-tokens", type=int, default=8, help="tokens of a light BE request (default 8)"
    )
    parser.add_argument(
        "--light-interval", type=float, default=1.0, help="seconds between light requests (default 1)"
    )
    parser.add_argument("--max-batch", type=int, default=32, help="the engine's max_batch (default 32)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON to PATH")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")


def parse_weights(text: str) -> list[float]:
    """``1,1,2`` -> ``[1.0, 1.0, 2.0]``; ValueError unless two or more positive numbers."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected comma-separated numbers such as 1,1,2") from None
    if len(weights) < 2 or any(not w > 0 for w in weights):
        raise ValueError(f"--weights {text!r}: expected two or more numbers > 0")
    return weights


def run(args: argparse.Namespace) -> int:
    weights = parse_weights(args.weights)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(PARTS):
        raise ValueError(f"--skip: unknown parts {sorted(skip - set(PARTS))}; choose from {','.join(PARTS)}")
    if (
        min(
            args.backlog,
            args.flood,
            args.light,
            args.flood_tokens,
            args.light_tokens,
            args.prompt,
            args.backlog_tokens,
        )
        < 1
    ):
        raise ValueError("--backlog, --flood, --light, --prompt and the token counts must be at least 1")
    if args.window <= 0 or args.warmup < 0:
        raise ValueError("--window must be > 0 and --warmup >= 0")
    import structlog
    import uvloop

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    out = json.dumps(uvloop.run(_main(args, weights, skip)))
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(out + "\n")
    return 0


async def _main(args: argparse.Namespace, weights: list[float], skip: set[str]) -> dict[str, Any]:
    import torch

    from qllm import Engine
    from qllm.models import load_model

    model = load_model(args.model)
    gen = torch.Generator().manual_seed(args.seed)

    def prompt() -> list[int]:
        return torch.randint(3, model.vocab_size, (args.prompt,), generator=gen).tolist()

    names = [f"t{i}" for i in range(len(weights))]
    tenants = {name: {"weight": w} for name, w in zip(names, weights)}
    out: dict[str, Any] = {
        "bench": "tenants",
        "model": args.model,
        "policy": args.policy,
        "max_batch": args.max_batch,
    }
    async with Engine(model=model, policy=args.policy, max_batch=args.max_batch, tenants=tenants) as engine:
        await engine.generate(prompt(), max_tokens=4)  # the cost model learns the op times
        if "shares" not in skip:
            out["shares"] = await shares(
                engine, names, weights, args.backlog, prompt, args.backlog_tokens, args.warmup, args.window
            )
        if "flood" not in skip:
            out["flood"] = await flood(engine, args, prompt)
    return rounded(out, 4)


def service(engine: Any, names: Sequence[str], key: str = "service_s") -> dict[str, float]:
    """Op seconds each tenant has received (``key="tokens"``: tokens generated for it)."""
    accounts = engine.stats()["tenants"]
    return {name: accounts.get(name, {}).get(key, 0.0) for name in names}


async def shares(
    engine: Any,
    names: Sequence[str],
    weights: Sequence[float],
    backlog: int,
    prompt: Any,
    max_tokens: int,
    warmup: float,
    window: float,
) -> dict[str, Any]:
    """Keep ``backlog`` BE requests of each tenant in flight; the op time each received over
    ``window`` seconds after ``warmup``, against its weight (see the module's docstring)."""
    stop = asyncio.Event()

    async def keep_backlogged(name: str) -> None:
        async def one() -> None:
            while not stop.is_set():
                handle = engine.submit(prompt(), tenant=name, max_tokens=max_tokens, ignore_eos=True)
                done = asyncio.ensure_future(handle.result())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait([done, stopped], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                handle.cancel()  # a no-op once it finished
                await done

        await asyncio.gather(*(one() for _ in range(backlog)))

    async with asyncio.TaskGroup() as tg:
        for name in names:
            tg.create_task(keep_backlogged(name))
        await asyncio.sleep(warmup)
        before, tokens = service(engine, names), sum(service(engine, names, "tokens").values())
        started = time.monotonic()
        await asyncio.sleep(window)
        after, tokens = service(engine, names), sum(service(engine, names, "tokens").values()) - tokens
        elapsed = time.monotonic() - started
        stop.set()
    report = share_report(names, weights, {n: after[n] - before[n] for n in names}, elapsed)
    return report | {"tokens_per_s": tokens / elapsed}


def share_report(
    names: Sequence[str], weights: Sequence[float], received: dict[str, float], elapsed: float
) -> dict[str, Any]:
    """Each tenant's share of the op time received against its weight's share, and Jain's index."""
    from qllm.kernel.tenants import jain_index

    total = sum(received.values())
    total_weight = sum(weights)
    per = {}
    for name, weight in zip(names, weights):
        fair = weight / total_weight
        got = received[name] / total if total > 0 else 0.0
        per[name] = {
            "weight": weight,
            "fair_share": fair,
            "share": got,
            "error": got / fair - 1,
            "service_s": received[name],
        }
    return {
        "window_s": elapsed,
        "service_s": total,
        "tenants": per,
        "worst_error": max(abs(t["error"]) for t in per.values()),
        "jain_index": jain_index(received[n] / w for n, w in zip(names, weights)),
    }


async def timed(engine: Any, prompt: list[int], **fields: Any) -> tuple[float, float | None, list[int]]:
    """Turnaround, TTFT and tokens of one request."""
    result = await engine.generate(prompt, **fields)
    return result.turnaround, result.ttft, list(result.token_ids)


async def flood(engine: Any, args: argparse.Namespace, prompt: Any) -> dict[str, Any]:
    """A flooding tenant against light tenants' requests, each against itself on the idle engine."""
    be = [prompt() for _ in range(args.light)]
    ls = [prompt() for _ in range(args.light)]
    be_fields = {"tenant": "light-be", "max_tokens": args.light_tokens, "ignore_eos": True}
    ls_fields = {"tenant": "light-ls", "priority": "ls", "max_tokens": 4, "ignore_eos": True}
    solo_be = [await timed(engine, p, **be_fields) for p in be]
    solo_ls = [await timed(engine, p, **ls_fields) for p in ls]
    handles = [
        engine.submit(prompt(), tenant="flood", max_tokens=args.flood_tokens, ignore_eos=True)
        for _ in range(args.flood)
    ]
    results = [asyncio.ensure_future(h.result()) for h in handles]
    be_ratios, ls_ratios, same = [], [], True
    try:
        for i in range(args.light):
            await asyncio.sleep(args.light_interval)
            turnaround, _, tokens = await timed(engine, be[i], **be_fields)
            be_ratios.append(turnaround / solo_be[i][0])
            same &= tokens == solo_be[i][2]
            _, ttft, tokens = await timed(engine, ls[i], **ls_fields)
            ls_ratios.append(ttft / solo_ls[i][1])
            same &= tokens == solo_ls[i][2]
        unfinished = sum(not r.done() for r in results)
    finally:
        for handle in handles:
            handle.cancel()
        await asyncio.gather(*results)
    return {
        "flood": args.flood,
        "flood_tokens": args.flood_tokens,
        "flood_unfinished": unfinished,
        "light_be_turnaround_vs_solo": {"median": statistics.median(be_ratios), "max": max(be_ratios)},
        "light_ls_ttft_vs_solo": {"median": statistics.median(ls_ratios), "max": max(ls_ratios)},
        "tokens_equal_solo": same,
    }
