"""``qllm bench``: benchmarks printing JSON (the modules of :mod:`qllm.bench`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from qllm.bench import configure

    p = sub.add_parser(
        "bench",
        help="run a benchmark (bare: the LS/BE workload benchmark)",
        description="Benchmarks printing JSON. `qllm bench BENCH --help` shows a benchmark's options.",
    )
    return configure(p)


def run(args: argparse.Namespace) -> int:
    from qllm.bench import run as run_bench

    return run_bench(args)
