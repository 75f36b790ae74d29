"""Per-class metrics: what observe() counts, the snapshot's shape, and the Prometheus text."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qllm.kernel.stats import Histogram, Metrics, quantile
from qllm.server.prometheus import exposition


@dataclass
class Result:
    priority: str = "be"
    status: str = "length"
    prompt_tokens: int = 5
    token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    arrival: float = 100.0
    first_scheduled: float | None = 100.002
    first_token: float | None = 100.01
    finished: float = 100.5
    preemptions: int = 0
    token_times: list[float] = field(default_factory=list)
    ttft_slo: float | None = None
    tpot_slo: float | None = None


def test_observe_counts_per_class():
    m = Metrics()
    m.observe(Result(priority="ls", status="stopped", preemptions=0))
    m.observe(Result(priority="be", preemptions=3, token_ids=[1] * 10))
    m.observe(Result(priority="be", status="aborted", first_token=None, first_scheduled=None, token_ids=[]))
    snap = m.snapshot()
    assert snap["ls"]["requests"] == {"stopped": 1, "length": 0, "aborted": 0, "error": 0}
    assert snap["be"]["requests"] == {"stopped": 0, "length": 1, "aborted": 1, "error": 0}
    assert snap["be"]["generated_tokens"] == 10
    assert snap["be"]["prompt_tokens"] == 10
    assert snap["be"]["preemptions"] == 3
    be = snap["be"]["histograms"]
    assert be["turnaround_seconds"]["count"] == 2
    # A request that never got a token or an op adds to neither TTFT nor queue time.
    assert be["ttft_seconds"]["count"] == 1
    assert be["queue_seconds"]["count"] == 1
    assert be["queue_seconds"]["sum"] == pytest.approx(0.002)
    assert snap["ls"]["histograms"]["ttft_seconds"]["sum"] == pytest.approx(0.01)
    json.dumps(snap)  # JSON-able: it crosses the wire as is


def test_observe_rejects_unknown_class():
    with pytest.raises(ValueError, match="priority class"):
        Metrics().observe(Result(priority="urgent"))


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram([1, 2, 4])
    for v in (0.5, 1, 1.5, 4, 9):
        h.observe(v)
    snap = h.snapshot()
    assert snap["buckets"] == [[1, 2], [2, 3], [4, 4]]  # le=1 holds 0.5 and 1.0
    assert snap["count"] == 5
    assert snap["sum"] == pytest.approx(16.0)


def test_quantile_interpolates_within_a_bucket():
    h = Histogram([1.0, 2.0])
    for v in (1.2, 1.4, 1.6, 1.8):
        h.observe(v)
    assert quantile(h.snapshot(), 0.5) == pytest.approx(1.5)
    assert quantile(Histogram([1.0]).snapshot(), 0.5) is None


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, read by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_exposition_parses_with_every_metric():
    m = Metrics()
    m.observe(Result(priority="ls", status="stopped", arrival=0.0, first_scheduled=0.001, first_token=0.004))
    m.observe(Result(priority="be", preemptions=2))
    pool = {"block_size": 16, "blocks_in_use": 3, "blocks_free": 5}  # with kv_block_size set
    stats = {
        "metrics": m.snapshot(),
        "memory": {"budget_bytes": 1024, "resident_bytes": 10, "kv_blocks": pool},
    }
    samples = _samples(exposition(stats).decode())
    assert samples[("qllm_requests_total", (("class", "ls"), ("status", "stopped")))] == 1
    assert samples[("qllm_preemptions_total", (("class", "be"),))] == 2
    assert samples[("qllm_ttft_seconds_bucket", (("class", "ls"), ("le", "+Inf")))] == 1
    assert samples[("qllm_ttft_seconds_count", (("class", "ls"),))] == 1
    assert samples[("qllm_ttft_seconds_bucket", (("class", "ls"), ("le", "0.005")))] == 1
    assert samples[("qllm_ttft_seconds_bucket", (("class", "ls"), ("le", "0.0025")))] == 0
    assert samples[("qllm_request_preemptions_bucket", (("class", "be"), ("le", "2.0")))] == 1
    assert samples[("qllm_memory_budget_bytes", ())] == 1024
    assert samples[("qllm_memory_kv_blocks_blocks_in_use", ())] == 3
    assert samples[("qllm_memory_kv_blocks_blocks_free", ())] == 5
    names = {name for name, _ in samples}
    for hist in ("ttft_seconds", "queue_seconds", "turnaround_seconds", "preemption_latency_seconds"):
        assert f"qllm_{hist}_sum" in names


def test_tpot_histogram_and_slo_attainment_counters_per_class():
    m = Metrics()
    # TTFT 0.01 within 0.05; TPOT (100.31 - 100.01) / 3 = 0.1 within 0.1
    m.observe(Result(priority="ls", token_ids=[1] * 4, token_times=[100.01, 100.11, 100.21, 100.31],
                     ttft_slo=0.05, tpot_slo=0.11))  # fmt: skip
    # TTFT 0.01 misses 0.005; TPOT 0.5 misses 0.1
    m.observe(
        Result(priority="ls", token_ids=[1] * 2, token_times=[100.01, 100.51], ttft_slo=0.005, tpot_slo=0.1)
    )
    m.observe(
        Result(priority="ls", first_token=None, token_ids=[], ttft_slo=0.05, tpot_slo=0.1)
    )  # never started
    m.observe(Result(priority="be", token_ids=[1] * 2, token_times=[100.0, 100.2]))  # no SLO: not counted
    ls, be = m.snapshot()["ls"], m.snapshot()["be"]
    assert (ls["ttft_slo_met"], ls["ttft_slo_missed"]) == (1, 2)
    assert (ls["tpot_slo_met"], ls["tpot_slo_missed"]) == (1, 1)  # one token or none: no TPOT to judge
    assert ls["histograms"]["tpot_seconds"]["count"] == 2
    assert ls["histograms"]["tpot_seconds"]["sum"] == pytest.approx(0.6)
    assert be["histograms"]["tpot_seconds"]["count"] == 1 and be["tpot_slo_met"] == be["tpot_slo_missed"] == 0
    samples = _samples(exposition({"metrics": m.snapshot()}).decode())
    assert samples[("qllm_tpot_seconds_count", (("class", "ls"),))] == 2
    assert samples[("qllm_tpot_seconds_bucket", (("class", "ls"), ("le", "0.25")))] == 1
    assert samples[("qllm_tpot_slo_missed_total", (("class", "ls"),))] == 1
    assert samples[("qllm_ttft_slo_met_total", (("class", "ls"),))] == 1


def test_counts_that_only_go_up_are_counters_and_durations_are_in_seconds():
    stats = {
        "kernel": {"batches": 7, "ops": 9, "max_batch": 32, "compute": "thread"},
        "memory": {
            "offloads": 2,
            "resident_bytes": 10,
            "kv_blocks": {"blocks_allocated": 4, "blocks_free": 1},
        },
        "server": {"connections": 1, "connections_accepted": 3, "uptime_s": 12.5, "draining": False},
    }
    text = exposition(stats).decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    samples = _samples(text)
    for name, value in (
        ("qllm_kernel_batches", 7),
        ("qllm_kernel_ops", 9),
        ("qllm_memory_offloads", 2),
        ("qllm_memory_kv_blocks_blocks_allocated", 4),
        ("qllm_server_connections_accepted", 3),
    ):
        assert types[name] == "counter" and samples[(f"{name}_total", ())] == value, name
    for name in ("qllm_kernel_max_batch", "qllm_memory_resident_bytes", "qllm_server_connections"):
        assert types[name] == "gauge", name
    assert samples[("qllm_server_uptime_seconds", ())] == 12.5
    assert "qllm_server_uptime_s " not in text and "qllm_kernel_compute" not in text
