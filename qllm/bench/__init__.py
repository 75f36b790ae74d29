"""Benchmarks: ``qllm bench <name>`` (also ``python -m qllm.bench <name>``), each printing JSON.

Each benchmark is a module ``qllm.bench.<name>`` exposing ``add_arguments(parser)`` and
``run(args) -> int``; a module that is not part of this build is simply not listed. Bare
``qllm bench`` runs the default benchmark (:data:`DEFAULT`, the LS/BE workload) and accepts its
options directly (``qllm bench --json out.json``); without it, it prints help.

Modules keep their top-level imports light (stdlib only): the CLI imports every one of them to
build its parser, so torch and transformers are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from qllm.kernel.openmp import configure_openmp

BENCHES = ("workload", "executor", "kernel", "prefix", "tenants")
"""Benchmark modules, in the order ``qllm bench --help`` lists them."""

DEFAULT = "workload"
"""What bare ``qllm bench`` runs."""


def available() -> dict[str, ModuleType]:
    """The benchmark modules present in this build, by name."""
    found = {}
    for name in BENCHES:
        module_name = f"{__name__}.{name}"
        try:
            found[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise  # the module exists but one of its own imports is missing
    return found


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark subcommands (and the default benchmark's options) to ``parser``."""
    benches = available()
    default = benches.get(DEFAULT)
    if default is not None:
        default.add_arguments(parser)
    parser.set_defaults(bench_run=default.run if default is not None else None, bench_help=parser.print_help)
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, module in benches.items():
        doc = (module.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(bench_run=module.run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` selected (the default one when none was named)."""
    if args.bench_run is None:
        args.bench_help()
        return 2
    return int(args.bench_run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m qllm.bench``: the same process set-up as the ``qllm`` command, then the benchmark."""
    configure_openmp()  # before any benchmark imports torch
    parser = configure(
        argparse.ArgumentParser(prog="python -m qllm.bench", description=__doc__.splitlines()[0])
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
