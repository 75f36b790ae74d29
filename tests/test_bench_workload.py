"""qllm bench (workload): the generator, the metric maths on hand-made timelines, and a smoke run."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from qllm.bench import trace
from qllm.bench.stats import Record, cell_metrics, class_metrics, percentile, ratio
from qllm.bench.summary import headline, slo_max_rate, targets

WIDE = trace.Lengths(scale=0.1, max_prompt=10_000, max_output=10_000)


# ------------------------------------------------------------------ workload generator
def test_same_seed_same_workload_and_other_seed_differs():
    a = trace.poisson(2.0, requests=50, seed=7, lengths=WIDE)
    assert a == trace.poisson(2.0, requests=50, seed=7, lengths=WIDE)
    assert a != trace.poisson(2.0, requests=50, seed=8, lengths=WIDE)


def test_rates_replay_the_same_requests_faster():
    slow = trace.poisson(1.0, requests=40, lengths=WIDE)
    fast = trace.poisson(4.0, requests=40, lengths=WIDE)
    assert [(i.cls, i.prompt, i.output_len) for i in slow] == [(i.cls, i.prompt, i.output_len) for i in fast]
    assert [f.arrival_s for f in fast] == pytest.approx([s.arrival_s / 4 for s in slow])


def test_poisson_rate_and_ls_share():
    items = trace.poisson(5.0, requests=4000, ls_share=0.2, lengths=WIDE, seed=1)
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(items)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 5.0, rel=0.06)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 5.0, rel=0.1)  # exponential: sd = mean
    assert sum(i.cls == "ls" for i in items) / len(items) == pytest.approx(0.2, abs=0.02)
    assert all(b.arrival_s > a.arrival_s for a, b in itertools.pairwise(items))


def test_ls_share_extremes():
    assert {i.cls for i in trace.poisson(1.0, requests=50, ls_share=0.0)} == {"be"}
    assert {i.cls for i in trace.poisson(1.0, requests=50, ls_share=1.0)} == {"ls"}
    with pytest.raises(ValueError):
        trace.poisson(1.0, requests=5, ls_share=1.5)


def test_requests_and_duration_bound_the_workload():
    assert len(trace.poisson(3.0, requests=17)) == 17
    items = trace.poisson(3.0, duration=20.0)
    assert items and all(i.arrival_s < 20.0 for i in items)
    assert len(items) == pytest.approx(60, abs=25)
    with pytest.raises(ValueError):
        trace.poisson(3.0)
    with pytest.raises(ValueError):
        trace.poisson(0.0, requests=3)


def _workload_args(**over):
    import argparse

    from qllm.bench.workload import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--requests", "40", "--ls-share", "0.3", "--seed", "3"])
    return argparse.Namespace(**{**vars(args), **over})


def test_only_class_keeps_that_class_at_the_same_arrival_times():
    from qllm.bench.plan import workload

    full = workload(_workload_args(), WIDE, None)(4.0)
    ls = workload(_workload_args(only_class="ls"), WIDE, None)(4.0)
    be = workload(_workload_args(only_class="be"), WIDE, None)(4.0)
    assert ls == [i for i in full if i.cls == "ls"] and be == [i for i in full if i.cls == "be"]
    assert ls and be and len(ls) + len(be) == len(full) == 40


class _Alone:
    """A system whose lone runs take TTFTs from a script, one per run."""

    name = "alone"

    def __init__(self, ttfts):
        self.ttfts = list(ttfts)
        self.runs = []

    async def run(self, items, slo_s=None, timeout=None):
        (item,) = items
        self.runs.append(item)
        ttft = self.ttfts.pop(0)
        return [Record("ls", 0.0, 0.0, ttft, ttft + 0.1, item.prompt_len, 1, 0)]


def test_isolated_yardstick_is_each_ls_requests_median_over_tries():
    import asyncio

    from qllm.bench import probes

    items = trace.poisson(1.0, requests=12, ls_share=0.5, lengths=WIDE, seed=2)
    ls = [i for i in items if i.cls == "ls"]
    # One slow run per request (a page fault, a timer tick) does not set its yardstick.
    script = [t for k in range(len(ls)) for t in (0.1 + k / 100, 9.0, 0.1 + k / 100)]
    system = _Alone(script)
    result = asyncio.run(probes.isolated(system, items, None, slo=1.0, timeout=10.0, tries=3))
    assert [r.prompt for r in system.runs] == [i.prompt for i in ls for _ in range(3)]
    assert all(r.arrival_s == 0.0 for r in system.runs)
    assert result["requests"] == len(ls) and result["tries"] == 3
    assert result["ttft_s"] == pytest.approx([0.1 + k / 100 for k in range(len(ls))])
    few = asyncio.run(probes.isolated(_Alone([0.2] * 2), items, 2, slo=1.0, timeout=10.0, tries=1))
    assert few["requests"] == 2 and few["ttft_p99_s"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        asyncio.run(probes.isolated(_Alone([]), items, None, slo=1.0, timeout=10.0, tries=0))


def test_lengths_have_the_scaled_sharegpt_means_and_respect_caps():
    items = trace.poisson(1.0, requests=5000, lengths=WIDE, seed=3)
    assert statistics.fmean(i.prompt_len for i in items) == pytest.approx(
        0.1 * trace.SHAREGPT_PROMPT_MEAN, rel=0.1
    )
    assert statistics.fmean(i.output_len for i in items) == pytest.approx(
        0.1 * trace.SHAREGPT_OUTPUT_MEAN, rel=0.1
    )
    capped = trace.poisson(1.0, requests=500, lengths=trace.Lengths(scale=1.0, max_prompt=20, max_output=7))
    assert all(1 <= i.prompt_len <= 20 and 1 <= i.output_len <= 7 for i in capped)
    assert all(len(i.prompt) == i.prompt_len for i in capped)
    assert all(trace.FIRST_ID <= t < trace.FIRST_ID + trace.PROMPT_VOCAB for i in capped for t in i.prompt)


def test_lengths_for_context_fit_the_model():
    lengths = trace.Lengths.for_context(256)
    assert lengths.max_prompt + lengths.max_output <= 256
    with pytest.raises(ValueError):
        trace.Lengths.for_context(256, max_prompt=200, max_output=100)


def test_trace_round_trip_rescale_and_limit(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"arrival_s": 2.0, "class": "be", "prompt_len": 5, "output_len": 3}\n'
        '{"arrival_s": 0.0, "class": "ls", "prompt": "hello", "output_len": 2}\n'
        "\n"
        '{"arrival_s": 4.0, "class": "be", "prompt_len": 1, "output_len": 1}\n'
    )
    items = trace.read_trace(path)
    assert [i.arrival_s for i in items] == [0.0, 2.0, 4.0]  # sorted by arrival
    assert items[0].prompt == "hello" and items[0].cls == "ls"
    assert len(items[1].prompt) == 5
    assert trace.trace_rate(items) == pytest.approx(0.5)
    assert [i.arrival_s for i in trace.at_rate(items, 2.0)] == pytest.approx([0.0, 0.5, 1.0])
    assert len(trace.limit(items, requests=2)) == 2
    assert len(trace.limit(items, duration=3.0)) == 2
    out = tmp_path / "out.jsonl"
    trace.write_trace(items, out)
    again = trace.read_trace(out)
    assert [(i.arrival_s, i.cls, i.prompt_len, i.output_len) for i in again][1:] == [
        (i.arrival_s, i.cls, i.prompt_len, i.output_len) for i in items
    ][1:]
    assert again[0].prompt == "hello"


@pytest.mark.parametrize(
    "line",
    [
        '{"arrival_s": 0, "class": "urgent", "prompt_len": 3, "output_len": 1}',
        '{"arrival_s": 0, "class": "ls", "output_len": 1}',
        '{"arrival_s": 0, "class": "ls", "prompt_len": 3, "output_len": 0}',
        "not json",
    ],
)
def test_bad_trace_line_is_named(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "class": "be", "prompt_len": 3, "output_len": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        trace.read_trace(path)


# ------------------------------------------------------------------ metric maths
def test_percentile_interpolates_linearly():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4, 1, 3, 2], 0.5) == 2.5
    assert percentile([1, 2, 3, 4], 0.99) == pytest.approx(3.97)
    assert percentile(range(101), 0.99) == pytest.approx(99.0)
    with pytest.raises(ValueError):
        percentile([1, 2], 1.5)


def test_ratio_guards_missing_and_zero():
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(None, 3.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None


def rec(cls, arrival, first, finished, *, scheduled=None, out=4, preemptions=0):
    return Record(cls, arrival, scheduled, first, finished, 8, out, preemptions)


def test_class_metrics_on_a_hand_made_timeline():
    records = [
        rec("ls", 0.0, 0.1, 1.0, scheduled=0.05),
        rec("ls", 1.0, 1.2, 2.0, scheduled=1.01, preemptions=0),
        rec("ls", 2.0, 3.0, 4.0, scheduled=2.5),
        rec("ls", 3.0, None, None),  # never served: an SLO miss, not a latency sample
    ]
    m = class_metrics(records, slo_s=0.5)
    assert m["requests"] == 4 and m["completed"] == 3
    assert m["ttft_mean_s"] == pytest.approx((0.1 + 0.2 + 1.0) / 3)
    assert m["ttft_p50_s"] == pytest.approx(0.2)
    assert m["ttft_max_s"] == pytest.approx(1.0)
    assert m["slo_attainment"] == pytest.approx(2 / 4)
    assert m["turnaround_mean_s"] == pytest.approx((1.0 + 1.0 + 2.0) / 3)
    assert m["requests_per_s"] == pytest.approx(3 / 4.0)  # window: time 0 to the last completion
    assert m["tokens_per_s"] == pytest.approx(12 / 4.0)
    assert m["queue_mean_s"] == pytest.approx((0.05 + 0.01 + 0.5) / 3)
    assert class_metrics([], 0.5)["slo_attainment"] is None


def test_cell_metrics_split_classes_and_count_preemptions():
    records = [rec("ls", 0.0, 0.1, 1.0), rec("be", 0.0, 0.5, 3.0, preemptions=2), rec("be", 0.5, 0.7, 2.0)]
    m = cell_metrics(records, slo_s=0.2)
    assert m["ls"]["requests"] == 1 and m["be"]["requests"] == 2 and m["all"]["requests"] == 3
    assert m["be"]["preemptions"] == 2 and m["be"]["preempted_requests"] == 1
    assert m["ls"]["slo_attainment"] == 1.0
    assert m["be"]["slo_attainment"] == 0.5  # TTFTs 0.5 and 0.2: exactly at the SLO counts as within


def test_record_row_round_trip():
    r = rec("be", 0.5, 0.7, 2.0, scheduled=0.6, preemptions=3)
    assert Record.from_row(r.row()) == r


# ------------------------------------------------------------------ headline
SYSTEMS = [
    {"name": "fcfs", "kind": "engine", "policy": "fcfs"},
    {"name": "qllm", "kind": "engine", "policy": "qllm"},
    {"name": "aging", "kind": "engine", "policy": "priority-aging"},
    {"name": "transformers-cb", "kind": "peer", "policy": None},
]


def cell(
    system,
    rate,
    *,
    ls_ttft,
    be_tps,
    slo,
    ls_turn=1.0,
    be_turn=1.0,
    be_ttft=1.0,
    all_ttft=1.0,
    rps=1.0,
    tps=100.0,
    p99=None,
):
    return {
        "system": system,
        "rate": rate,
        "metrics": {
            "ls": {"ttft_mean_s": ls_ttft, "ttft_p99_s": p99 or ls_ttft, "turnaround_mean_s": ls_turn,
                   "slo_attainment": slo, "queue_p99_s": 0.01},
            "be": {"tokens_per_s": be_tps, "requests_per_s": be_tps / 10, "turnaround_mean_s": be_turn,
                   "ttft_mean_s": be_ttft},
            "all": {"ttft_mean_s": all_ttft, "requests_per_s": rps, "tokens_per_s": tps},
        },
    }  # fmt: skip


CELLS = [
    cell("fcfs", 1.0, ls_ttft=10.0, be_tps=100.0, slo=0.5, ls_turn=20.0, all_ttft=10.0, rps=1.0),
    cell("fcfs", 2.0, ls_ttft=40.0, be_tps=100.0, slo=0.0, ls_turn=60.0, all_ttft=40.0, rps=1.5),
    cell("qllm", 1.0, ls_ttft=0.1, be_tps=100.0, slo=1.0, ls_turn=2.0, be_turn=1.5, be_ttft=3.0, p99=0.3),
    cell("qllm", 2.0, ls_ttft=0.2, be_tps=90.0, slo=0.95, ls_turn=3.0, be_turn=1.1, be_ttft=5.0, p99=0.4),
    cell("aging", 1.0, ls_ttft=1.0, be_tps=110.0, slo=1.0),
    cell("aging", 2.0, ls_ttft=2.0, be_tps=120.0, slo=0.8),
    cell("transformers-cb", 1.0, ls_ttft=12.0, be_tps=80.0, slo=0.4, all_ttft=8.0),
    cell("transformers-cb", 2.0, ls_ttft=45.0, be_tps=80.0, slo=0.0, all_ttft=50.0),
]


def test_headline_ratios_over_rates():
    idle = {"fcfs": 0.5, "qllm": 0.5, "aging": 0.5, "transformers-cb": 2.0}
    h = headline(SYSTEMS, CELLS, isolated_p99=0.2, ls_share=0.2, idle_ttft=idle)
    assert h["baseline"] == "fcfs" and h["peer"] == "transformers-cb"
    assert h["best_policy"] == "qllm"  # ratios 100 and 200 beat aging's 10 and 20
    assert h["ls_ttft_ratio_mean"] == pytest.approx(150.0)
    assert h["ls_ttft_ratio_max"] == pytest.approx(200.0)
    assert h["by_policy"]["aging"]["ls_ttft_ratio_mean"] == pytest.approx(15.0)
    assert h["ls_turnaround_ratio_max"] == pytest.approx(20.0)
    assert h["be_throughput_ratio"] == pytest.approx(0.9)  # min over rates of qllm / fcfs
    assert h["be_turnaround_ratio_mean"] == pytest.approx((1.5 + 1.1) / 2)
    assert h["be_ttft_ratio_mean"] == pytest.approx((3.0 + 5.0) / 2)
    assert h["by_policy"]["qllm"]["be_ttft_ratio_max"] == pytest.approx(5.0)
    assert h["ls_ttft_p99_over_isolated"] == pytest.approx(2.0)  # worst rate: 0.4 / 0.2
    assert h["fcfs_vs_transformers_cb"] == pytest.approx((10 / 8 + 40 / 50) / 2)
    # each in units of its own idle TTFT: the peer is 4x slower alone, so 4x the raw ratio
    assert h["fcfs_vs_transformers_cb_normalized"] == pytest.approx(4 * (10 / 8 + 40 / 50) / 2)
    assert h["slo_max_rate"] == {"fcfs": None, "qllm": 2.0, "aging": 1.0, "transformers-cb": None}
    assert h["capacity_requests_per_s"] == pytest.approx(1.5)
    assert h["ls_saturation_rate"] == pytest.approx(7.5)
    assert h["slo_rate_over_ls_saturation"] == pytest.approx(2.0 / 7.5)


def test_slo_max_rate_stops_at_the_first_rate_that_misses():
    cells = [cell("x", r, ls_ttft=1, be_tps=1, slo=s) for r, s in ((1.0, 0.95), (2.0, 0.5), (3.0, 1.0))]
    assert slo_max_rate(cells, "x", [1.0, 2.0, 3.0]) == 1.0


def test_headline_without_baseline_or_peer_leaves_figures_empty():
    h = headline(SYSTEMS[1:2], CELLS[2:4], isolated_p99=None, ls_share=0.2)
    assert h["baseline"] is None and h["ls_ttft_ratio_mean"] is None and h["fcfs_vs_transformers_cb"] is None
    assert (
        headline(SYSTEMS, CELLS, isolated_p99=None, ls_share=0.2)["fcfs_vs_transformers_cb_normalized"]
        is None
    )


def test_throughput_vs_transformers_cb_is_the_worst_rate_of_all_requests_tokens():
    # fcfs against the peer in output tokens/s of LS and BE together: 1.2x at rate 1, 0.9x at rate 2;
    # the candidates' figures play no part
    tps = {("fcfs", 1.0): 120.0, ("fcfs", 2.0): 90.0, ("transformers-cb", 1.0): 100.0,
           ("transformers-cb", 2.0): 100.0, ("qllm", 1.0): 500.0, ("qllm", 2.0): 1.0}  # fmt: skip
    cells = [{**c, "metrics": {**c["metrics"], "all": {**c["metrics"]["all"], "tokens_per_s": tps.get((c["system"], c["rate"]))}}}
             for c in CELLS]  # fmt: skip
    h = headline(SYSTEMS, cells, isolated_p99=0.2, ls_share=0.2)
    assert h["throughput_vs_transformers_cb_by_rate"] == pytest.approx([1.2, 0.9])
    assert h["throughput_vs_transformers_cb"] == pytest.approx(0.9)
    (target,) = [t for t in targets(h) if t["name"] == "throughput_vs_transformers_cb"]
    assert target["target"] == ">= 1.0" and target["met"] is False
    faster = [c if c["system"] != "fcfs" else cell(c["system"], c["rate"], ls_ttft=1.0, be_tps=1.0, slo=1.0, tps=150.0)
              for c in cells]  # fmt: skip
    h = headline(SYSTEMS, faster, isolated_p99=0.2, ls_share=0.2)
    assert h["throughput_vs_transformers_cb"] == pytest.approx(1.5)
    assert {t["name"]: t["met"] for t in targets(h)}["throughput_vs_transformers_cb"] is True


@pytest.mark.parametrize("names", [("fcfs", "qllm"), ("qllm", "transformers-cb")])
def test_throughput_vs_transformers_cb_needs_both_fcfs_and_the_peer(names):
    systems = [s for s in SYSTEMS if s["name"] in names]
    h = headline(systems, [c for c in CELLS if c["system"] in names], isolated_p99=0.2, ls_share=0.2)
    assert h["throughput_vs_transformers_cb"] is None and h["throughput_vs_transformers_cb_by_rate"] is None
    assert {t["name"]: t["met"] for t in targets(h)}["throughput_vs_transformers_cb"] is None


def test_targets_say_met_missed_or_not_measured():
    h = headline(SYSTEMS, CELLS, isolated_p99=0.2, ls_share=0.2)
    by_name = {t["name"]: t for t in targets(h)}
    assert by_name["ls_ttft_ratio_mean"]["met"] is True
    assert by_name["ls_ttft_p99_over_isolated"]["met"] is False
    assert by_name["be_throughput_ratio"]["met"] is False
    assert by_name["fcfs_vs_transformers_cb"]["met"] is True  # mean of 1.25 and 0.8: 1.025
    # qllm held the SLO at both tested rates: 2.0 < 0.9 x 7.5 says more about the rates than qllm
    assert by_name["slo_rate_over_ls_saturation"]["met"] is None
    assert "every tested rate" in by_name["slo_rate_over_ls_saturation"]["note"]
    assert {t["met"] for t in targets({})} == {None}


def test_slo_target_missed_when_the_slo_broke_below_ls_saturation():
    cells = [c for c in CELLS if c["system"] in ("fcfs", "qllm") and c["rate"] == 1.0]
    cells.append(cell("fcfs", 2.0, ls_ttft=40.0, be_tps=100.0, slo=0.0))
    cells.append(cell("qllm", 2.0, ls_ttft=9.0, be_tps=100.0, slo=0.5))
    h = headline(SYSTEMS[:2], cells, isolated_p99=0.2, ls_share=0.2)
    assert h["slo_max_rate"]["qllm"] == 1.0 and h["slo_held_at_every_rate"] == {"fcfs": False, "qllm": False}
    (slo_target,) = [t for t in targets(h) if t["name"] == "slo_rate_over_ls_saturation"]
    assert slo_target["met"] is False and slo_target["note"] is None


# ------------------------------------------------------------------ smoke
def test_bench_on_tiny_writes_the_json_shape(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "qllm", "bench", "--model", "tiny", "--rates", "30,60", "--requests", "6",
           "--systems", "fcfs,qllm,transformers-cb", "--isolated", "2", "--max-batch", "8", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": ""}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""  # quiet with --json
    result = json.loads(out.read_text())
    assert result["bench"] == "workload" and result["mode"] == "in-process"
    assert [s["name"] for s in result["systems"]] == ["fcfs", "qllm", "transformers-cb"]
    assert len(result["cells"]) == 2 * 3
    for c in result["cells"]:
        assert c["metrics"]["all"]["requests"] == 6 and len(c["records"]) == 6
        assert c["metrics"]["all"]["completed"] == 6
        assert set(c["metrics"]) == {"ls", "be", "all"}
    h = result["headline"]
    for key in ("ls_ttft_ratio_mean", "ls_ttft_ratio_max", "slo_max_rate", "ls_turnaround_ratio_max",
                "be_throughput_ratio", "be_turnaround_ratio_mean", "ls_ttft_p99_over_isolated",
                "fcfs_vs_transformers_cb"):  # fmt: skip
        assert key in h
    assert set(h["slo_max_rate"]) == {"fcfs", "qllm", "transformers-cb"}
    assert h["baseline"] == "fcfs" and h["best_policy"] == "qllm"
    # Both are rounded to 6 decimals in the JSON: the step's rounding (up to 5e-7) grows tenfold in
    # the product, which at a step of a few ms is more than 1e-4 of it.
    assert result["slo"]["ttft_s"] == pytest.approx(10 * result["slo"]["decode_step_s"], abs=6e-6)
    assert result["isolated"]["requests"] == 2
    assert result["peer_isolated"]["transformers-cb"]["requests"] == 2
    assert h["fcfs_vs_transformers_cb_normalized"] is not None
    assert h["throughput_vs_transformers_cb"] > 0 and len(h["throughput_vs_transformers_cb_by_rate"]) == 2
    assert {t["name"] for t in result["targets"]} >= {
        "ls_ttft_ratio_mean",
        "fcfs_vs_transformers_cb",
        "throughput_vs_transformers_cb",
    }

    for c in result["cells"]:  # the qllm engines report the kernel's batched ops
        assert (c["kernel"] is None) == (c["system"] == "transformers-cb")
    # --report recomputes the headline and targets from the saved cells
    saved = {k: v for k, v in result.items() if k not in ("headline", "targets")}
    out.write_text(json.dumps(saved))
    report = subprocess.run(
        [sys.executable, "-m", "qllm.bench", "--report", str(out)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "transformers-cb" in report.stdout and "ls_ttft_ratio_mean" in report.stdout
    assert "(2 requests, median of 3 runs each)" in report.stdout  # what the LS yardstick is


@pytest.mark.slow  # a server and a client process: 20-60 s on a busy 2-core machine
def test_bench_socket_mode_measures_a_running_server(tmp_path):
    sock, out = tmp_path / "qllm.sock", tmp_path / "bench.json"
    serve = [sys.executable, "-m", "qllm", "serve", "--model", "tiny", "--policy", "qllm", "--socket", str(sock),
             "--log-level", "error"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "qllm serve did not open its socket"
            time.sleep(0.2)
        cmd = [sys.executable, "-m", "qllm", "bench", "--socket", str(sock), "--rates", "40", "--requests", "5",
               "--isolated", "1", "--json", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = json.loads(out.read_text())
    assert result["mode"] == "socket"
    assert result["systems"] == [
        {"name": "serve:qllm", "kind": "serve", "policy": "qllm", "socket": str(sock), "model": "tiny"}
    ]
    (cell,) = result["cells"]
    assert cell["metrics"]["all"]["requests"] == 5 and cell["metrics"]["all"]["completed"] == 5
    assert all(r[3] is not None and r[3] >= r[1] for r in cell["records"])  # first token after arrival
    assert result["headline"]["baseline"] is None  # no fcfs server measured: no ratios


@pytest.mark.slow  # a server and a client process: 20-60 s on a busy 2-core machine
def test_bench_http_mode_measures_a_running_server(tmp_path):
    sock, http_sock, out = tmp_path / "qllm.sock", tmp_path / "qllm-http.sock", tmp_path / "bench.json"
    serve = [sys.executable, "-m", "qllm", "serve", "--model", "tiny", "--policy", "qllm", "--socket", str(sock),
             "--log-level", "error"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not http_sock.exists():
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "qllm serve did not open its HTTP socket"
            time.sleep(0.2)
        cmd = [sys.executable, "-m", "qllm", "bench", "--http", str(http_sock), "--rates", "40", "--requests", "5",
               "--isolated", "1", "--json", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = json.loads(out.read_text())
    assert result["systems"] == [
        {"name": "http:qllm", "kind": "serve", "policy": "qllm", "http": str(http_sock), "model": "tiny"}
    ]
    (cell,) = result["cells"]
    assert cell["metrics"]["all"]["requests"] == 5 and cell["metrics"]["all"]["completed"] == 5
    assert all(r[3] is not None and r[3] >= r[1] for r in cell["records"])  # first token after arrival


# ------------------------------------------------------------------ --repeat
def test_repeated_runs_combine_as_medians_with_their_range():
    from qllm.bench.repeat import median_tree, spread_tree

    heads = [
        {"be": 0.8, "by_rate": [1.0, 2.0], "held": {"a": True}, "slo_max": None, "best": "x"},
        {"be": 0.9, "by_rate": [3.0, 1.0], "held": {"a": False}, "slo_max": 6.0, "best": "y"},
        {"be": 1.3, "by_rate": [2.0, 5.0], "held": {"a": True}, "slo_max": None, "best": "x"},
    ]
    assert median_tree(heads) == {
        "be": 0.9, "by_rate": [2.0, 2.0], "held": {"a": True}, "slo_max": None, "best": "x"
    }  # fmt: skip
    assert spread_tree(heads) == {
        "be": [0.8, 1.3],
        "by_rate": [[1.0, 3.0], [1.0, 5.0]],
        "slo_max": [6.0, 6.0],
    }
    # A figure that most runs measured takes the median of those.
    assert median_tree([{"v": None}, {"v": 2.0}, {"v": 4.0}]) == {"v": 3.0}


def test_per_rate_median_takes_each_rates_median_before_the_worst_rate():
    # Noise that hits a different rate in each run drags every run's least ratio down; the
    # median at each rate does not follow it.
    from qllm.bench.repeat import median_tree, per_rate_median

    def run(be: list[float], turn: list[float], p99: list[float]) -> dict:
        return {"by_policy": {"cohort": {
            "be_throughput_ratio": min(be), "be_throughput_ratio_by_rate": be,
            "be_turnaround_ratio_by_rate": turn, "ls_ttft_p99_over_isolated": max(p99),
            "ls_ttft_p99_over_isolated_by_rate": p99,
        }}}  # fmt: skip

    heads = [
        run([0.8, 1.0], [1.0, 1.2], [1.2, 2.0]),
        run([1.0, 0.8], [1.4, 1.2], [2.0, 1.2]),
        run([1.0, 1.0], [1.2, 1.2], [1.2, 1.3]),
    ]
    head = median_tree(heads)
    assert head["by_policy"]["cohort"]["be_throughput_ratio"] == 0.8  # the median of the runs' least
    assert per_rate_median(head) == {
        "cohort": {
            "be_throughput_ratio": 1.0,
            "be_turnaround_ratio_mean": 1.2,
            "ls_ttft_p99_over_isolated": 1.3,
        }
    }
    assert per_rate_median({"by_policy": {"cohort": {"be_throughput_ratio_by_rate": [None]}}}) == {
        "cohort": {
            "be_throughput_ratio": None,
            "be_turnaround_ratio_mean": None,
            "ls_ttft_p99_over_isolated": None,
        }
    }


def test_bench_repeat_writes_every_run_and_the_medians(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "qllm", "bench", "--model", "tiny", "--rates", "30", "--requests", "4",
           "--systems", "fcfs,cohort", "--isolated", "1", "--isolated-tries", "1", "--repeat", "2",
           "--max-batch", "8", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": ""}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["repeat"] == 2 and len(result["runs"]) == 2
    for run in result["runs"]:
        assert len(run["cells"]) == 2 and all(c["metrics"]["all"]["completed"] == 4 for c in run["cells"])
    values = [r["headline"]["by_policy"]["cohort"]["be_turnaround_ratio_mean"] for r in result["runs"]]
    assert result["headline"]["by_policy"]["cohort"]["be_turnaround_ratio_mean"] == pytest.approx(
        statistics.median(values), rel=1e-4
    )
    assert result["spread"]["by_policy"]["cohort"]["be_turnaround_ratio_mean"] == pytest.approx(
        [min(values), max(values)], rel=1e-4
    )
    report = subprocess.run(
        [sys.executable, "-m", "qllm.bench", "--report", str(out)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "2 runs of" in report.stdout and "median" in report.stdout
    pooled = result["per_rate_median"]["cohort"]
    by_rate = result["headline"]["by_policy"]["cohort"]["be_throughput_ratio_by_rate"]
    assert pooled["be_throughput_ratio"] == pytest.approx(min(by_rate), rel=1e-4)
    assert "per-rate median" in report.stdout


def test_bench_trace_keeps_every_cell_and_leaves_out_lone_request_probes():
    """scripts/bench_trace.py prints a cell per engine that served several requests, LS-only
    ones included (``--only-class ls``); the lone-request yardstick probes are not cells."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_trace.py"
    spec = importlib.util.spec_from_file_location("bench_trace", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def engine(n: int, ids: list[tuple[str, bool]]) -> list[dict]:
        arrivals = [{"e": "arrive", "engine": n, "t": 0.0, "id": i, "ls": ls, "prompt": 3} for i, ls in ids]
        op = {"e": "op", "engine": n, "policy": "cohort", "t": 0.0, "s": 0.01, "kind": "MOE", "layer": 0,
              "expert": -1, "rows": len(ids), "members": [(i, ls, True) for i, ls in ids]}  # fmt: skip
        return [*arrivals, op]

    events = [
        *engine(0, [("req-1", True)]),  # an isolated-LS probe
        *engine(1, [("req-2", True), ("req-3", True)]),  # a cell of LS requests only
        *engine(2, [("req-4", True), ("req-5", False), ("req-6", False)]),  # a mixed cell
    ]
    cells = module.cells(events)
    assert [len([e for e in evs if e["e"] == "arrive"]) for _, evs in cells] == [2, 3]
    assert module.summary(*cells[0])["by_members"]["ls-only"]["ops"] == 1
