"""Where LS decode time goes: runs one `qllm bench` workload under a `cohort` that logs its
decisions, and splits the time LS requests spend decoding by what ran meanwhile: their own ops
(alone, or with BE riders), an LS prefill op, another LS group's op, or a BE op. Prints JSON.

    .venv/bin/python scripts/ls_decode_split.py [--options OPTS] -- [qllm bench arguments]

``--options`` are the cohort's (default ``pace=true``); the bench arguments pick the workload,
e.g. ``--model small-random --ls-share 0.3 --max-batch 16 --seed 11 --rates 6``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from collections import Counter

from qllm.policies.api import Phase
from qllm.policies.cohort import CohortPolicy

DECISIONS: list[tuple[float, list[tuple[str, bool, bool]], list[str]]] = []


class LoggingCohort(CohortPolicy):
    """``cohort`` that records each decision: its time, its batch (id, LS, prefill) and the LS
    requests decoding."""

    name = "logging-cohort"

    def select(self, kernel):
        batch = super().select(kernel)
        decoding = [r.id for r in kernel.ready if r.is_ls and r.phase is Phase.DECODE]
        rows = [(r.id, r.is_ls, r.phase is Phase.PREFILL) for r in batch]
        DECISIONS.append((kernel.now, rows, decoding))
        return batch


def split(decisions) -> dict[str, float]:
    """Seconds of LS decode by what ran, from each decision to the next."""
    spent: Counter = Counter()
    for (t, batch, decoding), (t_next, _, _) in itertools.pairwise(decisions):
        ids = {rid for rid, _, _ in batch}
        lead = any(ls and prefill for _, ls, prefill in batch)
        be = any(not ls for _, ls, _ in batch)
        ls_decode = any(ls and not prefill for _, ls, prefill in batch)
        for rid in decoding:
            if rid in ids:
                what = "own op with LS prefill" if lead else "own op with BE riders" if be else "own op"
            else:
                what = "LS prefill op" if lead else "other LS op" if ls_decode else "BE op"
            spent[what] += t_next - t
    return dict(spent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--options", default="pace=true", help="cohort options, key=value:key=value")
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- then qllm bench arguments")
    args = parser.parse_args()
    bench = [a for a in args.bench if a != "--"]
    from qllm.cli import main as qllm

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        systems = f"__main__:LoggingCohort:{args.options}" if args.options else "__main__:LoggingCohort"
        code = qllm(["bench", *bench, "--systems", systems, "--json", out.name])
        if code:
            return code
        with open(out.name) as f:
            result = json.load(f)
    spent = split(DECISIONS)
    total = sum(spent.values()) or 1.0
    system = result["systems"][0]["name"]
    print(
        json.dumps(
            {
                "options": args.options,
                "bench": bench,
                "ls_decode_s": round(total, 3),
                "share": {k: round(v / total, 3) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])},
                "ls_tpot_over_isolated": result["headline"].get("ls_tpot_over_isolated", {}).get(system),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
