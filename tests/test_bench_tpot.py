"""LS TPOT, SLO attainment per figure, and the vLLM peer's headline figures, on recorded data."""

import argparse
import json
from pathlib import Path

import pytest

from qllm.bench import plan, summary, workload
from qllm.bench.stats import Record, class_metrics
from qllm.bench.summary import headline, targets

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def test_tpot_is_first_token_to_finish_over_the_tokens_after_the_first():
    r = Record("ls", arrival=0.0, first_scheduled=0.0, first_token=0.5, finished=1.5, prompt_tokens=4,
               output_tokens=11)  # fmt: skip
    assert r.tpot == pytest.approx(0.1)
    assert Record("ls", 0.0, 0.0, 0.5, 0.5, 4, 1).tpot is None  # one token: no gap
    assert Record("ls", 0.0, 0.0, 0.5, None, 4, 5).tpot is None  # not finished


def test_ttft_and_tpot_slo_attainment_are_separate():
    records = [
        Record("ls", 0.0, 0.0, 0.1, 1.1, 4, 11),  # ttft 0.1 within, tpot 0.1 within
        Record("ls", 0.0, 0.0, 0.9, 1.4, 4, 11),  # ttft 0.9 misses, tpot 0.05 within
        Record("ls", 0.0, 0.0, 0.2, 4.2, 4, 11),  # ttft within, tpot 0.4 misses
        Record("ls", 0.0, 0.0, 0.2, None, 4, 3),  # did not finish: misses the TPOT SLO
    ]
    m = class_metrics(records, slo_s=0.5, tpot_slo_s=0.1)
    assert m["ttft_slo_attainment"] == m["slo_attainment"] == pytest.approx(3 / 4)
    assert m["tpot_slo_attainment"] == pytest.approx(2 / 4)
    assert m["tpot_mean_s"] == pytest.approx((0.1 + 0.05 + 0.4) / 3)
    assert m["tpot_p99_s"] == pytest.approx(0.4, rel=0.05)
    assert class_metrics(records, slo_s=0.5)["tpot_slo_attainment"] is None


SYSTEMS = [
    {"name": "fcfs", "kind": "engine", "policy": "fcfs"},
    {"name": "qllm", "kind": "engine", "policy": "qllm"},
    {"name": "cohort", "kind": "engine", "policy": "cohort"},
    {"name": "vllm", "kind": "peer", "policy": "priority"},
]


def cell(system, rate, *, tps, ttft, p99, turn, tpot, tpot_p99=None, ttft_slo=1.0, tpot_slo=1.0):
    ls = {"ttft_mean_s": ttft, "ttft_p99_s": p99, "turnaround_mean_s": turn, "tpot_mean_s": tpot,
          "tpot_p99_s": tpot_p99 or tpot, "slo_attainment": ttft_slo, "ttft_slo_attainment": ttft_slo,
          "tpot_slo_attainment": tpot_slo, "queue_p99_s": 0.0}  # fmt: skip
    be = {"tokens_per_s": tps / 2, "requests_per_s": 1.0, "turnaround_mean_s": 1.0, "ttft_mean_s": 1.0}
    return {"system": system, "rate": rate,
            "metrics": {"ls": ls, "be": be, "all": {"ttft_mean_s": 1.0, "requests_per_s": 1.0, "tokens_per_s": tps}}}  # fmt: skip


CELLS = [
    cell("fcfs", 2.0, tps=100, ttft=0.4, p99=0.8, turn=2.0, tpot=0.08),
    cell("fcfs", 8.0, tps=200, ttft=0.9, p99=2.0, turn=3.0, tpot=0.2),
    # qllm has the best LS TTFT ratio, so it is best_policy; the vLLM figures are cohort's (default)
    cell("qllm", 2.0, tps=90, ttft=0.01, p99=0.02, turn=2.5, tpot=0.1),
    cell("qllm", 8.0, tps=190, ttft=0.02, p99=0.04, turn=3.5, tpot=0.3),
    cell("cohort", 2.0, tps=110, ttft=0.1, p99=0.2, turn=1.0, tpot=0.04, tpot_p99=0.05, tpot_slo=0.9),
    cell("cohort", 8.0, tps=190, ttft=0.2, p99=0.5, turn=1.5, tpot=0.06, tpot_p99=0.09, tpot_slo=0.7),
    cell("vllm", 2.0, tps=100, ttft=0.5, p99=1.0, turn=1.2, tpot=0.05),
    cell("vllm", 8.0, tps=200, ttft=1.6, p99=5.0, turn=3.0, tpot=0.1),
]
ISOLATED = {
    "fcfs": {"tpot_mean_s": 0.02, "tpot_p99_s": 0.03, "turnaround_mean_s": 0.5},
    "qllm": {"tpot_mean_s": 0.02, "tpot_p99_s": 0.03, "turnaround_mean_s": 0.5},
    "cohort": {"tpot_mean_s": 0.02, "tpot_p99_s": 0.03, "turnaround_mean_s": 0.5},
    "vllm": {"tpot_mean_s": 0.025, "tpot_p99_s": 0.025, "turnaround_mean_s": 0.6},
}


