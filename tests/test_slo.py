"""Per-class SLOs: the engine config, the config file and --slo, a request's own, and the defaults
from the single-request decode step."""

from __future__ import annotations

import pytest

import qllm
from qllm.cli import build_parser
from qllm.commands.serve import overrides
from qllm.kernel.config import ClassSLO, engine_config, parse_slo
from qllm.kernel.costs import OpCosts
from qllm.kernel.runtime.ops import OpKind
from qllm.kernel.slo import TPOT_STEPS, TTFT_STEPS, class_slo, decode_step_s
from qllm.server.config import load_config
from qllm.spec import build_spec


def test_parse_slo_reads_classes_and_figures():
    assert parse_slo("ls:ttft=0.5,tpot=0.1;be:tpot=1") == {
        "ls": {"ttft": 0.5, "tpot": 0.1},
        "be": {"tpot": 1.0},
    }
    for bad in ("xx:ttft=1", "ls:ttfb=1", "ls:ttft=soon", "ls"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo(bad)


def test_engine_config_file_and_command_line_take_slos(tmp_path):
    config = engine_config(settings={"slo": {"ls": {"ttft": 0.5, "tpot": 0.1}}})
    assert config.slo == {"ls": ClassSLO(ttft=0.5, tpot=0.1)}
    with pytest.raises(ValueError, match="slo"):
        engine_config(settings={"slo": {"ls": {"tpot": 0}}})
    with pytest.raises(ValueError, match="slo"):
        engine_config(settings={"slo": {"vip": {"tpot": 1}}})
    path = tmp_path / "qllm.toml"
    path.write_text("[engine.slo.ls]\ntpot = 0.2\n[engine.slo.be]\nttft = 30\n")
    assert load_config(path).engine.slo == {"ls": ClassSLO(tpot=0.2), "be": ClassSLO(ttft=30.0)}
    args = build_parser().parse_args(["serve", "--config", str(path), "--slo", "ls:ttft=0.5,tpot=0.1"])
    assert load_config(args.config, overrides(args)).engine.slo["ls"] == ClassSLO(ttft=0.5, tpot=0.1)
    assert load_config(args.config, overrides(args)).engine.slo["be"] == ClassSLO(ttft=30.0)


def test_a_request_sets_its_own_tpot_slo():
    assert build_spec({"tpot_slo": 0.05}).tpot_slo == 0.05
    assert build_spec({}).tpot_slo is None
    with pytest.raises(ValueError):
        build_spec({"tpot_slo": 0})


def test_defaults_are_steps_of_the_predicted_single_request_pass():
    costs = OpCosts()
    assert decode_step_s(costs, 4) is None  # nothing measured yet
    for kind, seconds in ((OpKind.ATTENTION, 0.001), (OpKind.MOE, 0.004), (OpKind.HEAD, 0.002)):
        costs.record(kind, 1, seconds)
    step = decode_step_s(costs, 4)
    assert step == pytest.approx(4 * 0.005 + 0.002)
    assert class_slo("ls", None, step) == pytest.approx((TTFT_STEPS * step, TPOT_STEPS * step))
    assert class_slo("ls", ClassSLO(tpot=0.5), step) == pytest.approx((TTFT_STEPS * step, 0.5))
    assert class_slo("be", None, step) == (None, None)  # best effort: no SLO unless configured
    assert class_slo("be", ClassSLO(ttft=9.0), step) == (9.0, None)


async def test_requests_are_served_under_their_own_slo_else_their_class_s(tiny):
    async with qllm.Engine(model=tiny, policy="fcfs", slo={"ls": {"ttft": 0.7, "tpot": 0.3}}) as engine:
        own = await engine.generate([5, 6, 7], max_tokens=3, priority="ls", ttft_deadline=2.0, tpot_slo=0.9)
        cls = await engine.generate([5, 6, 7], max_tokens=3, priority="ls", ignore_eos=True)
        be = await engine.generate([5, 6, 7], max_tokens=3, priority="be")
        snapshot = engine.stats()["metrics"]
    assert (own.ttft_slo, own.tpot_slo) == (2.0, 0.9)
    assert (cls.ttft_slo, cls.tpot_slo) == (0.7, 0.3)
    assert (be.ttft_slo, be.tpot_slo) == (None, None)  # measured ops: still no default for BE
    ls = snapshot["ls"]
    assert ls["ttft_slo_met"] + ls["ttft_slo_missed"] == 2
    assert ls["histograms"]["tpot_seconds"]["count"] == 2


async def test_ls_requests_get_default_slos_once_the_step_is_measured(tiny):
    async with qllm.Engine(model=tiny, policy="fcfs") as engine:
        await engine.generate([5, 6, 7], max_tokens=2, priority="be")  # measures the ops
        result = await engine.generate([5, 6, 7], max_tokens=2, priority="ls")
    assert result.ttft_slo is not None and result.tpot_slo is not None
    assert result.ttft_slo == pytest.approx(TTFT_STEPS / TPOT_STEPS * result.tpot_slo)
