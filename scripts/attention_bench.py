"""Time of one batched attention op, this checkout's against a baseline revision's, side by side.

Runs ``MoEModel._run_attention`` on decode requests (one row each, cache lengths drawn from
``--lengths``) of one layer of a preset, at each thread count, alternating the two versions call
by call so that a noisy machine slows both alike. The baseline is ``qllm/models/base.py`` and
``qllm/kernel/runtime/cache.py`` as of ``--baseline`` (a git revision), loaded beside the installed package and
run on the same executor. Prints JSON: median milliseconds per call and the ratio new/baseline.

    .venv/bin/python scripts/attention_bench.py --batches 1 8 32 --threads 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from qllm.kernel.runtime.cache import KVCache
from qllm.kernel.runtime.ops import Op, OpKind
from qllm.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def baseline_module(revision: str, path: str, name: str) -> ModuleType:
    """The module at ``path`` as of git ``revision``, imported under ``name``."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and annotations look modules up by name
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def decode_ops(model: Any, cache_class: type, lengths: list[int], layer: int, seed: int) -> list[Op]:
    """One decode op per length, each with a cache of that many random keys in ``layer``."""
    gen = torch.Generator().manual_seed(seed)
    ops = []
    for length in lengths:
        cache = cache_class(model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, model.device)
        shape = (model.num_kv_heads, length, model.head_dim)
        cache.append(layer, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
        x = torch.randn(1, model.config.hidden_size, generator=gen)
        ops.append(Op(OpKind.ATTENTION, layer, x, cache=cache, positions=torch.tensor([length])))
    return ops


def rewind(ops: list[Op], lengths: list[int]) -> None:
    """Drop what the last call appended, so that every call sees the same cache lengths."""
    for op, length in zip(ops, lengths):
        op.cache.lengths[op.layer] = length


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small-random")
    parser.add_argument("--baseline", default="ee21773", help="git revision to compare against")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--lengths", type=int, nargs=2, default=[32, 96], help="cache lengths drawn from [lo, hi]"
    )
    parser.add_argument("--calls", type=int, default=60, help="timed calls per version and setting")
    parser.add_argument("--layer", type=int, default=0)
    args = parser.parse_args()

    old_cache = baseline_module(args.baseline, "qllm/kernel/runtime/cache.py", "_baseline_cache")
    old_base = baseline_module(args.baseline, "qllm/models/base.py", "_baseline_base")
    model = load_model(args.model)
    versions = {
        "baseline": (lambda ops: old_base.MoEModel._run_attention(model, ops), old_cache.KVCache),
        "new": (model._run_attention, KVCache),
    }
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        model.calibrate()  # the row padding of this thread count, as MoEModel.run would
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            lengths = torch.randint(args.lengths[0], args.lengths[1] + 1, (batch,), generator=gen).tolist()
            setups = {
                name: (run, decode_ops(model, cache_class, lengths, args.layer, seed=batch))
                for name, (run, cache_class) in versions.items()
            }
            times: dict[str, list[float]] = {name: [] for name in versions}
            with torch.no_grad():
                for i in range(args.calls + 5):
                    for name, (run, ops) in setups.items():
                        rewind(ops, lengths)
                        start = time.perf_counter()
                        run(ops)
                        if i >= 5:  # warm-up calls are not timed
                            times[name].append(time.perf_counter() - start)
                outs = {name: run(rewind(ops, lengths) or ops) for name, (run, ops) in setups.items()}
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            rows.append(
                {
                    "threads": threads,
                    "requests": batch,
                    "baseline_ms": round(ms["baseline"], 3),
                    "new_ms": round(ms["new"], 3),
                    "ratio": round(ms["new"] / ms["baseline"], 3),
                    "max_abs_diff": max(
                        (a - b).abs().max().item() for a, b in zip(outs["baseline"], outs["new"])
                    ),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(
        json.dumps(
            {"model": args.model, "baseline": args.baseline, "lengths": args.lengths, "rows": rows}, indent=2
        )
    )


if __name__ == "__main__":
    main()
