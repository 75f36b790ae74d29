"""``qllm bench --repeat N``: the same benchmark N times in a row, its figures as medians.

On a small, shared machine one run's ratios move by 10-25% from run to run (docs/benchmarks.md),
more than many changes move them. Repeating the whole run (yardsticks, rates, every system) and
reporting each figure's median with its range over runs tells a change from that noise.

The combined result keeps every run whole under ``runs``; ``headline`` holds the median of each
numeric figure over the runs (element by element for per-rate lists), the most common value of
each other one (a flag such as "SLO held at every rate" counts as held when most runs held it),
``spread`` the ``[min, max]`` of each numeric figure, and ``targets`` the targets judged on the
medians.

``per_rate_median`` takes the figures the other way round: each policy figure's median over runs
at each rate first, then over rates as one run takes them (the least BE tokens/s ratio, the mean
BE turnaround ratio, the largest LS p99 over isolated). A figure taken as the least (or largest)
over rates of one noisy run leans low (or high) by the noise itself; the median of each rate's
runs does not, so this is the better estimate of a policy's worst rate, and the median of the
runs' headlines (``headline``, on which ``targets`` are judged) the more cautious one.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

FIGURES = (
    ("LS p99 / isolated", "ls_ttft_p99_over_isolated"),
    ("BE tok/s (min)", "be_throughput_ratio"),
    ("BE turn (mean)", "be_turnaround_ratio_mean"),
    ("BE ttft (mean)", "be_ttft_ratio_mean"),
)
"""The policy figures the report shows per run and as median [min-max]."""


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from ``runs`` (each a whole ``qllm bench`` result, summarized)."""
    from qllm.bench.stats import rounded
    from qllm.bench.summary import targets

    if not runs:
        raise ValueError("no runs to combine")
    heads = [r["headline"] for r in runs]
    head = median_tree(heads)
    return {
        "bench": "workload",
        "repeat": len(runs),
        "config": runs[0]["config"],
        "model": runs[0]["model"],
        "headline": rounded(head),
        "spread": rounded(spread_tree(heads)),
        "per_rate_median": rounded(per_rate_median(head)),
        "targets": rounded(targets(head)),
        "runs": runs,
    }


PER_RATE = (
    # (figure, its per-rate list, how one run takes it over rates)
    ("be_throughput_ratio", "be_throughput_ratio_by_rate", min),
    ("be_turnaround_ratio_mean", "be_turnaround_ratio_by_rate", statistics.mean),
    ("ls_ttft_p99_over_isolated", "ls_ttft_p99_over_isolated_by_rate", max),
)


def per_rate_median(head: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """For each policy, its figures over rates from their per-rate medians over runs (``head``:
    the medians, whose per-rate lists are medians element by element)."""
    out = {}
    for name, figures in (head.get("by_policy") or {}).items():
        out[name] = {}
        for key, by_rate, over in PER_RATE:
            values = [v for v in figures.get(by_rate) or [] if v is not None]
            out[name][key] = over(values) if values else None
    return out


def median_tree(trees: list[Any]) -> Any:
    """Leaf by leaf over trees of one shape: the median of numbers (None where most runs have
    none), lists element by element, the most common value of anything else."""
    return _zip_trees(trees, _median_leaf, prune=False)


def spread_tree(trees: list[Any]) -> Any:
    """``[min, max]`` of every numeric leaf (and per-rate list element) over trees of one shape;
    other leaves are left out."""
    return _zip_trees(trees, _spread_leaf, prune=True)


def _zip_trees(trees: list[Any], leaf: Any, prune: bool) -> Any:
    """``leaf`` of each position that every tree has (dict keys of all, lists of one length);
    with ``prune``, positions (and whole branches) where ``leaf`` gives None are left out."""
    first = trees[0]
    if isinstance(first, dict):
        out = {}
        for k in first:
            if all(isinstance(t, dict) and k in t for t in trees):
                value = _zip_trees([t[k] for t in trees], leaf, prune)
                if value is not None or not prune:
                    out[k] = value
        return out if out or not prune else None
    if isinstance(first, list) and all(isinstance(t, list) and len(t) == len(first) for t in trees):
        columns = [_zip_trees(list(c), leaf, prune) for c in zip(*trees)]
        return None if prune and all(c is None for c in columns) else columns
    return leaf(trees)


def _median_leaf(values: list[Any]) -> Any:
    if all(_number(v) or v is None for v in values) and any(_number(v) for v in values):
        numbers = [v for v in values if v is not None]
        # None (say, "held the SLO at no rate") stands when most runs say it.
        return statistics.median(numbers) if len(numbers) * 2 >= len(values) else None
    keys = [repr(v) for v in values]
    return values[keys.index(Counter(keys).most_common(1)[0][0])]


def _spread_leaf(values: list[Any]) -> list[float] | None:
    numbers = [v for v in values if _number(v)]
    return [min(numbers), max(numbers)] if numbers else None


def table(result: dict[str, Any]) -> str:
    """The report of a repeated run: each run's policy figures, then median [min-max], then the
    targets judged on the medians."""
    from qllm.bench.report import fmt, grid, targets_table

    x = "{:.3g}x"
    head, spread = result["headline"], result.get("spread") or {}
    policies = list(head.get("by_policy", {}))
    rows = [["run", "policy vs fcfs", *(name for name, _ in FIGURES), "SLO held", "tok/s vs transformers-cb"]]
    for i, run in enumerate(result["runs"], 1):
        h = run["headline"]
        for name in policies:
            f = h.get("by_policy", {}).get(name, {})
            held = h.get("slo_held_at_every_rate", {}).get(name)
            rows.append([str(i), name, *(fmt(f.get(k), x) for _, k in FIGURES), _yes(held),
                         fmt(h.get("throughput_vs_transformers_cb"), x)])  # fmt: skip
    for name in policies:
        f, s = head["by_policy"][name], (spread.get("by_policy") or {}).get(name) or {}
        held = sum(bool(r["headline"].get("slo_held_at_every_rate", {}).get(name)) for r in result["runs"])
        rows.append(["median", name, *(_ranged(f.get(k), s.get(k)) for _, k in FIGURES),
                     f"{held}/{len(result['runs'])}",
                     _ranged(head.get("throughput_vs_transformers_cb"), spread.get("throughput_vs_transformers_cb"))])  # fmt: skip
    pooled = result.get("per_rate_median") or {}
    for name in policies:
        f = pooled.get(name) or {}
        rows.append(
            ["per-rate median", name, *(fmt(f.get(k), x) if k in f else "" for _, k in FIGURES), "", ""]
        )
    cfg = result["config"]
    return "\n".join([
        f"{result['repeat']} runs of: max_batch {cfg['max_batch']}  LS share {cfg['ls_share']:.0%}  seed {cfg['seed']}"
        "  (each run's own tables: qllm bench --report on its JSON)",
        "",
        grid(rows),
        "",
        targets_table(result["targets"]),
    ])  # fmt: skip


def _ranged(value: Any, span: Any) -> str:
    if value is None:
        return "-"
    if not span:
        return f"{value:.3g}x"
    return f"{value:.3g}x [{span[0]:.3g}-{span[1]:.3g}]"


def _yes(flag: Any) -> str:
    return "-" if flag is None else "yes" if flag else "no"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
