"""What the kernel measures: its counters and op timings (:class:`KernelStats`), and per-class
request metrics (:class:`Metrics`), each behind ``snapshot()``.

:class:`KernelStats` counts batched ops, ops per request, rows, decisions and policy errors, and
times ops by kind and the gaps between them; the dispatcher records each step into it. The engine
holds one :class:`Metrics`, calls :meth:`Metrics.observe` with every finished request's result,
and puts :meth:`Metrics.snapshot` under ``stats()["metrics"]``. Snapshots are plain JSON-able
data, so they cross the wire unchanged; :mod:`qllm.server.prometheus` exports them with
prometheus_client on either side. Nothing here imports torch: ``qllm stats`` reads snapshots
without loading a model.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qllm.kernel.dispatcher import Dispatcher
    from qllm.kernel.request import Request, RequestResult
    from qllm.kernel.runner import StepResult
    from qllm.kernel.runtime.ops import OpKind


class Overhead:
    """Wall time outside ops: from the end of one batched op to the start of the next, while the
    kernel stays busy (decisions, resuming generators, hand-off to the compute thread)."""

    def __init__(self, size: int = 4096) -> None:
        self.samples: deque[float] = deque(maxlen=size)  # the most recent gaps
        self.count = 0

    def extend(self, gaps: Sequence[float]) -> None:
        self.samples.extend(gaps)
        self.count += len(gaps)

    def snapshot(self) -> dict[str, float | int | None]:
        ordered = sorted(self.samples)
        n = len(ordered)
        return {
            "count": self.count,
            "median_s": ordered[n // 2] if n else None,
            "p99_s": ordered[min(n - 1, int(0.99 * n))] if n else None,
        }


class OpTimes:
    """Wall time of batched ops by kind (count, total, max), hand-off to the compute thread included."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.total: dict[str, float] = {}
        self.max: dict[str, float] = {}

    def record(self, kind: OpKind, seconds: float) -> None:
        name = kind.name.lower()
        self.count[name] = self.count.get(name, 0) + 1
        self.total[name] = self.total.get(name, 0.0) + seconds
        self.max[name] = max(self.max.get(name, 0.0), seconds)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            name: {"count": n, "mean_s": self.total[name] / n, "max_s": self.max[name]}
            for name, n in self.count.items()
        }


class KernelStats:
    """The kernel's counters and op timings. ``progress`` only grows (a watchdog compares it between
    reads); everything else starts again at :meth:`reset`."""

    def __init__(self) -> None:
        self.progress = 0  # batched ops completed since the kernel started
        self.reset()

    def reset(self) -> None:
        """Count from now on (a benchmark measures one phase of a run); ``progress`` is kept."""
        self.batches = 0  # batched ops run
        self.ops = 0  # ops run, one per request in each batched op
        self.rows = 0  # rows computed by batched ops
        self.decisions = 0  # batches chosen by the policy (a steady pass runs ops without one)
        self.policy_errors = 0  # policy calls that raised or answered with an invalid batch
        self.op_times = OpTimes()
        self.overhead = Overhead()

    def record_step(self, result: StepResult, members: int) -> None:
        """A pass of ``members`` requests ran the ops of ``result``."""
        for timing in result.timings:
            self.op_times.record(timing.kind, timing.seconds)
            self.rows += timing.rows
        self.overhead.extend(result.gaps)
        n = len(result.timings)
        self.batches += n
        self.ops += n * members
        self.progress += n

    def snapshot(self) -> dict[str, Any]:
        """JSON-able copy of the counters, the gaps between ops and the op times by kind."""
        return {
            "batches": self.batches,
            "ops": self.ops,
            "rows": self.rows,
            "policy_errors": self.policy_errors,
            "decisions": self.decisions,
            "overhead": self.overhead.snapshot(),
            "op_times": self.op_times.snapshot(),
        }


class Tracer:
    """Sees every kernel of the process at work, for benchmark traces (``scripts/bench_trace.py``).

    Add one to :data:`TRACERS`. Its methods run on the event loop: :meth:`stepped` after a pass's
    ops ran and before their results are handed on, :meth:`finished` with each result. A tracer
    must not change what it is shown; the methods here do nothing."""

    def stepped(self, kernel: Dispatcher, members: Sequence[Request], result: StepResult) -> None:
        """The pass of ``members`` ran the ops of ``result``."""

    def finished(self, kernel: Dispatcher, result: RequestResult) -> None:
        """A request finished with ``result``."""


TRACERS: list[Tracer] = []
"""The tracers every kernel calls (none unless a benchmark adds one)."""


