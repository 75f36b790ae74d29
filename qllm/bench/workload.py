"""LS/BE workload benchmark (the paper's experiment): Poisson arrivals, systems side by side.

Every system replays the same requests at each rate: qllm engines with ``fcfs`` (the baseline),
``qllm``, ``priority-aging`` and any installed policy plugin, and transformers' own continuous
batching (the external peer). Systems alternate within each rate, in an order rotated from rate to
rate, so that drift of the machine hits all alike. Reported per system, rate and class: TTFT
mean/p50/p99, turnaround mean/p99, LS SLO attainment, requests/s and tokens/s, preemptions and
queueing (arrival to first compute: for LS under a preemptive policy, the preemption latency);
then a ``headline`` of ratios over rates and the targets of the benchmark, met or missed. Among
them ``throughput_vs_transformers_cb``: output tokens/s of all requests (LS and BE) under ``fcfs``
divided by the peer's at the same rate, the minimum over rates (``_by_rate``: each rate's; None
when the peer or fcfs was not run), with the target >= 1.

The LS SLOs are on TTFT: ``--slo-k`` times the single-request decode step measured first on the
idle machine (10, as the paper), or ``--slo`` seconds; and on TPOT (time per output token after
the first): ``--tpot-slo-k`` times the same step (2), or ``--tpot-slo`` seconds. Each class reports
LS TPOT mean and p99 and each SLO's attainment; the headline, every system's LS TPOT and
turnaround over its isolated values and, with ``--systems ...,vllm`` (``vllm serve`` from
``--vllm-python``), the default policy against vLLM. ``--socket PATH`` (repeatable) measures
running ``qllm serve`` instances instead, end to end through the client library.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

from qllm.bench.peer_process import quiet_peers
from qllm.bench.plan import PEER, VLLM

if TYPE_CHECKING:
    from qllm.bench.systems import System
    from qllm.bench.trace import Item


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--model", default="small-random", help="preset name or model directory (default small-random)"
    )
    g.add_argument(
        "--rates",
        default="auto",
        help="comma-separated request rates (req/s), or 'auto': "
        "--auto-factors times the capacity that fcfs reaches on a closed batch (default auto)",
    )
    g.add_argument("--auto-factors", default="0.5,1,2,4", help="rates for --rates auto, in units of capacity")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--requests", type=int, help="requests per rate (default 32 unless --duration)")
    n.add_argument("--duration", type=float, help="seconds of arrivals per rate")
    g.add_argument(
        "--ls-share", type=float, default=0.2, help="share of latency-sensitive requests (default 0.2)"
    )
    g.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    g.add_argument(
        "--only-class",
        choices=["ls", "be"],
        help="keep only this class's requests of the workload, at the same arrival times: "
        "'ls' gives the LS latency that LS requests alone cause each other (no BE work)",
    )
    g.add_argument(
        "--trace", metavar="PATH", help="replay a JSON Lines trace instead (rescaled to --rates if given)"
    )
    g.add_argument(
        "--length-scale", type=float, default=0.05, help="multiplies the ShareGPT mean lengths (default 0.05)"
    )
    g.add_argument("--max-prompt", type=int, default=64, help="cap on prompt tokens (default 64)")
    g.add_argument("--max-output", type=int, default=48, help="cap on output tokens (default 48)")
    s = parser.add_argument_group("systems and SLO")
    s.add_argument(
        "--systems",
        help=f"comma-separated: qllm policies (NAME or module:Class, options as :key=value, e.g. "
        f"cohort:stretch=2) and/or the peers {PEER}, {VLLM} (default: every policy and {PEER})",
    )
    s.add_argument(
        "--vllm-python",
        metavar="PATH",
        help="interpreter of the vllm peer's venv (default: $QLLM_VLLM_PYTHON, else .venv-peers; "
        "`make peers` builds it)",
    )
    s.add_argument(
        "--vllm-eager",
        action="store_true",
        help="start vllm with --enforce-eager: minutes faster to start, slower to serve",
    )
    s.add_argument(
        "--max-batch", type=int, default=32, help="most requests per batch, every system (default 32)"
    )
    s.add_argument("--prefill-chunk", type=int, default=128, help="prefill chunk tokens (default 128)")
    s.add_argument(
        "--moe-granularity",
        choices=["layer", "expert"],
        default="layer",
        help="qllm systems: a MoE layer as one grouped op (layer, default) or one op per expert",
    )
    s.add_argument(
        "--expert-parallel",
        type=int,
        default=1,
        metavar="N",
        help="also run each qllm policy with its experts split across N ranks (POLICY@epN; each rank "
        "gets the machine's threads / N), side by side with one process (default 1: not run)",
    )
    s.add_argument(
        "--expert-window",
        type=int,
        default=4,
        metavar="N",
        help="with --expert-parallel: remote expert calls a MoE op posts ahead (default 4)",
    )
    s.add_argument(
        "--slo-k", type=float, default=10.0, help="LS TTFT SLO in single-request decode steps (default 10)"
    )
    s.add_argument("--slo", type=float, help="LS TTFT SLO in seconds (overrides --slo-k)")
    s.add_argument(
        "--tpot-slo-k",
        type=float,
        default=2.0,
        help="LS TPOT SLO (time per output token after the first) in single-request decode steps (default 2)",
    )
    s.add_argument("--tpot-slo", type=float, help="LS TPOT SLO in seconds (overrides --tpot-slo-k)")
    s.add_argument(
        "--isolated",
        type=int,
        help="LS requests timed alone on the idle engine, the yardstick of LS TTFT p99 / isolated "
        "(default: every LS request of the workload)",
    )
    s.add_argument(
        "--isolated-tries",
        type=int,
        default=3,
        help="runs of each isolated LS request; its TTFT is their median (default 3)",
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="cancel requests still running this long after the last arrival",
    )
    s.add_argument(
        "--socket", action="append", metavar="PATH", help="measure a running `qllm serve` (repeatable)"
    )
    s.add_argument(
        "--http",
        action="append",
        metavar="URL-OR-SOCKET",
        help="measure a running `qllm serve` through its HTTP API: http://HOST:PORT or the path of its "
        "HTTP socket (repeatable; with --socket, side by side)",
    )
    s.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole benchmark this many times in a row and report each figure's median "
        "and range over the runs (default 1)",
    )
    o = parser.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout); quiet otherwise")
    o.add_argument(
        "--plots", metavar="DIR", help="write PNG plots here (needs matplotlib: pip install qllm[bench])"
    )
    o.add_argument("--cdf-rate", type=float, help="rate of the TTFT CDF plot (default: the highest)")
    o.add_argument(
        "--report", metavar="JSON", help="print the table (and --plots) of a saved result; runs nothing"
    )


def run(args: argparse.Namespace) -> int:
    from qllm.bench import repeat, report

    if args.report:
        with open(args.report, encoding="utf-8") as f:
            result = summarize(json.load(f))
    else:
        if args.repeat < 1:
            raise ValueError("--repeat must be >= 1")
        _quiet_logs()
        import uvloop

        runs = [uvloop.run(_main(args)) for _ in range(args.repeat)]
        result = runs[0] if len(runs) == 1 else repeat.combine(runs)
    if args.json and not args.report:
        text = json.dumps(result)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    if not args.json or args.report:
        print(repeat.table(result) if "runs" in result else report.table(result))
    if args.plots:
        from qllm.bench import plots

        shown = result["runs"][0] if "runs" in result else result  # --repeat: the first run's
        written = plots.write(shown, args.plots, cdf_rate=args.cdf_rate)
        print(f"plots: {', '.join(written)}" if written else plots.MISSING, file=sys.stderr)
    return 0


def _quiet_logs() -> None:
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from qllm.bench import plan, probes, trace
    from qllm.bench.stats import ROW_FIELDS, rounded

    started = time.time()
    load_start = os.getloadavg()
    systems, model_info, model = await plan.systems(args)
    try:
        lengths = trace.Lengths.for_context(
            model_info.get("context") or 4096, args.length_scale, args.max_prompt, args.max_output
        )
        workload = plan.workload(args, lengths, model)
        warmup = probes.warmup_items(workload(1.0))
        for system in systems:  # first use of each code path and shape, not measured
            await system.run(warmup, timeout=args.timeout)
        probe = probes.yardstick_system(systems)
        await quiet_peers(systems)
        decode_step = await probes.decode_step(probe)
        slo = args.slo if args.slo is not None else args.slo_k * decode_step
        tpot_slo = args.tpot_slo if args.tpot_slo is not None else args.tpot_slo_k * decode_step
        rates, capacity = await plan.rates(args, systems, workload)
        # The same LS requests as the measured ones: the highest rate's workload holds every other
        # rate's (one seeded sequence, faster), also when --duration bounds it.
        alone = workload(max(rates))
        await quiet_peers(systems)
        isolated = await probes.isolated(probe, alone, args.isolated, slo, args.timeout, args.isolated_tries)
        peer_idle = {}
        for peer in (s for s in systems if s.kind == "peer"):  # its own yardsticks, same requests
            peer_idle[peer.name] = await probes.isolated(
                peer, alone, args.isolated, slo, args.timeout, args.isolated_tries
            )
            peer_idle[peer.name]["decode_step_s"] = await probes.decode_step(peer)
        cells = await _measure(systems, {r: workload(r) for r in rates}, slo, tpot_slo, args)
    finally:
        for system in systems:
            await system.close()
    return summarize(rounded({
        "bench": "workload",
        "mode": "socket" if args.socket or args.http else "in-process",
        "model": model_info,
        "machine": _machine(load_start),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": time.time() - started,
        "config": {
            "rates": rates, "capacity_probe_requests_per_s": capacity,
            "requests_per_rate": plan.requests_per_rate(args), "duration_s": args.duration, "trace": args.trace,
            "ls_share": args.ls_share, "only_class": args.only_class, "seed": args.seed, "lengths": lengths.__dict__,
            "max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk,
            "moe_granularity": args.moe_granularity, "timeout_s": args.timeout,
            "expert_parallel": args.expert_parallel,
            "expert_window": args.expert_window,
        },
        "slo": {"decode_step_s": decode_step, "k": None if args.slo is not None else args.slo_k, "ttft_s": slo,
                "tpot_k": None if args.tpot_slo is not None else args.tpot_slo_k, "tpot_s": tpot_slo,
                "measured_on": probe.name},
        "isolated": isolated,
        "peer_isolated": peer_idle,
        "systems": [s.describe() for s in systems],
        "cells": cells,
        "percentile_method": "linear interpolation between order statistics",
        "record_fields": list(ROW_FIELDS),
    }))  # fmt: skip


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with its ``headline`` and ``targets`` computed from its cells and yardsticks
    (also how ``--report`` brings a saved result up to the current definitions)."""
    from qllm.bench.stats import rounded
    from qllm.bench.summary import headline, targets

    if "runs" in result:  # --repeat: each run brought up to date, then combined again
        from qllm.bench.repeat import combine

        return combine([summarize(r) for r in result["runs"]])
    isolated = result["isolated"]
    idle = {s["name"]: isolated["ttft_mean_s"] for s in result["systems"] if s["kind"] != "peer"}
    idle.update({name: peer["ttft_mean_s"] for name, peer in result.get("peer_isolated", {}).items()})
    result = {**result, "cells": [_current(c, result["slo"]) for c in result["cells"]]}
    yardsticks = {
        s["name"]: _yardstick(isolated, result["slo"]) for s in result["systems"] if s["kind"] != "peer"
    }
    yardsticks.update({n: _yardstick(p, p) for n, p in result.get("peer_isolated", {}).items()})
    head = headline(
        result["systems"],
        result["cells"],
        isolated_p99=isolated["ttft_p99_s"],
        ls_share=result["config"]["ls_share"],
        idle_ttft=idle,
        isolated=yardsticks,
    )
    return {**result, "headline": rounded(head), "targets": rounded(targets(head))}


