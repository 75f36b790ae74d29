"""``qllm stats``: a running server's statistics, as a summary, JSON or Prometheus text."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("stats", help="statistics of a running server")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="server socket (default $QLLM_SOCKET, $XDG_RUNTIME_DIR/qllm.sock, ...)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the full statistics as one JSON object")
    out.add_argument("--prometheus", action="store_true", help="print the Prometheus text exposition format")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")
    return p


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}ms"


def summary(stats: dict[str, Any]) -> str:
    """A few readable lines: what runs, what is live, and per-class latency percentiles."""
    from qllm.kernel.stats import quantile

    lines = [f"model {stats.get('model')}  policy {stats.get('policy')}  accepting {stats.get('accepting')}"]
    live = stats.get("live", {})
    lines.append("live    " + "  ".join(f"{c}: {sum(v.values())}" for c, v in live.items()))
    memory = stats.get("memory", {})
    if memory:
        lines.append(
            f"memory  resident {memory.get('resident_bytes')} B  offloaded {memory.get('offloaded_bytes')} B  "
            f"budget {memory.get('budget_bytes')}"
        )
    prefix = stats.get("prefix", {})
    if prefix.get("enabled"):
        lines.append(
            f"prefix  hit {prefix['tokens_hit']} of {prefix['tokens_looked_up']} prompt tokens  "
            f"cached {prefix['cached_bytes']} B in {prefix['entries']} spans  evictions {prefix['evictions']}"
        )
    for cls, m in stats.get("metrics", {}).items():
        h = m["histograms"]
        done = sum(m["requests"].values())
        lines.append(
            f"{cls}      done {done}  tokens {m['generated_tokens']}  preemptions {m['preemptions']}  "
            f"ttft p50 {_ms(quantile(h['ttft_seconds'], 0.5))} p99 {_ms(quantile(h['ttft_seconds'], 0.99))}  "
            f"queue p99 {_ms(quantile(h['queue_seconds'], 0.99))}  "
            f"turnaround p50 {_ms(quantile(h['turnaround_seconds'], 0.5))}"
        )
    tenants = stats.get("tenants") or {}
    if tenants:
        jain = (stats.get("fairness") or {}).get("jain_index")
        shown = "  ".join(
            f"{name}: {t['service_s']:.2f} s (weight {t['weight']:g}, live {t['live']})"
            for name, t in sorted(tenants.items(), key=lambda kv: -kv[1]["service_s"])[:8]
        )
        lines.append(f"tenants {shown}  jain {'-' if jain is None else f'{jain:.3f}'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from qllm.client import Client
    from qllm.errors import QllmError
    from qllm.server.prometheus import exposition

    try:
        with Client(args.socket, timeout=args.timeout, connect_timeout=args.timeout) as client:
            stats = client.stats()
    except QllmError as exc:
        print(f"qllm stats: error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    if args.prometheus:
        sys.stdout.write(exposition(stats).decode())
    elif args.json:
        print(json.dumps(stats))
    else:
        print(summary(stats))
    return 0
