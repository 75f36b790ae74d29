"""``qllm`` command line: one subcommand per module in :mod:`qllm.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from qllm import logging as log
from qllm.kernel.openmp import configure_openmp

COMMANDS = ("demo", "generate", "models", "policies", "serve", "stats", "bench", "doctor")
"""Each names a module ``qllm.commands.<name>`` with ``add_parser(subparsers)`` and ``run(args) -> int``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qllm",
        description="Inference runtime for Mixture-of-Experts models with expert-level preemption.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"qllm.commands.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qllm.commands.{name}":
                continue  # command not part of this build
            raise
        module.add_parser(sub).set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_openmp()  # before any command imports torch
    args = build_parser().parse_args(argv)
    # Log lines go to stderr from the start, so that stdout carries only a command's output
    # (``qllm generate --json``); ``qllm serve`` sets its own level and format.
    log.configure("warning")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:  # user errors: one clear line, no traceback
        print(f"qllm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
