"""Time of one matrix product per kernel the executor could use, on this machine, side by side.

For each weight shape and row count: ``F.linear``, oneDNN on the weight as it is, oneDNN on the
weight packed in its own layout, and qllm's skinny kernel (:mod:`qllm.models.skinny`; what
:func:`qllm.models.gemm.linear` runs for large float32 weights where it builds, packed oneDNN
otherwise). Calls alternate between kernels so that a noisy machine slows all alike. Also reports,
per kernel, the row counts at which a row's result equals its result alone (bit for bit): the
padding the executor's probe would need. Prints JSON; milliseconds are medians per call.

One weight called again and again stays in the CPU's caches, which a model's weights do not: a
decode step streams every weight it reads from memory. ``--copies N`` calls N distinct copies of
each weight in turn (per call, the time of all N over N), so that with N copies larger than the
last-level cache each call streams its weight as a MoE layer's experts do; ``gb_per_s`` is the
weight's bytes over the time of one call.

    .venv/bin/python scripts/gemm_bench.py --shapes 4096x1024 1024x2048 32000x1024 --rows 1 2 4 32
    .venv/bin/python scripts/gemm_bench.py --shapes 2048x1024 --rows 1 2 4 8 --copies 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qllm.models import gemm, skinny


def kernels(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"F.linear": lambda x: F.linear(x, weight)}
    if gemm.ONEDNN:
        out["onednn"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    if gemm.PACK:
        packed = gemm.packed(weight)
        out["onednn_packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if skinny.available():
        out["skinny"] = lambda x: skinny.linear(x, weight)
    return out


def median_ms(f: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x1024", "1024x2048", "32000x1024"],
                        help="weight shapes, out x in")  # fmt: skip
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 32, 64])
    parser.add_argument("--calls", type=int, default=20, help="timed calls per kernel and row count")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--copies", type=int, default=1,
                        help="distinct copies of each weight, called in turn (enough to exceed the caches: streamed)")  # fmt: skip
    args = parser.parse_args()
    if args.copies < 1:
        parser.error("--copies must be at least 1")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    result: dict[str, object] = {
        "threads": args.threads, "torch": torch.__version__, "copies": args.copies, "shapes": {},
    }  # fmt: skip
    for spec in args.shapes:
        out_features, in_features = (int(n) for n in spec.split("x"))
        weights = [
            torch.randn(out_features, in_features, generator=gen) / in_features**0.5
            for _ in range(args.copies)
        ]
        each = [kernels(w) for w in weights]
        calls = each[0]
        x = torch.randn(max(args.rows), in_features, generator=gen)
        ms: dict[str, dict[int, list[float]]] = {name: {n: [] for n in args.rows} for name in calls}
        for kernel_set in each:
            for f in kernel_set.values():
                f(x[:2])  # warm up (and pack every copy)

        def in_turn(name: str, rows: torch.Tensor, each: list = each) -> None:
            for kernel_set in each:
                kernel_set[name](rows)

        for _ in range(3):  # alternate kernels
            for name in calls:
                for n in args.rows:
                    runs = max(1, args.calls // 3)
                    ms[name][n].append(
                        median_ms(lambda name=name, rows=x[:n]: in_turn(name, rows), runs) / args.copies
                    )
        same_as_alone = {}
        for name, f in calls.items():
            alone = f(x[:1])[0]
            same_as_alone[name] = [n for n in args.rows if torch.equal(f(x[:n])[0], alone)]
        best = {name: {n: min(v) for n, v in rows.items()} for name, rows in ms.items()}
        size = weights[0].numel() * weights[0].element_size()
        result["shapes"][spec] = {
            "ms": {name: {n: round(t, 3) for n, t in rows.items()} for name, rows in best.items()},
            "gb_per_s": {
                name: {n: round(size / t / 1e6, 1) for n, t in rows.items()} for name, rows in best.items()
            },
            "rows_where_row_equals_alone": same_as_alone,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
