"""Metric maths shared by the benchmarks: percentiles, per-request records, per-class summaries."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) with linear interpolation between order statistics; None if empty."""
    values = sorted(values)
    if not values:
        return None
    if not 0 <= q <= 1:
        raise ValueError("q must be in [0, 1]")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def rounded(x: Any, digits: int = 6) -> Any:
    """``x`` with every float rounded (recursively through dicts and lists), for JSON output."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v, digits) for v in x]
    return x


@dataclass(frozen=True)
class Record:
    """What happened to one request. Times are seconds from the start of its run (None: never)."""

    cls: str  # "ls" | "be"
    arrival: float
    first_scheduled: float | None  # its first compute (None where the system does not say)
    first_token: float | None
    finished: float | None  # None: it did not complete
    prompt_tokens: int
    output_tokens: int
    preemptions: int = 0
    inter_token_s: float | None = None  # mean gap between its tokens

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def turnaround(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: first token to finish over the tokens after it
        (None: fewer than two tokens, or not finished)."""
        if self.finished is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)

    @property
    def queue(self) -> float | None:
        """Arrival to first compute: for an LS request under a preemptive policy, the preemption latency."""
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    def row(self) -> list:
        """Compact JSON form (see :data:`ROW_FIELDS`)."""
        return [
            self.cls, self.arrival, self.first_scheduled, self.first_token, self.finished,
            self.prompt_tokens, self.output_tokens, self.preemptions,
        ]  # fmt: skip

    @classmethod
    def from_row(cls, row: Sequence) -> Record:
        return cls(*row)


ROW_FIELDS = (
    "class",
    "arrival",
    "first_scheduled",
    "first_token",
    "finished",
    "prompt_tokens",
    "output_tokens",
    "preemptions",
)


def class_metrics(
    records: Sequence[Record], slo_s: float | None, tpot_slo_s: float | None = None
) -> dict[str, Any]:
    """Latency, SLO attainment, throughput and preemption figures of a set of requests.

    SLO attainment counts every request: one that never produced a token misses
    (``slo_attainment`` is the TTFT SLO's, ``ttft_slo_attainment`` the same figure under its own
    name). ``tpot_slo_attainment`` counts the requests whose TPOT (:attr:`Record.tpot`) is within
    ``tpot_slo_s``: one that did not finish misses, one with a single token has no TPOT to miss.
    Throughput is over the window from time 0 (the start of the run) to the last completion.
    """
    done = [r for r in records if r.finished is not None]
    ttft = [r.ttft for r in records if r.ttft is not None]
    turnaround = [r.turnaround for r in done]
    queue = [r.queue for r in records if r.queue is not None]
    window = max((r.finished for r in done), default=0.0)
    tokens = sum(r.output_tokens for r in done)
    within = sum(1 for t in ttft if slo_s is not None and t <= slo_s)
    tpot = [r.tpot for r in done if r.tpot is not None]
    judged = [r for r in records if r.finished is None or r.output_tokens >= 2]
    tpot_within = sum(1 for t in tpot if tpot_slo_s is not None and t <= tpot_slo_s)
    ttft_attainment = within / len(records) if records and slo_s is not None else None
    return {
        "requests": len(records),
        "completed": len(done),
        "ttft_mean_s": mean(ttft),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "ttft_max_s": max(ttft, default=None),
        "turnaround_mean_s": mean(turnaround),
        "turnaround_p99_s": percentile(turnaround, 0.99),
        "inter_token_mean_s": mean(r.inter_token_s for r in done if r.inter_token_s is not None),
        "tpot_mean_s": mean(tpot),
        "tpot_p50_s": percentile(tpot, 0.5),
        "tpot_p99_s": percentile(tpot, 0.99),
        "slo_attainment": ttft_attainment,
        "ttft_slo_attainment": ttft_attainment,
        "tpot_slo_attainment": tpot_within / len(judged) if judged and tpot_slo_s is not None else None,
        "requests_per_s": len(done) / window if window > 0 else None,
        "tokens_per_s": tokens / window if window > 0 else None,
        "preemptions": sum(r.preemptions for r in records),
        "preempted_requests": sum(1 for r in records if r.preemptions),
        "queue_mean_s": mean(queue),
        "queue_p50_s": percentile(queue, 0.5),
        "queue_p99_s": percentile(queue, 0.99),
    }


def cell_metrics(
    records: Sequence[Record], slo_s: float | None, tpot_slo_s: float | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`class_metrics` for LS, BE and all requests of one run."""
    return {
        "ls": class_metrics([r for r in records if r.cls == "ls"], slo_s, tpot_slo_s),
        "be": class_metrics([r for r in records if r.cls == "be"], slo_s, tpot_slo_s),
        "all": class_metrics(records, slo_s, tpot_slo_s),
    }
