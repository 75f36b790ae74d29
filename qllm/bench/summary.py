"""The workload benchmark's headline: side-by-side ratios over rates, and the issue's targets.

Roles: the **baseline** is the system running the ``fcfs`` policy; the **candidates** are the other
qllm systems (``qllm``, ``priority-aging``, plugins); the **peer** is transformers' continuous
batching; **vllm** is ``vllm serve`` with its priority scheduler. Each candidate gets its ratios
against the baseline at every rate; the headline reports the candidate with the best mean LS TTFT
ratio (named in ``best_policy``) and every candidate under ``by_policy``.

Against vLLM the headline compares **ours**: the system running the default policy (``cohort``),
else the best candidate. Each ``*_vs_vllm`` figure is its ``_by_rate`` list's worst rate, written
so that more is better for qllm: output tokens/s ours / vLLM's; LS TTFT mean and p99 and LS
turnaround mean vLLM's / ours. Every system (peers too) gets its LS TPOT and turnaround over its
own isolated values (``by_system``; ``ls_tpot_over_isolated``: the LS TPOT mean over the isolated
one, the worst rate), and its TTFT and TPOT SLO attainment by rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from qllm.bench.stats import mean, ratio

DEFAULT_POLICY = "cohort"
"""The policy of ``qllm serve`` without ``--policy`` (a test keeps it equal to qllm.policies')."""
SLO_ATTAINMENT = 0.9
"""A rate "holds the SLO" when at least this share of its LS requests got their first token in time."""


def _value(cells: Sequence[dict], system: str, rate: float, cls: str, key: str) -> float | None:
    for c in cells:
        if c["system"] == system and c["rate"] == rate:
            return c["metrics"][cls].get(key)
    return None


def _over_rates(rates: Sequence[float], f: Callable[[float], float | None]) -> list[float | None]:
    return [f(r) for r in rates]


def _agg(values: list[float | None], how: Callable[[list[float]], float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return how(present) if present else None


def slo_max_rate(cells: Sequence[dict], system: str, rates: Sequence[float]) -> float | None:
    """Highest rate up to which every tested rate met the LS SLO (None: not even the lowest)."""
    best = None
    for r in sorted(rates):
        attained = _value(cells, system, r, "ls", "slo_attainment")
        if attained is None or attained < SLO_ATTAINMENT:
            break
        best = r
    return best


def _policy_figures(
    cells: Sequence[dict], base: str, system: str, rates: Sequence[float], isolated_p99: float | None
) -> dict[str, Any]:
    def per_rate(cls: str, key: str, inverse: bool = False) -> list[float | None]:
        def f(r: float) -> float | None:
            b, s = _value(cells, base, r, cls, key), _value(cells, system, r, cls, key)
            return ratio(s, b) if inverse else ratio(b, s)

        return _over_rates(rates, f)

    ttft = per_rate("ls", "ttft_mean_s")
    turnaround = per_rate("ls", "turnaround_mean_s")
    be_tokens = per_rate("be", "tokens_per_s", inverse=True)
    be_jobs = per_rate("be", "requests_per_s", inverse=True)
    be_turnaround = per_rate("be", "turnaround_mean_s", inverse=True)
    be_ttft = per_rate("be", "ttft_mean_s", inverse=True)
    p99_over_isolated = _over_rates(
        rates, lambda r: ratio(_value(cells, system, r, "ls", "ttft_p99_s"), isolated_p99)
    )
    return {
        "be_throughput_ratio_by_rate": be_tokens,
        "be_turnaround_ratio_by_rate": be_turnaround,
        "ls_ttft_p99_over_isolated_by_rate": p99_over_isolated,
        "ls_ttft_ratio_by_rate": ttft,
        "ls_ttft_ratio_mean": _agg(ttft, mean),
        "ls_ttft_ratio_max": _agg(ttft, max),
        "ls_turnaround_ratio_max": _agg(turnaround, max),
        "be_throughput_ratio": _agg(be_tokens, min),
        "be_jobs_ratio": _agg(be_jobs, min),
        "be_turnaround_ratio_mean": _agg(be_turnaround, mean),
        "be_turnaround_ratio_max": _agg(be_turnaround, max),
        "be_ttft_ratio_mean": _agg(be_ttft, mean),
        "be_ttft_ratio_max": _agg(be_ttft, max),
        "ls_ttft_p99_over_isolated": _agg(p99_over_isolated, max),
        "ls_queue_p99_s": _agg(
            _over_rates(rates, lambda r: _value(cells, system, r, "ls", "queue_p99_s")), max
        ),
    }


def system_figures(
    cells: Sequence[dict], system: str, rates: Sequence[float], isolated: dict[str, Any] | None
) -> dict[str, Any]:
    """LS TPOT (mean, p99) and turnaround over ``system``'s own isolated values (``isolated``: its
    yardsticks, :func:`qllm.bench.probes.isolated`), and SLO attainment, by rate and the worst."""
    iso = isolated or {}

    def over(key: str, base: float | None) -> list[float | None]:
        return _over_rates(rates, lambda r: ratio(_value(cells, system, r, "ls", key), base))

    def attained(key: str) -> list[float | None]:
        return _over_rates(rates, lambda r: _value(cells, system, r, "ls", key))

    tpot = over("tpot_mean_s", iso.get("tpot_mean_s"))
    tpot_p99 = over("tpot_p99_s", iso.get("tpot_p99_s"))
    turnaround = over("turnaround_mean_s", iso.get("turnaround_mean_s"))
    ttft_slo, tpot_slo = attained("ttft_slo_attainment"), attained("tpot_slo_attainment")
    return {
        "ls_tpot_mean_s_by_rate": attained("tpot_mean_s"),
        "ls_tpot_p99_s_by_rate": attained("tpot_p99_s"),
        "ls_tpot_over_isolated_by_rate": tpot,
        "ls_tpot_over_isolated": _agg(tpot, max),
        "ls_tpot_p99_over_isolated_by_rate": tpot_p99,
        "ls_tpot_p99_over_isolated": _agg(tpot_p99, max),
        "ls_turnaround_over_isolated_by_rate": turnaround,
        "ls_turnaround_over_isolated": _agg(turnaround, max),
        "ls_ttft_slo_attainment_by_rate": ttft_slo,
        "ls_ttft_slo_attainment": _agg(ttft_slo, min),
        "ls_tpot_slo_attainment_by_rate": tpot_slo,
        "ls_tpot_slo_attainment": _agg(tpot_slo, min),
    }


def expert_parallel_figures(
    systems: Sequence[dict], cells: Sequence[dict], rates: Sequence[float], isolated_p99: float | None
) -> dict[str, Any] | None:
    """Each ``POLICY@epN`` system against the same policy in one process: output tokens/s over
    the one process's (``_by_rate``; the figure is the worst rate), LS TTFT p99 over the isolated
    p99 (one process's isolated runs: the yardstick of both) for both, and the expert weight bytes
    each rank held. None without such systems."""
    split = [s for s in systems if (s.get("expert_parallel") or 1) > 1]
    if not split:
        return None
    out = {}
    for s in split:
        name, one = s["name"], s["policy"]

        def tokens(r: float, name: str = name, one: str = one) -> float | None:
            return ratio(
                _value(cells, name, r, "all", "tokens_per_s"), _value(cells, one, r, "all", "tokens_per_s")
            )

        def p99(system: str) -> list[float | None]:
            return _over_rates(
                rates, lambda r: ratio(_value(cells, system, r, "ls", "ttft_p99_s"), isolated_p99)
            )

        throughput = _over_rates(rates, tokens)
        held = next(
            (c["kernel"]["expert_parallel"] for c in cells if c["system"] == name and c.get("kernel")), {}
        )
        out[name] = {
            "ranks": s["expert_parallel"],
            "threads_per_rank": s.get("threads_per_rank"),
            "expert_bytes_by_rank": held.get("expert_bytes"),
            "throughput_vs_one_process": _agg(throughput, min),
            "throughput_vs_one_process_by_rate": throughput,
            "ls_ttft_p99_over_isolated_by_rate": {"1": p99(one), str(s["expert_parallel"]): p99(name)},
            "remote_wait_per_moe_op_s": held.get("remote_wait_per_moe_op_s"),
            "bytes_per_token": held.get("bytes_per_token"),
        }
    return out


def vllm_figures(cells: Sequence[dict], ours: str, vllm: str, rates: Sequence[float]) -> dict[str, Any]:
    """``ours`` against ``vllm`` at each rate and at the worst rate, more is better for ours."""

    def versus(cls: str, key: str, ours_over_theirs: bool = False) -> list[float | None]:
        def f(r: float) -> float | None:
            a, b = _value(cells, ours, r, cls, key), _value(cells, vllm, r, cls, key)
            return ratio(a, b) if ours_over_theirs else ratio(b, a)

        return _over_rates(rates, f)

    out: dict[str, Any] = {}
    for name, cls, key, forward in (
        ("throughput_vs_vllm", "all", "tokens_per_s", True),
        ("ls_ttft_mean_vs_vllm", "ls", "ttft_mean_s", False),
        ("ls_ttft_p99_vs_vllm", "ls", "ttft_p99_s", False),
        ("ls_turnaround_vs_vllm", "ls", "turnaround_mean_s", False),
        ("ls_tpot_vs_vllm", "ls", "tpot_mean_s", False),
    ):
        by_rate = versus(cls, key, forward)
        out[name] = _agg(by_rate, min)
        out[f"{name}_by_rate"] = by_rate
    return out


VLLM_KEYS = ("throughput_vs_vllm", "ls_ttft_mean_vs_vllm", "ls_ttft_p99_vs_vllm", "ls_turnaround_vs_vllm",
             "ls_tpot_vs_vllm")  # fmt: skip


def headline(
    systems: Sequence[dict],
    cells: Sequence[dict],
    *,
    isolated_p99: float | None,
    ls_share: float,
    idle_ttft: dict[str, float] | None = None,
    isolated: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Ratios over rates (see the module doc); a missing role leaves its figures None.

    ``idle_ttft``: each system's mean LS TTFT alone on the idle machine, by name (for qllm systems
    the same executor's). With it, ``fcfs_vs_transformers_cb_normalized`` compares the two FCFS
    schedulers with each one's TTFT in units of its own idle TTFT, so that a difference in raw
    compute speed (kernels) cancels out and queueing is what remains.
    ``throughput_vs_transformers_cb`` is fcfs output tokens/s of all requests (LS and BE) over the
    peer's at each rate (``_by_rate``), its minimum over rates: raw serving speed, kernels included.
    """
    rates = sorted({c["rate"] for c in cells})
    names = [s["name"] for s in systems]
    base = next((s["name"] for s in systems if s["policy"] == "fcfs"), None)
    candidates = [s["name"] for s in systems if s["kind"] != "peer" and s["policy"] != "fcfs"]
    vllm = next((s["name"] for s in systems if s["kind"] == "peer" and s["name"] == "vllm"), None)
    peer = next((s["name"] for s in systems if s["kind"] == "peer" and s["name"] != vllm), None)

    by_policy = {c: _policy_figures(cells, base, c, rates, isolated_p99) for c in candidates} if base else {}
    best = max(by_policy, key=lambda c: by_policy[c]["ls_ttft_ratio_mean"] or 0.0, default=None)
    figures = by_policy.get(best, {})

    peer_ratio = normalized = throughput = None
    if base and peer:
        idle = idle_ttft or {}

        def ttft(system: str, r: float) -> float | None:
            return _value(cells, system, r, "all", "ttft_mean_s")

        def tokens(system: str, r: float) -> float | None:
            return _value(cells, system, r, "all", "tokens_per_s")

        peer_ratio = _over_rates(rates, lambda r: ratio(ttft(base, r), ttft(peer, r)))
        normalized = _over_rates(
            rates, lambda r: ratio(ratio(ttft(base, r), idle.get(base)), ratio(ttft(peer, r), idle.get(peer)))
        )
        throughput = _over_rates(rates, lambda r: ratio(tokens(base, r), tokens(peer, r)))
    # The machine's capacity is at least the best completion rate seen; LS alone saturates it at
    # ``capacity / ls_share`` total requests/s (a lower bound when no run was saturated).
    capacity = max((c["metrics"]["all"]["requests_per_s"] or 0.0 for c in cells), default=0.0)
    ls_saturation = capacity / ls_share if ls_share > 0 and capacity > 0 else None
    slo_rates = {n: slo_max_rate(cells, n, rates) for n in names}
    by_system = {n: system_figures(cells, n, rates, (isolated or {}).get(n)) for n in names}
    ours = next(
        (s["name"] for s in systems if s["name"] in candidates and s["policy"] == DEFAULT_POLICY), best
    )
    versus_vllm = vllm_figures(cells, ours, vllm, rates) if ours and vllm else {}
    return {
        "rates": rates,
        "baseline": base,
        "best_policy": best,
        "peer": peer,
        "ls_ttft_ratio_mean": figures.get("ls_ttft_ratio_mean"),
        "ls_ttft_ratio_max": figures.get("ls_ttft_ratio_max"),
        "slo_max_rate": slo_rates,
        "ls_turnaround_ratio_max": figures.get("ls_turnaround_ratio_max"),
        "be_throughput_ratio": figures.get("be_throughput_ratio"),
        "be_jobs_ratio": figures.get("be_jobs_ratio"),
        "be_turnaround_ratio_mean": figures.get("be_turnaround_ratio_mean"),
        "be_ttft_ratio_mean": figures.get("be_ttft_ratio_mean"),
        "ls_ttft_p99_over_isolated": figures.get("ls_ttft_p99_over_isolated"),
        "fcfs_vs_transformers_cb": _agg(peer_ratio, mean) if peer_ratio else None,
        "fcfs_vs_transformers_cb_by_rate": peer_ratio,
        "fcfs_vs_transformers_cb_normalized": _agg(normalized, mean) if normalized else None,
        "throughput_vs_transformers_cb": _agg(throughput, min) if throughput else None,
        "throughput_vs_transformers_cb_by_rate": throughput,
        "capacity_requests_per_s": capacity or None,
        "ls_saturation_rate": ls_saturation,
        "slo_rate_over_ls_saturation": ratio(slo_rates.get(best), ls_saturation) if best else None,
        "slo_held_at_every_rate": {n: bool(rates) and slo_rates[n] == rates[-1] for n in names},
        "ours": ours,
        "vllm": vllm,
        **{k: versus_vllm.get(k) for k in VLLM_KEYS},
        "vs_vllm_by_rate": {k: versus_vllm.get(f"{k}_by_rate") for k in VLLM_KEYS} if versus_vllm else None,
        "ls_tpot_over_isolated": {n: f["ls_tpot_over_isolated"] for n, f in by_system.items()},
        "ls_tpot_p99_over_isolated": {n: f["ls_tpot_p99_over_isolated"] for n, f in by_system.items()},
        "ls_turnaround_over_isolated": {n: f["ls_turnaround_over_isolated"] for n, f in by_system.items()},
        "ls_tpot_slo_attainment": {n: f["ls_tpot_slo_attainment"] for n, f in by_system.items()},
        "ls_ttft_slo_attainment": {n: f["ls_ttft_slo_attainment"] for n, f in by_system.items()},
        "by_policy": by_policy,
        "by_system": by_system,
        "expert_parallel": expert_parallel_figures(systems, cells, rates, isolated_p99),
    }


TARGETS = (
    # (headline key, comparison, bound, what the paper reports)
    ("ls_ttft_ratio_mean", ">=", 100.0, "65.2x mean, 101.6x max"),
    ("ls_ttft_p99_over_isolated", "<=", 1.5, "not reported"),
    ("slo_rate_over_ls_saturation", ">=", 0.9, "SLO held up to 7 req/s; baseline never"),
    ("be_throughput_ratio", ">=", 1.0, "comparable or slightly higher"),
    ("be_turnaround_ratio_mean", "<=", 1.2, "1.38x mean, 2.04x peak"),
    ("fcfs_vs_transformers_cb", "within", (0.9, 1.1), "baseline is TGI"),
    ("throughput_vs_transformers_cb", ">=", 1.0, "not reported"),
    ("ours_ls_tpot_over_isolated", "<=", 2.0, "not reported"),
    ("throughput_vs_vllm", ">=", 1.0, "not reported"),
    ("ls_ttft_mean_vs_vllm", ">=", 4.0, "not reported"),
    ("ls_turnaround_vs_vllm", ">=", 1.0, "12.8x lower than its baseline (turnaround)"),
)


def targets(head: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met (None: not measured)."""
    out = []
    for key, op, bound, paper in TARGETS:
        if key == "ours_ls_tpot_over_isolated":
            value, note = (head.get("ls_tpot_over_isolated") or {}).get(head.get("ours")), None
        else:
            value, note = head.get(key), None
        if value is None:
            met = None
        elif op == ">=":
            met = value >= bound
        elif op == "<=":
            met = value <= bound
        else:
            met = bound[0] <= value <= bound[1]
        held = head.get("slo_held_at_every_rate", {}).get(head.get("best_policy"))
        if key == "slo_rate_over_ls_saturation" and met is False and held:
            met, note = None, "SLO held at every tested rate: test higher rates"
        out.append(
            {"name": key, "target": f"{op} {bound}", "value": value, "met": met, "paper": paper, "note": note}
        )
    return out
