"""``qllm policies``: list the scheduling policies registered under ``qllm.policies``."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("policies", help="list scheduling policies (built-in and plugins)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from qllm.errors import PolicyError
    from qllm.policies import DEFAULT_POLICY, available_policies, load_policy

    rows = []
    for name, ep in sorted(available_policies().items()):
        try:
            policy = load_policy(name)
            module = sys.modules.get(type(policy).__module__)
            doc = (type(policy).__doc__ or getattr(module, "__doc__", None) or "").strip().splitlines()
            summary = doc[0] if doc else ""
            status = "ok"
        except PolicyError as exc:
            summary, status = str(exc), "error"
        rows.append(
            {
                "name": name,
                "target": ep.value,
                "default": name == DEFAULT_POLICY,
                "status": status,
                "summary": summary,
            }
        )
    if args.json:
        print(json.dumps({"default": DEFAULT_POLICY, "policies": rows}))
        return 0
    for row in rows:
        mark = "*" if row["default"] else " "
        print(f"{mark} {row['name']:<16} {row['target']:<45} {row['summary']}")
    print("(* default; use --policy NAME or --policy module:Class)")
    return 0
