"""Prefix caching: shared system prompts and multi-turn chats, with caching on and off side by side.

The workload (seeded): ``--conversations`` chats start as a Poisson process at ``--rate`` per
second. ``--share`` of them begin with one of ``--prompts`` system prompts of ``--prompt-tokens``
tokens, picked by a Zipf law (prompt i with weight 1 / (i + 1) ** ``--zipf``); the rest begin with
their own text. Each of a chat's ``--turns`` turns adds a user message of 8 to ``--user-tokens``
tokens; a later turn resends the chat so far (prompt, reply, new message) ``--think`` seconds
after the previous reply. ``--ls-share`` of the chats are LS, the rest BE; every request is
greedy with ``ignore_eos``.

Both sides run the same engine settings (``--policy``, KV blocks of ``--kv-block-size``), one with
``prefix_cache`` on and one with it off, in ``--rounds`` rounds whose order alternates. Reported
per side (medians over rounds): prefill tokens submitted and computed, TTFT and turnaround per
class, output tokens/s; ``tokens_equal``: every request got the same tokens on both sides; and
the ratios of the headline (on against off). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--model", default="small-random", help="preset name or model directory (default small-random)"
    )
    g.add_argument("--conversations", type=int, default=10, help="chats (default 10)")
    g.add_argument("--turns", type=int, default=2, help="turns per chat (default 2)")
    g.add_argument(
        "--rate",
        type=float,
        default=0.2,
        help="chats starting per second (default 0.2: moderate for small-random on 2 cores)",
    )
    g.add_argument("--prompts", type=int, default=4, help="shared system prompts, K (default 4)")
    g.add_argument(
        "--prompt-tokens", type=int, default=256, help="tokens of each system prompt, L (default 256)"
    )
    g.add_argument(
        "--zipf", type=float, default=1.0, help="popularity exponent of the system prompts (default 1)"
    )
    g.add_argument(
        "--share", type=float, default=0.9, help="share of chats with a system prompt (default 0.9)"
    )
    g.add_argument("--user-tokens", type=int, default=48, help="most tokens of a user message (default 48)")
    g.add_argument("--output-tokens", type=int, default=16, help="tokens of each reply (default 16)")
    g.add_argument(
        "--think", type=float, default=0.5, help="seconds from a reply to the next turn (default 0.5)"
    )
    g.add_argument("--ls-share", type=float, default=0.2, help="share of LS chats (default 0.2)")
    g.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    e = parser.add_argument_group("engine")
    e.add_argument("--policy", default="cohort", help="scheduling policy of both sides (default cohort)")
    e.add_argument("--kv-block-size", type=int, default=16, help="KV block size, tokens (default 16)")
    e.add_argument("--prefill-chunk", type=int, default=128, help="prefill chunk, tokens (default 128)")
    e.add_argument("--max-batch", type=int, default=32, help="most requests in one op (default 32)")
    e.add_argument(
        "--rounds", type=int, default=1, help="rounds of both sides, order alternating (default 1)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the JSON here")


@dataclass(frozen=True)
class Chat:
    """One conversation: when it starts, its class, its system prompt and its user messages."""

    start: float
    cls: str
    system: tuple[int, ...]
    messages: tuple[tuple[int, ...], ...]


def workload(args: argparse.Namespace, vocab: int) -> list[Chat]:
    """The chats of ``args`` over token ids 1..vocab-1 (see the module doc)."""
    rng = random.Random(args.seed)

    def text(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(1, vocab) for _ in range(n))

    systems = [text(args.prompt_tokens) for _ in range(args.prompts)]
    weights = [1 / (i + 1) ** args.zipf for i in range(args.prompts)]
    chats, t = [], 0.0
    for _ in range(args.conversations):
        t += rng.expovariate(args.rate)
        shared = systems and rng.random() < args.share
        system = rng.choices(systems, weights)[0] if shared else text(args.prompt_tokens)
        cls = "ls" if rng.random() < args.ls_share else "be"
        messages = tuple(text(rng.randint(8, max(8, args.user_tokens))) for _ in range(args.turns))
        chats.append(Chat(t, cls, system, messages))
    return chats


async def run_side(model: Any, chats: list[Chat], args: argparse.Namespace, cache: bool) -> dict[str, Any]:
    """Replay ``chats`` on a fresh engine with ``prefix_cache=cache``: its figures and tokens."""
    from qllm.engine import Engine

    engine = Engine(
        model=model,
        policy=args.policy,
        kv_block_size=args.kv_block_size,
        prefill_chunk=args.prefill_chunk,
        max_batch=args.max_batch,
        prefix_cache=cache,
    )

    async def chat(c: Chat, t0: float) -> list[Any]:
        results, prompt, reply = [], (), ()
        ready = t0 + c.start
        for i, message in enumerate(c.messages):
            prompt = (*c.system, *message) if i == 0 else (*prompt, *reply, *message)
            await asyncio.sleep(max(0.0, ready - time.monotonic()))  # its arrival time
            result = await engine.generate(
                list(prompt), max_tokens=args.output_tokens, ignore_eos=True, priority=c.cls
            )
            results.append(result)
            reply = tuple(result.token_ids)
            ready = time.monotonic() + args.think
        return results

    async with engine:
        t0 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(chat(c, t0)) for c in chats]
        stats = engine.stats()
    results = [r for task in tasks for r in task.result()]
    span = max(r.finished for r in results) - min(r.arrival for r in results)
    out: dict[str, Any] = {
        "prefill_tokens_submitted": sum(r.prompt_tokens for r in results),
        "prefill_tokens_computed": sum(r.prompt_tokens - r.cached_tokens for r in results),
        "output_tokens_per_s": sum(len(r.token_ids) for r in results) / span,
        "prefix": stats["prefix"],
    }
    for cls in ("ls", "be"):
        mine = [r for r in results if r.priority == cls]
        ttfts = sorted(r.ttft for r in mine if r.ttft is not None)
        out[cls] = {
            "requests": len(mine),
            "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
            "ttft_p50_s": _pct(ttfts, 0.5),
            "ttft_p99_s": _pct(ttfts, 0.99),
            "turnaround_mean_s": statistics.fmean(r.turnaround for r in mine) if mine else None,
        }
    out["computed_over_submitted"] = out["prefill_tokens_computed"] / out["prefill_tokens_submitted"]
    out["token_ids"] = [r.token_ids for r in results]
    return out


def _pct(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def _median(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for run in runs:
        for key in path:
            run = run[key]
        if run is not None:
            values.append(run)
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


async def measure(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from qllm.bench.kv import alternate

    chats = workload(args, model.vocab_size)
    runs = await alternate(
        args.rounds, ("on", "off"), lambda side: run_side(model, chats, args, side == "on")
    )
    sides: dict[str, Any] = {}
    for side, rs in runs.items():
        figures = (
            "prefill_tokens_submitted",
            "prefill_tokens_computed",
            "computed_over_submitted",
            "output_tokens_per_s",
        )
        sides[side] = {k: _median(rs, k) for k in figures} | {
            cls: {k: _median(rs, cls, k) for k in rs[0][cls]} for cls in ("ls", "be")
        }
        sides[side]["prefix"] = rs[-1]["prefix"]
    on, off = sides["on"], sides["off"]
    tokens = [r["token_ids"] for rs in runs.values() for r in rs]
    return {
        "bench": "prefix",
        "workload": {k: getattr(args, k) for k in WORKLOAD_KEYS},
        "engine": {
            k: getattr(args, k) for k in ("policy", "kv_block_size", "prefill_chunk", "max_batch", "rounds")
        },
        "on": on,
        "off": off,
        "headline": {
            "computed_over_submitted_on": on["computed_over_submitted"],
            "ls_ttft_mean_off_over_on": _ratio(off["ls"]["ttft_mean_s"], on["ls"]["ttft_mean_s"]),
            "be_ttft_mean_off_over_on": _ratio(off["be"]["ttft_mean_s"], on["be"]["ttft_mean_s"]),
            "output_tokens_per_s_on_over_off": _ratio(on["output_tokens_per_s"], off["output_tokens_per_s"]),
            "tokens_equal": all(t == tokens[0] for t in tokens),
        },
    }


WORKLOAD_KEYS = (
    "model", "conversations", "turns", "rate", "prompts", "prompt_tokens", "zipf", "share", "user_tokens",
    "output_tokens", "think", "ls_share", "seed",
)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from qllm.models import load_model

    for name in ("conversations", "turns", "prompt_tokens", "kv_block_size", "prefill_chunk", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0:
        raise ValueError("--rate must be positive")
    model = load_model(args.model)
    import uvloop

    report = uvloop.run(measure(model, args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0