def test_vllm_figures_compare_the_default_policy_at_its_worst_rate():
    h = headline(SYSTEMS, CELLS, isolated_p99=0.1, ls_share=0.3, isolated=ISOLATED)
    assert h["best_policy"] == "qllm" and h["ours"] == "cohort" and h["vllm"] == "vllm"
    assert h["peer"] is None  # vLLM does not stand in for transformers' peer
    assert h["vs_vllm_by_rate"]["throughput_vs_vllm"] == pytest.approx([1.1, 0.95])
    assert h["throughput_vs_vllm"] == pytest.approx(0.95)  # ours / vLLM's, worst rate
    assert h["ls_ttft_mean_vs_vllm"] == pytest.approx(5.0)  # vLLM's / ours: 0.5/0.1, 1.6/0.2
    assert h["ls_ttft_p99_vs_vllm"] == pytest.approx(5.0)  # 1.0/0.2, 5.0/0.5
    assert h["ls_turnaround_vs_vllm"] == pytest.approx(1.2)  # 1.2/1.0, 3.0/1.5
    assert h["ls_tpot_vs_vllm"] == pytest.approx(1.25)  # 0.05/0.04, 0.1/0.06


def test_every_system_gets_ls_tpot_and_turnaround_over_its_own_isolated_values():
    h = headline(SYSTEMS, CELLS, isolated_p99=0.1, ls_share=0.3, isolated=ISOLATED)
    assert h["ls_tpot_over_isolated"] == pytest.approx(
        {"fcfs": 10.0, "qllm": 15.0, "cohort": 3.0, "vllm": 4.0}
    )
    assert h["ls_tpot_p99_over_isolated"]["cohort"] == pytest.approx(3.0)  # 0.09 / 0.03
    assert h["ls_turnaround_over_isolated"]["vllm"] == pytest.approx(5.0)  # 3.0 / 0.6
    assert h["by_system"]["cohort"]["ls_tpot_over_isolated_by_rate"] == pytest.approx([2.0, 3.0])
    assert h["ls_tpot_slo_attainment"]["cohort"] == pytest.approx(0.7)  # the worst rate
    assert h["ls_ttft_slo_attainment"]["cohort"] == pytest.approx(1.0)
    met = {t["name"]: t["met"] for t in targets(h)}
    assert met["ours_ls_tpot_over_isolated"] is False and met["ls_ttft_mean_vs_vllm"] is True
    assert met["throughput_vs_vllm"] is False and met["ls_turnaround_vs_vllm"] is True


def test_without_vllm_or_yardsticks_the_figures_are_none():
    h = headline(SYSTEMS[:3], CELLS[:6], isolated_p99=0.1, ls_share=0.3)
    assert h["vllm"] is None and h["throughput_vs_vllm"] is None and h["vs_vllm_by_rate"] is None
    assert h["ls_tpot_over_isolated"] == {"fcfs": None, "qllm": None, "cohort": None}


def test_a_recorded_result_gets_tpot_figures_from_its_records():
    # A result saved before TPOT was reported: its cells are recomputed from their records and
    # the single-request decode step stands for the isolated TPOT.
    with open(RESULTS / "kernel16-final-ls30-batch16.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert "tpot_mean_s" not in saved["cells"][0]["metrics"]["ls"]
    result = workload.summarize(saved)
    h = result["headline"]
    for name in ("fcfs", "cohort", "transformers-cb"):
        assert h["ls_tpot_over_isolated"][name] > 1.0
    step = saved["slo"]["decode_step_s"]
    ls = next(c for c in result["cells"] if c["system"] == "cohort" and c["rate"] == 6.0)["metrics"]["ls"]
    assert h["by_system"]["cohort"]["ls_tpot_over_isolated_by_rate"][-1] == pytest.approx(
        ls["tpot_mean_s"] / step, rel=1e-4
    )
    assert 0.0 <= ls["tpot_slo_attainment"] <= 1.0


def test_vllm_is_a_system_name_only_when_asked_for():
    registered = {"fcfs": object, "cohort": object}
    assert "vllm" not in plan.system_names(None, registered)
    assert plan.system_names("fcfs,cohort,vllm", registered) == ["fcfs", "cohort", "vllm"]
    with pytest.raises(ValueError, match="vllm"):
        plan.system_names("vlm", registered)


def test_bench_takes_the_vllm_interpreter_and_tpot_slo():
    parser = argparse.ArgumentParser()
    workload.add_arguments(parser)
    args = parser.parse_args(["--systems", "fcfs,vllm", "--vllm-python", "/x/python", "--tpot-slo", "0.1"])
    assert (args.vllm_python, args.vllm_eager, args.tpot_slo, args.tpot_slo_k) == (
        "/x/python",
        False,
        0.1,
        2.0,
    )


def test_the_default_policy_is_the_registry_default():
    from qllm.policies import DEFAULT_POLICY

    assert summary.DEFAULT_POLICY == DEFAULT_POLICY