def _current(cell: dict[str, Any], slo: dict[str, Any]) -> dict[str, Any]:
    """``cell`` with its metrics recomputed from its records where they predate a figure (TPOT)."""
    from qllm.bench.stats import Record, cell_metrics

    if "tpot_mean_s" in cell["metrics"]["ls"] or "records" not in cell:
        return cell
    tpot_slo = slo.get("tpot_s") or 2.0 * slo["decode_step_s"]
    metrics = cell_metrics([Record.from_row(r) for r in cell["records"]], slo["ttft_s"], tpot_slo)
    return {**cell, "metrics": metrics}


def _yardstick(isolated: dict[str, Any], slo: dict[str, Any]) -> dict[str, Any]:
    """A system's isolated figures; where a result predates isolated TPOT, the single-request
    decode step stands for it (the same quantity, from one probe request)."""
    if isolated.get("tpot_mean_s") is not None or slo.get("decode_step_s") is None:
        return isolated
    step = slo["decode_step_s"]
    return {**isolated, "tpot_mean_s": step, "tpot_p99_s": step}


async def _measure(
    systems: list[System],
    by_rate: dict[float, list[Item]],
    slo: float,
    tpot_slo: float,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Every system on every rate's workload; the systems' order rotates from one rate to the next."""
    from qllm.bench.stats import cell_metrics

    cells = []
    with _progress(sum(map(len, by_rate.values())) * len(systems), quiet=bool(args.json)) as bar:
        for i, (rate, items) in enumerate(by_rate.items()):
            for system in systems[i % len(systems) :] + systems[: i % len(systems)]:
                await quiet_peers(systems)
                started = time.perf_counter()
                records = await system.run(items, slo_s=slo, timeout=args.timeout, on_done=bar)
                cells.append({
                    "system": system.name, "rate": rate, "wall_s": time.perf_counter() - started,
                    "metrics": cell_metrics(records, slo, tpot_slo), "records": [r.row() for r in records],
                    "kernel": getattr(system, "last_stats", None),
                })  # fmt: skip
    return cells


class _progress:
    """A progress bar of finished requests on a TTY (tqdm), nothing otherwise; calling it ticks."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> _progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self) -> None:
        if self.bar is not None:
            self.bar.update(1)


def _machine(load_start: tuple[float, ...]) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }
