"""``qllm generate``: generate text for one prompt, in process or through a running server."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_MODEL = "tiny"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("prompt", metavar="PROMPT", help="prompt text")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"preset name or model directory (default: {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype (default float32)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 or unset = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template (instruct models)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.add_argument("--socket", metavar="PATH", help="generate through the `qllm serve` listening on PATH")
    p.add_argument(
        "--priority", choices=["ls", "be"], default="ls", help="request class with --socket (default ls)"
    )
    return p


def sampling(args: argparse.Namespace) -> dict:
    """The sampling options given on the command line (SamplingParams / client keywords)."""
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def run_remote(args: argparse.Namespace) -> int:
    """Generate through a running server, streaming the text as it comes (unless --json)."""
    from qllm.client import Client

    params = dict(sampling(args), priority=args.priority, chat=args.chat)
    with Client(args.socket) as client:
        if args.json:
            result = client.generate(args.prompt, **params)
            print(
                json.dumps(
                    {
                        "model": client.welcome.model,
                        "token_ids": result.token_ids,
                        "text": result.text,
                        "status": result.status,
                        "prompt_tokens": result.usage.prompt_tokens,
                        "ttft_s": result.timings.ttft,
                        "turnaround_s": result.timings.turnaround,
                        "tokens_per_s": _decode_rate(
                            len(result.token_ids), result.timings.ttft, result.timings.turnaround
                        ),
                        "preemptions": result.preemptions,
                    }
                )
            )
            return 0
        with client.stream(args.prompt, **params) as stream:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _decode_rate(tokens: int, ttft: float | None, turnaround: float) -> float:
    """Tokens after the first per second of decode (0 when there is nothing to measure)."""
    if ttft is None or tokens < 2 or turnaround <= ttft:
        return 0.0
    return round((tokens - 1) / (turnaround - ttft), 3)


def run(args: argparse.Namespace) -> int:
    if args.socket:
        from qllm.errors import QllmError

        try:
            return run_remote(args)
        except QllmError as exc:
            print(f"qllm generate: error ({exc.code}): {exc}", file=sys.stderr)
            return 1
    from qllm.kernel.program import generate
    from qllm.models import load_model
    from qllm.sampling import SamplingParams

    params = SamplingParams(**sampling(args))
    model = load_model(args.model, dtype=args.dtype, batch_invariant=False)
    result = generate(model, args.prompt, params, chat=args.chat)
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "token_ids": result.token_ids,
                    "text": result.text,
                    "stop_reason": str(result.stop_reason),
                    "prompt_tokens": result.prompt_tokens,
                    "ttft_s": round(result.ttft_s, 6),
                    "tokens_per_s": round(result.tokens_per_s, 3),
                }
            )
        )
    else:
        sys.stdout.write(result.text + "\n")
    return 0
