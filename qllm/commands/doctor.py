"""``qllm doctor``: what this machine gives a model: kernels, threads, and batch invariance."""

from __future__ import annotations

import argparse
import json

LARGE_WEIGHT_KERNELS = {
    "skinny": "qllm's skinny kernel (built for this CPU)",
    "onednn_packed": "oneDNN, packed",
    "onednn": "oneDNN",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "doctor",
        help="check this machine for a model: batch invariance probed per GEMM kernel and thread count",
        description="Load MODEL, probe (or read from the cache) the row padding that makes its batched "
        "ops bit-identical to solo runs on this machine, and print what was verified.",
    )
    p.add_argument("--model", default="tiny", help="preset name or model directory (default: tiny)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's, as qllm serve)"
    )
    p.add_argument("--fresh", action="store_true", help="probe again, ignoring (and not writing) the cache")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from qllm.models import invariance, load_model

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype, device=args.device, batch_invariant=not args.fresh)
    found = model.invariance
    if args.fresh:
        model.batch_invariant = True
        found = model.calibrate(invariance.ProbeCache(persist=False))
    report = {
        "model": str(args.model),
        "family": model.family,
        "machine": found.machine if found else invariance.machine(),
        "cache": str(invariance.cache_path()),
        "batch_invariance": model.invariance_summary(),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    where = report["machine"]
    print(
        f"machine:   {where['cpu']} ({where['threads']} threads), torch {where['torch']}, "
        f"MKL {'yes' if where['mkl'] else 'no'}, oneDNN {'yes' if where['onednn'] else 'no'}"
    )
    print(f"model:     {args.model} ({model.family}, {args.dtype}, {args.device})")
    kernel = report["batch_invariance"]["large_weight_gemm"]
    print(f"GEMM:      large float32 weights on {LARGE_WEIGHT_KERNELS.get(kernel, kernel)}")
    if found is None:
        print("batch invariance: off")
        return 0
    how = (
        f"probed {found.probed} GEMM kernels in {found.probe_s:.2f} s"
        if found.probed
        else f"from the cache ({found.gemms} GEMM kernels, {found.probe_s * 1e3:.1f} ms)"
    )
    state = "verified" if found.verified else "NOT verified"
    print(f"batch invariance: {state} at {found.threads} threads; {how}")
    for kind, (multiple, minimum) in sorted(found.padding.items()):
        note = " (unverified: no tested padding is invariant)" if kind in found.unverified else ""
        print(f"  {kind.lower():<10} rows padded to a multiple of {multiple}, at least {minimum}{note}")
    print(f"cache:     {'not used (--fresh)' if args.fresh else report['cache']}")
    return 0 if found.verified else 1
