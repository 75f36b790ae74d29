"""Terminal rendering of a workload benchmark result: the per-rate table, headline and targets."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    # header, class, metric, format
    ("LS ttft mean", "ls", "ttft_mean_s", "{:.3g}s"),
    ("p50", "ls", "ttft_p50_s", "{:.3g}s"),
    ("p99", "ls", "ttft_p99_s", "{:.3g}s"),
    ("SLO", "ls", "slo_attainment", "{:.0%}"),
    ("LS turn", "ls", "turnaround_mean_s", "{:.3g}s"),
    ("LS queue p99", "ls", "queue_p99_s", "{:.3g}s"),
    ("BE ttft", "be", "ttft_mean_s", "{:.3g}s"),
    ("BE turn", "be", "turnaround_mean_s", "{:.3g}s"),
    ("BE tok/s", "be", "tokens_per_s", "{:.3g}"),
    ("tok/s", "all", "tokens_per_s", "{:.3g}"),
    ("req/s", "all", "requests_per_s", "{:.3g}"),
    ("preempt", "all", "preemptions", "{}"),
    ("done", "all", "completed", "{}"),
)


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    """The whole report as text."""
    rows = [["rate", "system", *(c[0] for c in COLUMNS), "batches"]]
    for cell in sorted(result["cells"], key=lambda c: (c["rate"], _order(result, c["system"]))):
        m = cell["metrics"]
        batches = (cell.get("kernel") or {}).get("batches")  # batched ops the qllm kernel ran
        metrics = [_fmt(m[cls][key], f) for _, cls, key, f in COLUMNS]
        rows.append([f"{cell['rate']:g}", cell["system"], *metrics, _fmt(batches, "{}")])
    slo, iso, cfg = result["slo"], result["isolated"], result["config"]
    parts = [
        f"model {result['model'].get('name')}  mode {result['mode']}  max_batch {cfg['max_batch']}  "
        f"LS share {cfg['ls_share']:.0%}  seed {cfg['seed']}"
        + (f"  {cfg['only_class'].upper()} requests only" if cfg.get("only_class") else ""),
        f"LS TTFT SLO {slo['ttft_s']:.3g}s (single-request decode step {slo['decode_step_s']:.3g}s"
        + (f" x {slo['k']:g})" if slo.get("k") else ")")
        + f"  isolated LS TTFT mean {_fmt(iso['ttft_mean_s'], '{:.3g}s')} p99 {_fmt(iso['ttft_p99_s'], '{:.3g}s')}"
        + f" ({iso['requests']} requests, {_tries(iso.get('tries', 1))})",
        "",
        _grid(rows),
        "",
        _headline(result["headline"]),
        "",
        _by_policy(result["headline"]),
        "",
        _targets(result["targets"]),
    ]
    return "\n".join(parts)


def _order(result: dict[str, Any], name: str) -> int:
    names = [s["name"] for s in result["systems"]]
    return names.index(name) if name in names else len(names)


def _headline(h: dict[str, Any]) -> str:
    x = "{:.3g}x"
    by_rate = ", ".join(_fmt(v, x) for v in h.get("throughput_vs_transformers_cb_by_rate") or []) or "-"
    lines = [
        f"headline (baseline {h['baseline']}, best policy {h['best_policy']}, peer {h['peer']})",
        f"  LS TTFT fcfs / {h['best_policy']}: mean {_fmt(h['ls_ttft_ratio_mean'], x)}, max {_fmt(h['ls_ttft_ratio_max'], x)}",
        f"  LS turnaround ratio max {_fmt(h['ls_turnaround_ratio_max'], x)};  "
        f"LS TTFT p99 / isolated (worst rate) {_fmt(h['ls_ttft_p99_over_isolated'], x)}",
        f"  BE throughput vs fcfs (min over rates) {_fmt(h['be_throughput_ratio'], x)};  "
        f"BE turnaround vs fcfs (mean) {_fmt(h['be_turnaround_ratio_mean'], x)};  "
        f"BE TTFT vs fcfs (mean) {_fmt(h.get('be_ttft_ratio_mean'), x)}",
        f"  fcfs TTFT / transformers-cb TTFT (mean over rates) {_fmt(h['fcfs_vs_transformers_cb'], x)}; "
        f"each in units of its own idle TTFT {_fmt(h.get('fcfs_vs_transformers_cb_normalized'), x)}",
        f"  fcfs tok/s / transformers-cb tok/s, all requests (min over rates) "
        f"{_fmt(h.get('throughput_vs_transformers_cb'), x)}; by rate {by_rate}",
        "  SLO held up to: "
        + ", ".join(f"{k} {_fmt(v, '{:g} req/s')}" for k, v in h["slo_max_rate"].items())
        + f"  (LS alone saturates at ~{_fmt(h['ls_saturation_rate'], '{:.3g} req/s')})",
    ]
    return "\n".join(lines)


def _by_policy(h: dict[str, Any]) -> str:
    """Every candidate's ratios against the baseline (the headline shows only the best one)."""
    x = "{:.3g}x"
    rows = [["policy vs fcfs", "fcfs LS ttft / its", "LS p99 / isolated", "BE tok/s (min)", "BE turn (mean)",
             "BE ttft (mean)"]]  # fmt: skip
    for name, f in h.get("by_policy", {}).items():
        keys = ("ls_ttft_ratio_mean", "ls_ttft_p99_over_isolated", "be_throughput_ratio",
                "be_turnaround_ratio_mean", "be_ttft_ratio_mean")  # fmt: skip
        rows.append([name, *(_fmt(f.get(k), x) for k in keys)])
    return _grid(rows) if len(rows) > 1 else ""


def _targets(targets: list[dict[str, Any]]) -> str:
    rows = [["target", "wanted", "measured", "met", "paper"]]
    for t in targets:
        met = t.get("note") or {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        rows.append([t["name"], t["target"], _fmt(t["value"], "{:.3g}"), met, t["paper"]])
    return _grid(rows)


def _tries(tries: int) -> str:
    return "one run each" if tries == 1 else f"median of {tries} runs each"
