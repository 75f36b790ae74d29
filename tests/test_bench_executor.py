"""``qllm bench executor`` prints one JSON line comparing qllm with transformers; the bench CLI
lists the benchmark modules present. Smoke runs on the tiny preset; no timing assertions."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys

import pytest
from tiny_families import torch_threads

import qllm.bench
from qllm.cli import main

SMOKE = ["--model", "tiny", "--rounds", "1", "--warmup", "0", "--prompt-tokens", "8", "--decode-tokens", "4"]
SYSTEM_KEYS = {
    "prefill_s",
    "decode_tokens_per_s",
    "prefill_s_runs",
    "decode_tokens_per_s_runs",
    "tokens_equal",
}


def bench_executor(capsys, *extra: str) -> dict:
    with torch_threads(1):
        assert main(["bench", "executor", *SMOKE, *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "one JSON line"
    return json.loads(lines[0])


def test_reports_both_executors_against_transformers(capsys):
    report = bench_executor(capsys)

    assert report["bench"] == "executor" and report["model"] == "tiny"
    assert (report["prompt_tokens"], report["decode_tokens"], report["rounds"]) == (8, 4, 1)
    assert set(report["systems"]) == {"transformers", "qllm", "qllm_unpadded"}
    for name, system in report["systems"].items():
        assert set(system) == SYSTEM_KEYS, name
        assert system["prefill_s"] > 0 and system["decode_tokens_per_s"] > 0
        assert len(system["prefill_s_runs"]) == len(system["decode_tokens_per_s_runs"]) == 1
    assert set(report["ratios"]) == {"qllm", "qllm_unpadded"}
    for ratio in report["ratios"].values():
        assert set(ratio) == {
            "decode_tokens_per_s",
            "prefill_speed",
            "decode_tokens_per_s_rounds",
            "prefill_speed_rounds",
        }
        assert ratio["decode_tokens_per_s"] > 0 and ratio["prefill_speed"] > 0
        assert len(ratio["decode_tokens_per_s_rounds"]) == len(ratio["prefill_speed_rounds"]) == 1
    # The price of batch invariance, and what was verified on this machine.
    assert report["padding_cost"]["padded_over_unpadded_decode"] > 0
    assert report["batch_invariance"]["verified"] and report["batch_invariance"]["threads"] == 1
    # Same weights, greedy, EOS ignored: every system produces the same tokens.
    assert report["tokens_equal"] is True
    assert all(system["tokens_equal"] for system in report["systems"].values())


def test_batch_invariant_flag_selects_one_executor(capsys):
    assert set(bench_executor(capsys, "--no-batch-invariant")["systems"]) == {"transformers", "qllm_unpadded"}
    assert set(bench_executor(capsys, "--batch-invariant")["systems"]) == {"transformers", "qllm"}


def test_rejects_nonsense_sizes(capsys):
    assert main(["bench", "executor", "--model", "tiny", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def test_missing_benchmark_modules_are_not_listed(monkeypatch):
    monkeypatch.setattr(qllm.bench, "BENCHES", ("executor", "not_written_yet"))
    assert list(qllm.bench.available()) == ["executor"]


class _BrokenBenchmark(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``qllm.bench.broken`` a module that exists but imports something missing."""

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "qllm.bench.broken" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        importlib.import_module("qllm_missing_dependency")


def test_a_benchmark_whose_own_import_fails_is_an_error(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_BrokenBenchmark(), *sys.meta_path])
    monkeypatch.setattr(qllm.bench, "BENCHES", ("executor", "broken"))
    with pytest.raises(ModuleNotFoundError, match="qllm_missing_dependency"):
        qllm.bench.available()
    sys.modules.pop("qllm.bench.broken", None)


def test_bare_bench_without_a_default_prints_help(monkeypatch, capsys):
    monkeypatch.setattr(qllm.bench, "BENCHES", ("executor",))
    assert qllm.bench.main([]) == 2
    out = capsys.readouterr().out
    assert "executor" in out and "usage" in out
