"""``qllm models``: list embedded presets and supported model families."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list presets and supported model families")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from qllm.models import FAMILIES, REFUSED, supported_model_types
    from qllm.models.presets import PRESETS

    if args.json:
        print(
            json.dumps(
                {
                    "presets": {p.name: p.description for p in PRESETS.values()},
                    "families": {f.family: list(f.model_types) for f in FAMILIES},
                    "model_types": len(supported_model_types()),
                    "refused": REFUSED,
                }
            )
        )
        return 0
    print("presets (use with --model NAME):")
    for p in PRESETS.values():
        print(f"  {p.name:<14} {p.description}")
    print(
        f"families ({len(supported_model_types())} config.json model_types of a local --model DIR run exactly):"
    )
    for f in FAMILIES:
        print(f"  {f.family:<14} {', '.join(f.model_types)}")
    print("refused (model_type: reason):")
    for model_type, reason in REFUSED.items():
        print(f"  {model_type:<16} {reason}")
    return 0
