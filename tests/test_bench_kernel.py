"""``qllm bench kernel`` prints one JSON line; smoke runs of its parts on the tiny preset with tiny
sizes, no timing assertions."""

from __future__ import annotations

import json

from tiny_families import torch_threads

from qllm.cli import main
from qllm.engine import Engine
from qllm.policies import DEFAULT_POLICY

TINY = ["--model", "tiny", "--be-prompt", "4", "--be-tokens", "3", "--batch", "2", "--batch-tokens", "3",
        "--rounds", "1", "--single-rounds", "3", "--overhead-requests", "3"]  # fmt: skip
DECODE_KEYS = {"engine_decode_tokens_per_s", "transformers_decode_tokens_per_s", "ratio", "tokens_equal"}
OVERHEAD_KEYS = {"overhead_median_us", "overhead_p99_us", "overhead_count", "wall_s", "tokens_per_s",
                 "in_op_s", "in_op_over_wall"}  # fmt: skip


def bench_kernel(capsys, *extra: str) -> dict:
    with torch_threads(1):
        assert main(["bench", "kernel", *TINY, *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "one JSON line"
    return json.loads(lines[0])


def test_batch_and_single_decode_against_transformers_and_time_outside_ops(capsys):
    report = bench_kernel(capsys, "--skip", "policies,placement,kv")

    assert report["bench"] == "kernel" and report["workload"]["overhead_requests"] == 3
    assert "policies" not in report and "placement" not in report
    for part, batch in (("batch32", 2), ("single", 1)):
        decode = report[part]
        assert decode.keys() >= DECODE_KEYS and decode["batch"] == batch
        assert decode["engine_decode_tokens_per_s"] > 0 and decode["transformers_decode_tokens_per_s"] > 0
        assert decode["tokens_equal"] is True  # same weights, greedy, EOS ignored
        low, high = decode["ratio_min_max"]
        assert low <= decode["ratio"] <= high  # the median of the rounds' ratios
    assert report["batch32"]["rounds"] == 1 and report["single"]["rounds"] == 3
    assert set(report["overhead"]) == {"fcfs", DEFAULT_POLICY}
    for policy, figures in report["overhead"].items():
        assert figures.keys() >= OVERHEAD_KEYS, policy
        assert figures["default_policy"] is (policy == DEFAULT_POLICY)
        assert figures["all_completed"] and figures["tokens_per_s"] > 0
        assert figures["in_op_s"] > 0 and 0 < figures["in_op_over_wall"] <= 1.0
        # None until the kernel reports the gaps between ops; then a count with its percentiles
        count = figures["overhead_count"]
        assert (
            (count is None) == (figures["overhead_median_us"] is None) == (figures["overhead_p99_us"] is None)
        )
        assert count is None or (
            count > 0 and 0 <= figures["overhead_median_us"] <= figures["overhead_p99_us"]
        )


def test_skip_leaves_parts_out(capsys):
    report = bench_kernel(capsys, "--skip", "policies,batch32,overhead,placement,kv")
    assert not {"policies", "batch32", "single", "overhead", "placement", "kv"} & set(report)


def test_kv_layouts_side_by_side(capsys):
    report = bench_kernel(capsys, "--skip", "policies,batch32,overhead,placement", "--kv-block-size", "2")
    kv = report["kv"]
    assert kv["tokens_equal"] is True and kv["block_size"] == 2 and kv["batch"] == 2
    assert kv["buffers"]["decode_tokens_per_s"] > 0 and kv["blocks"]["decode_tokens_per_s"] > 0
    low, high = kv["decode_ratio_min_max"]
    assert low <= kv["decode_ratio"] <= high
    # 4 prompt and 3 output tokens: buffers hold 16 tokens per layer (the least capacity), blocks
    # of 2 hold 6 (the last token's keys are never appended).
    assert 0 < kv["blocks"]["peak_kv_bytes"] < kv["buffers"]["peak_kv_bytes"]
    pool = kv["blocks"]["kv_blocks"]
    assert pool["block_size"] == 2 and pool["blocks_in_use"] == 0 and pool["blocks_allocated"] > 0


def test_overhead_reads_the_kernel_gaps_in_microseconds(capsys, monkeypatch):
    stats = Engine.stats

    def with_gaps(engine: Engine) -> dict:
        out = stats(engine)
        out["kernel"]["overhead"] = {"count": 7, "median_s": 0.00025, "p99_s": 0.001}
        return out

    monkeypatch.setattr(Engine, "stats", with_gaps)
    report = bench_kernel(capsys, "--skip", "policies,batch32,placement,kv")
    for figures in report["overhead"].values():
        assert figures["overhead_count"] == 7
        assert figures["overhead_median_us"] == 250.0 and figures["overhead_p99_us"] == 1000.0


def test_rejects_unknown_parts_and_nonsense_sizes(capsys):
    assert main(["bench", "kernel", "--model", "tiny", "--skip", "overheads"]) == 2
    assert "overheads" in capsys.readouterr().err
    assert main(["bench", "kernel", "--model", "tiny", "--overhead-requests", "0"]) == 2
    assert "--overhead-requests" in capsys.readouterr().err
    assert main(["bench", "kernel", "--model", "tiny", "--single-rounds", "0"]) == 2
    assert "--single-rounds" in capsys.readouterr().err
    assert main(["bench", "kernel", "--model", "tiny", "--kv-block-size", "0"]) == 2
    assert "--kv-block-size" in capsys.readouterr().err
