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
    ("LS tpot", "ls", "tpot_mean_s", "{:.3g}s"),
    ("p99", "ls", "tpot_p99_s", "{:.3g}s"),
    ("TPOT SLO", "ls", "tpot_slo_attainment", "{:.0%}"),
    ("LS queue p99", "ls", "queue_p99_s", "{:.3g}s"),
    ("BE ttft", "be", "ttft_mean_s", "{:.3g}s"),
    ("BE turn", "be", "turnaround_mean_s", "{:.3g}s"),
    ("BE tok/s", "be", "tokens_per_s", "{:.3g}"),
    ("tok/s", "all", "tokens_per_s", "{:.3g}"),
    ("req/s", "all", "requests_per_s", "{:.3g}"),
    ("preempt", "all", "preemptions", "{}"),
    ("done", "all", "completed", "{}"),
)


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec`` (a ``str.format`` pattern); "-" for None."""
    return "-" if value is None else spec.format(value)


def grid(rows: list[list[str]]) -> str:
    """``rows`` as aligned columns (the first left, the others right), a rule under the header row."""
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
        metrics = [fmt(m[cls].get(key), f) for _, cls, key, f in COLUMNS]
        rows.append([f"{cell['rate']:g}", cell["system"], *metrics, fmt(batches, "{}")])
    slo, iso, cfg = result["slo"], result["isolated"], result["config"]
    parts = [
        f"model {result['model'].get('name')}  mode {result['mode']}  max_batch {cfg['max_batch']}  "
        f"LS share {cfg['ls_share']:.0%}  seed {cfg['seed']}"
        + (f"  {cfg['only_class'].upper()} requests only" if cfg.get("only_class") else ""),
        f"LS TTFT SLO {slo['ttft_s']:.3g}s (single-request decode step {slo['decode_step_s']:.3g}s"
        + (f" x {slo['k']:g})" if slo.get("k") else ")")
        + f"  isolated LS TTFT mean {fmt(iso['ttft_mean_s'], '{:.3g}s')} p99 {fmt(iso['ttft_p99_s'], '{:.3g}s')}"
        + f" ({iso['requests']} requests, {_tries(iso.get('tries', 1))})",
        "",
        grid(rows),
        "",
        _headline(result["headline"]),
        "",
        _by_policy(result["headline"]),
        "",
        _by_system(result["headline"]),
        "",
        targets_table(result["targets"]),
    ]
    return "\n".join(parts)


def _order(result: dict[str, Any], name: str) -> int:
    names = [s["name"] for s in result["systems"]]
    return names.index(name) if name in names else len(names)


def _headline(h: dict[str, Any]) -> str:
    x = "{:.3g}x"
    by_rate = ", ".join(fmt(v, x) for v in h.get("throughput_vs_transformers_cb_by_rate") or []) or "-"
    lines = [
        f"headline (baseline {h['baseline']}, best policy {h['best_policy']}, peer {h['peer']})",
        f"  LS TTFT fcfs / {h['best_policy']}: mean {fmt(h['ls_ttft_ratio_mean'], x)}, max {fmt(h['ls_ttft_ratio_max'], x)}",
        f"  LS turnaround ratio max {fmt(h['ls_turnaround_ratio_max'], x)};  "
        f"LS TTFT p99 / isolated (worst rate) {fmt(h['ls_ttft_p99_over_isolated'], x)}",
        f"  BE throughput vs fcfs (min over rates) {fmt(h['be_throughput_ratio'], x)};  "
        f"BE turnaround vs fcfs (mean) {fmt(h['be_turnaround_ratio_mean'], x)};  "
        f"BE TTFT vs fcfs (mean) {fmt(h.get('be_ttft_ratio_mean'), x)}",
        f"  fcfs TTFT / transformers-cb TTFT (mean over rates) {fmt(h['fcfs_vs_transformers_cb'], x)}; "
        f"each in units of its own idle TTFT {fmt(h.get('fcfs_vs_transformers_cb_normalized'), x)}",
        f"  fcfs tok/s / transformers-cb tok/s, all requests (min over rates) "
        f"{fmt(h.get('throughput_vs_transformers_cb'), x)}; by rate {by_rate}",
        "  SLO held up to: "
        + ", ".join(f"{k} {fmt(v, '{:g} req/s')}" for k, v in h["slo_max_rate"].items())
        + f"  (LS alone saturates at ~{fmt(h['ls_saturation_rate'], '{:.3g} req/s')})",
    ]
    if h.get("vllm"):
        lines.append(
            f"  {h['ours']} vs vllm (worst rate; >1: {h['ours']} better): tok/s {fmt(h.get('throughput_vs_vllm'), x)}, "
            f"LS TTFT mean {fmt(h.get('ls_ttft_mean_vs_vllm'), x)}, p99 {fmt(h.get('ls_ttft_p99_vs_vllm'), x)}, "
            f"LS turnaround {fmt(h.get('ls_turnaround_vs_vllm'), x)}, LS TPOT {fmt(h.get('ls_tpot_vs_vllm'), x)}"
        )
    return "\n".join(lines)


def _by_system(h: dict[str, Any]) -> str:
    """Every system's LS TPOT and turnaround over its isolated values and its SLO attainment (the
    worst rate)."""
    x, pct = "{:.3g}x", "{:.0%}"
    rows = [["system (worst rate)", "LS tpot / isolated", "tpot p99 / isolated", "LS turn / isolated",
             "TTFT SLO", "TPOT SLO"]]  # fmt: skip
    for name, f in (h.get("by_system") or {}).items():
        rows.append([
            name, fmt(f["ls_tpot_over_isolated"], x), fmt(f["ls_tpot_p99_over_isolated"], x),
            fmt(f["ls_turnaround_over_isolated"], x), fmt(f["ls_ttft_slo_attainment"], pct),
            fmt(f["ls_tpot_slo_attainment"], pct),
        ])  # fmt: skip
    return grid(rows) if len(rows) > 1 else ""


def _by_policy(h: dict[str, Any]) -> str:
    """Every candidate's ratios against the baseline (the headline shows only the best one)."""
    x = "{:.3g}x"
    rows = [["policy vs fcfs", "fcfs LS ttft / its", "LS p99 / isolated", "BE tok/s (min)", "BE turn (mean)",
             "BE ttft (mean)"]]  # fmt: skip
    for name, f in h.get("by_policy", {}).items():
        keys = ("ls_ttft_ratio_mean", "ls_ttft_p99_over_isolated", "be_throughput_ratio",
                "be_turnaround_ratio_mean", "be_ttft_ratio_mean")  # fmt: skip
        rows.append([name, *(fmt(f.get(k), x) for k in keys)])
    return grid(rows) if len(rows) > 1 else ""


def targets_table(targets: list[dict[str, Any]]) -> str:
    """The benchmark's targets: wanted, measured, met or missed, and the paper's figure."""
    rows = [["target", "wanted", "measured", "met", "paper"]]
    for t in targets:
        met = t.get("note") or {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        rows.append([t["name"], t["target"], fmt(t["value"], "{:.3g}"), met, t["paper"]])
    return grid(rows)


def _tries(tries: int) -> str:
    return "one run each" if tries == 1 else f"median of {tries} runs each"
