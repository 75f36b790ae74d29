"""``qllm models``: list embedded presets and supported model families."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list presets and supported model families")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from qllm.models import FAMILIES
    from qllm.models.presets import PRESETS

    if args.json:
        print(json.dumps({
            "presets": {p.name: p.description for p in PRESETS.values()},
            "families": {f.family: list(f.model_types) for f in FAMILIES},
        }))
        return 0
    print("presets (use with --model NAME):")
    for p in PRESETS.values():
        print(f"  {p.name:<14} {p.description}")
    print("families (config.json model_type of a local --model DIR):")
    for f in FAMILIES:
        print(f"  {f.family:<14} {', '.join(f.model_types)}")
    return 0
