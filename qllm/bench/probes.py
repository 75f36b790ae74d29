"""Yardsticks measured on the idle machine before the workload: warm-up, the single-request
decode step (it sets the LS SLO), the isolated LS TTFT, and the capacity behind ``--rates auto``."""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from qllm.bench.stats import mean, percentile
from qllm.bench.trace import FIRST_ID, Item

if TYPE_CHECKING:
    from qllm.bench.systems import System

DECODE_PROBE_TOKENS = 9
"""Tokens of the lone request whose token gaps give the decode step (8 gaps)."""


def warmup_items(items: list[Item]) -> list[Item]:
    """The workload's first requests, all at once, at most 4 tokens each (not measured)."""
    return [replace(i, arrival_s=0.0, output_len=min(4, i.output_len)) for i in items[:4]]


def yardstick_system(systems: list[System]) -> System:
    """Where the idle-machine yardsticks are measured: a qllm system, preferably not fcfs."""
    ours = [s for s in systems if s.kind != "peer"] or systems
    return next((s for s in ours if s.policy != "fcfs"), ours[0])


async def decode_step(system: System) -> float:
    """Median single-request decode step: the mean token gap of a lone request, 3 tries."""
    item = Item(0.0, "ls", 16, DECODE_PROBE_TOKENS, tuple(range(FIRST_ID, FIRST_ID + 16)))
    steps = []
    for _ in range(3):
        (record,) = await system.run([item], timeout=None)
        steps.append(record.inter_token_s)
    return statistics.median(s for s in steps if s is not None)


async def isolated(
    system: System, items: list[Item], n: int | None, slo: float, timeout: float, tries: int = 3
) -> dict[str, Any]:
    """TTFT, TPOT and turnaround of the workload's LS requests (the first ``n``; None: all of
    them), each alone on the idle system: each figure the median of ``tries`` runs, so that one
    slow run does not set the yardstick."""
    if tries < 1:
        raise ValueError("tries must be >= 1")
    ttfts, tpots, turnarounds = [], [], []
    for item in [i for i in items if i.cls == "ls"][:n]:
        runs, tpot, turnaround = [], [], []
        for _ in range(tries):
            (record,) = await system.run([replace(item, arrival_s=0.0)], slo_s=slo, timeout=timeout)
            if record.ttft is not None:
                runs.append(record.ttft)
            if record.tpot is not None:
                tpot.append(record.tpot)
            if record.turnaround is not None:
                turnaround.append(record.turnaround)
        if runs:
            ttfts.append(statistics.median(runs))
        if tpot:
            tpots.append(statistics.median(tpot))
        if turnaround:
            turnarounds.append(statistics.median(turnaround))
    return {
        "measured_on": system.name,
        "requests": len(ttfts),
        "tries": tries,
        "ttft_s": ttfts,
        "ttft_mean_s": mean(ttfts),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "tpot_s": tpots,
        "tpot_mean_s": mean(tpots),
        "tpot_p99_s": percentile(tpots, 0.99),
        "turnaround_mean_s": mean(turnarounds),
    }


async def capacity(system: System, items: list[Item], timeout: float) -> float:
    """Requests/s of ``items`` submitted all at once (a closed batch): completed / makespan."""
    records = await system.run([replace(i, arrival_s=0.0) for i in items], timeout=timeout)
    end = max((r.finished for r in records if r.finished is not None), default=0.0)
    if end <= 0:
        raise RuntimeError("the capacity probe completed no request; give --rates")
    return len(items) / end