# ---------------------------------------------------------------- per-request metrics
CLASSES = ("ls", "be")
STATUSES = ("stopped", "length", "aborted", "error")

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# name -> (help text, buckets). Latencies are seconds; "tokens" is tokens generated per request.
HISTOGRAMS: dict[str, tuple[str, Sequence[float]]] = {
    "ttft_seconds": ("Arrival to first token.", LATENCY_BUCKETS),
    "queue_seconds": ("Arrival to first scheduled op.", LATENCY_BUCKETS),
    "turnaround_seconds": ("Arrival to finish.", LATENCY_BUCKETS),
    "tpot_seconds": (
        "Time per output token after the first (requests of two tokens or more).",
        LATENCY_BUCKETS,
    ),
    "preemption_latency_seconds": (
        "Arrival to first scheduled op of a request, the wait before it preempts running work.",
        LATENCY_BUCKETS,
    ),
    "preemptions": ("Times a request was preempted.", COUNT_BUCKETS),
    "tokens": ("Tokens generated per request.", COUNT_BUCKETS),
}
COUNTERS: dict[str, str] = {
    "prompt_tokens": "Prompt tokens of finished requests.",
    "generated_tokens": "Tokens generated by finished requests.",
    "preemptions": "Preemptions of finished requests.",
    "ttft_slo_met": "Finished requests with a TTFT SLO whose first token came within it.",
    "ttft_slo_missed": "Finished requests with a TTFT SLO whose first token came late or never.",
    "tpot_slo_met": "Finished requests with a TPOT SLO and two tokens or more whose TPOT was within it.",
    "tpot_slo_missed": "Finished requests with a TPOT SLO and two tokens or more whose TPOT exceeded it.",
}


class Finished(Protocol):
    """What :meth:`Metrics.observe` reads of a ``RequestResult``."""

    status: str
    priority: str
    prompt_tokens: int
    token_ids: Sequence[int]
    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float
    token_times: Sequence[float]
    preemptions: int
    ttft_slo: float | None
    tpot_slo: float | None


def tpot(result: Finished) -> float | None:
    """Time per output token after the first: first to last token over the gaps (None: < 2 tokens)."""
    times = result.token_times
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: bucket ``le`` counts values <= le)."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound (+Inf only)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        cumulative, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            cumulative.append([bound, running])
        return {"count": self.count, "sum": self.sum, "buckets": cumulative}


class _ClassMetrics:
    def __init__(self) -> None:
        self.requests = dict.fromkeys(STATUSES, 0)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.histograms = {name: Histogram(buckets) for name, (_, buckets) in HISTOGRAMS.items()}

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            **self.counters,
            "histograms": {name: h.snapshot() for name, h in self.histograms.items()},
        }


class Metrics:
    """Counters and histograms per priority class (``ls``, ``be``) over finished requests."""

    def __init__(self) -> None:
        self._classes = {c: _ClassMetrics() for c in CLASSES}

    def observe(self, result: Finished) -> None:
        """Account one finished request."""
        m = self._classes.get(result.priority)
        if m is None:
            raise ValueError(f"unknown priority class {result.priority!r}; expected one of {CLASSES}")
        m.requests[result.status] = m.requests.get(result.status, 0) + 1
        m.counters["prompt_tokens"] += result.prompt_tokens
        m.counters["generated_tokens"] += len(result.token_ids)
        m.counters["preemptions"] += result.preemptions
        h = m.histograms
        h["turnaround_seconds"].observe(result.finished - result.arrival)
        h["preemptions"].observe(result.preemptions)
        h["tokens"].observe(len(result.token_ids))
        if result.first_token is not None:
            h["ttft_seconds"].observe(result.first_token - result.arrival)
        if result.ttft_slo is not None:
            met = result.first_token is not None and result.first_token - result.arrival <= result.ttft_slo
            m.counters["ttft_slo_met" if met else "ttft_slo_missed"] += 1
        per_token = tpot(result)
        if per_token is not None:
            h["tpot_seconds"].observe(per_token)
            if result.tpot_slo is not None:
                m.counters["tpot_slo_met" if per_token <= result.tpot_slo else "tpot_slo_missed"] += 1
        if result.first_scheduled is not None:
            waited = result.first_scheduled - result.arrival
            h["queue_seconds"].observe(waited)
            h["preemption_latency_seconds"].observe(waited)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able copy: ``{class: {"requests": {status: n}, counters..., "histograms": {...}}}``."""
        return {c: m.snapshot() for c, m in self._classes.items()}


def quantile(hist: Mapping[str, Any], q: float) -> float | None:
    """Estimate the ``q`` quantile of a histogram snapshot by linear interpolation in its bucket.

    Returns None for an empty histogram, and the highest finite bound when the quantile lies in
    the +Inf bucket (as Prometheus ``histogram_quantile`` does).
    """
    total = hist["count"]
    if not total:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0
    for bound, cumulative in hist["buckets"]:
        if cumulative >= rank:
            if cumulative == lower_count:
                return float(bound)
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (cumulative - lower_count)
        lower_bound, lower_count = bound, cumulative
    return float(hist["buckets"][-1][0]) if hist["buckets"] else None
