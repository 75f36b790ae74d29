"""Single-request speed of the qllm executor versus transformers ``model.generate`` (one JSON line).

Both systems run the same weights on the same random prompt, greedy, with a fixed output length
(EOS ignored), so they do the same work; the tokens they produce are compared. Runs alternate
between the systems (the order reversed every round) so drift of the machine hits all alike, and
each figure is the median over rounds. Ratios are qllm / transformers, taken within each round (so
drift cancels) and reported as the median over rounds: above 1 means qllm is faster.

Measured per run: ``prefill_s``, from the call to the first token (prompt forward pass plus
sampling), and ``decode_tokens_per_s``, tokens after the first divided by the time between the
first and the last token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from qllm.models import MoEModel
    from qllm.spec import SamplingParams

TRANSFORMERS = "transformers"
QLLM = "qllm"
"""The batch-invariant executor (rows padded as probed on this machine): what the engine serves with."""
QLLM_UNPADDED = "qllm_unpadded"
"""The executor without row padding (``load_model(..., batch_invariant=False)``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="small-random", help="preset name or model directory (default small-random)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default 64)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per system (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per system first (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time only the batch-invariant executor (--batch-invariant) or only the unpadded one "
        "(--no-batch-invariant); default: both",
    )


def run(args: argparse.Namespace) -> int:
    for name in ("prompt_tokens", "decode_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    print(json.dumps(_rounded(measure(args))))
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from qllm.models import load_model
    from qllm.spec import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    first = load_model(args.model, dtype=args.dtype, batch_invariant=args.batch_invariant is not False)
    build_s = time.perf_counter() - start
    hf, tokenizer = first.hf, first.tokenizer
    executors = {}
    if args.batch_invariant is not False:
        executors[QLLM] = first
    if args.batch_invariant is not True:  # same weights, wrapped again without row padding
        executors[QLLM_UNPADDED] = load_model((hf, tokenizer), batch_invariant=False)

    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, first.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
    params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    systems: dict[str, Callable[[], tuple[list[int], float, float]]] = {
        TRANSFORMERS: lambda: _run_transformers(hf, prompt, args.decode_tokens),
        **{name: (lambda ex=ex: _run_qllm(ex, prompt, params)) for name, ex in executors.items()},
    }

    order = list(systems)
    for _ in range(args.warmup):
        for name in order:
            systems[name]()
    runs: dict[str, list[tuple[list[int], float, float]]] = {name: [] for name in systems}
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else reversed(order):
            runs[name].append(systems[name]())

    reference = runs[TRANSFORMERS][0][0]
    report: dict[str, Any] = {}
    for name, results in runs.items():
        prefill = [r[1] for r in results]
        rate = [r[2] for r in results]
        report[name] = {
            "prefill_s": statistics.median(prefill),
            "decode_tokens_per_s": statistics.median(rate),
            "prefill_s_runs": prefill,
            "decode_tokens_per_s_runs": rate,
            "tokens_equal": all(r[0] == reference for r in results),
        }
    # Each round's runs are adjacent in time, so a ratio within a round cancels the machine's
    # drift; the figure is the median of the per-round ratios.
    base = runs[TRANSFORMERS]
    ratios = {}
    for name in executors:
        decode = [_ratio(ours[2], theirs[2]) for ours, theirs in zip(runs[name], base)]
        prefill = [_ratio(theirs[1], ours[1]) for ours, theirs in zip(runs[name], base)]
        ratios[name] = {
            "decode_tokens_per_s": statistics.median(decode),
            "prefill_speed": statistics.median(prefill),
            "decode_tokens_per_s_rounds": decode,
            "prefill_speed_rounds": prefill,
        }
    # What batch invariance costs: decode of the padded executor over the unpadded one, per round.
    padding_cost = None
    if QLLM in runs and QLLM_UNPADDED in runs:
        cost = [_ratio(p[2], u[2]) for p, u in zip(runs[QLLM], runs[QLLM_UNPADDED])]
        padding_cost = {"padded_over_unpadded_decode": statistics.median(cost), "rounds": cost}
    return {
        "bench": "executor",
        "model": str(args.model),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "transformers_experts_implementation": getattr(hf.config, "_experts_implementation", None),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "rounds": args.rounds,
        "build_s": build_s,
        "batch_invariance": first.invariance_summary(),
        "tokens_equal": all(r["tokens_equal"] for r in report.values()),
        "ratios": ratios,
        "padding_cost": padding_cost,
        "systems": report,
    }


def _run_qllm(
    executor: MoEModel, prompt: list[int], params: SamplingParams
) -> tuple[list[int], float, float]:
    from qllm.kernel.program import generate

    result = generate(executor, prompt, params)
    decode_s = result.total_s - result.ttft_s
    return result.token_ids, result.ttft_s, _rate(len(result.token_ids), decode_s)


def _run_transformers(
    hf: PreTrainedModel, prompt: list[int], decode_tokens: int
) -> tuple[list[int], float, float]:
    import torch

    input_ids = torch.tensor([prompt])
    stamps = _Stamps()
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=decode_tokens,
            min_new_tokens=decode_tokens,
            eos_token_id=None,  # ignore EOS (and do not mask it), as qllm's ignore_eos
            streamer=stamps,
        )
    tokens = out[0, len(prompt) :].tolist()
    return tokens, stamps.times[0] - start, _rate(len(stamps.times), stamps.times[-1] - stamps.times[0])


class _Stamps:
    """A ``generate`` streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.prompt_seen:
            self.times.append(now)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def _rate(tokens: int, seconds: float) -> float:
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else 0.0


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.5g}")
    return value
