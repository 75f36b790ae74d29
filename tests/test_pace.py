"""LS decode pacing in ``cohort`` (qllm/policies/pace.py): decisions on fake kernels."""

from __future__ import annotations

import pytest
from test_policies import ATTN0, ids, make_kernel, make_request

from qllm.kernel.costs import OpCosts
from qllm.kernel.runtime.ops import OpKind
from qllm.policies.cohort import CohortPolicy
from qllm.policies.pace import SCALE, Pacer

LAYERS = 4


def cpu_costs() -> OpCosts:
    """A MoE op costs 4 ms plus 1.3 ms a row (the CPU of issue 25); attention 1 ms plus 0.1 ms a row."""
    costs = OpCosts()
    for n in (1, 2, 4, 8, 16, 32):
        costs.record(OpKind.ATTENTION, n, 0.001 + 0.0001 * n)
        costs.record(OpKind.MOE, n, 0.004 + 0.0013 * n)
        costs.record(OpKind.HEAD, n, 0.0005)
    return costs


def decoding(rid: str, *, last_token: float, tpot_slo: float | None, op=ATTN0, at_boundary=True):
    view = make_request(rid, "ls", decode=True, op=op, at_boundary=at_boundary)
    request = view._r  # the fake kernel's own request, set up as the kernel would
    request.token_times = [last_token]
    request.slo = (None, tpot_slo)
    return view


def policy(**options) -> CohortPolicy:
    p = CohortPolicy(**{"pace": True, **options})
    p.layers = LAYERS
    return p


def pass_s(p: CohortPolicy, rows: int, costs: OpCosts) -> float:
    return p.rest_s(OpKind.ATTENTION, 0, rows, make_kernel([], costs=costs))


def test_light_ls_load_rides_with_the_whole_cohort():
    costs = cpu_costs()
    ls = decoding("ls", last_token=0.0, tpot_slo=1.0)  # a budget the whole cohort's pass fits
    be = [make_request(f"be{i}", decode=True) for i in range(5)]
    assert ids(policy().select(make_kernel([*be, ls], now=0.0, costs=costs))) == ["ls", *ids(be)]


def test_be_rows_ride_only_while_the_ls_pass_stays_within_its_tpot_budget():
    costs = cpu_costs()
    p = policy()
    # 3 riders fit (the cost model buckets rows: up to 4 cost what 1 does), a 4th does not, and
    # no op of the others fits before the LS pass either
    budget = (pass_s(p, 4, costs) + 0.0005) / SCALE
    ls = decoding("ls", last_token=0.0, tpot_slo=budget)
    be = [make_request(f"be{i}", decode=True, arrival=i) for i in range(8)]
    batch = p.select(make_kernel([*be, ls], now=0.0, costs=costs))
    assert ids(batch) == ["ls", "be0", "be1", "be2"]
    # Later in the same token period the LS pass cannot end by the deadline even alone: only the
    # riders its padded op computes anyway (the cost model's bucket of 4 rows) still ride.
    late = make_kernel([*be, ls], now=0.001, costs=costs)
    assert ids(policy(free=0).select(late)) == ids(policy().select(late)) == ["ls", "be0", "be1", "be2"]


def test_best_effort_work_fills_the_time_the_ls_request_does_not_need():
    costs = cpu_costs()
    p = policy()
    ls = decoding("ls", last_token=0.0, tpot_slo=pass_s(p, 1, costs) * 4)  # room beside its own pass
    # The best-effort cohort is in the middle of its pass, a layer ahead: it cannot ride.
    mid = [make_request(f"be{i}", decode=True, op=(OpKind.MOE, 1, -1), at_boundary=False) for i in range(8)]
    assert ids(p.select(make_kernel([*mid, ls], now=0.0, costs=costs))) == ids(mid)
    # Close to the deadline, the LS row runs first, alone.
    tight = pass_s(p, 1, costs) * 1.05 / SCALE
    ls = decoding("ls", last_token=0.0, tpot_slo=tight)
    assert ids(policy().select(make_kernel([*mid, ls], now=0.0, costs=costs))) == ["ls"]


def test_an_ls_request_out_of_budget_runs_alone_and_best_effort_keeps_its_floor():
    costs = cpu_costs()
    p = policy(floor=0.25)
    ls = decoding("ls", last_token=0.0, tpot_slo=0.001)  # far too tight even alone
    mid = [make_request(f"be{i}", decode=True, op=(OpKind.MOE, 1, -1), at_boundary=False) for i in range(4)]
    picks = [ids(p.select(make_kernel([*mid, ls], now=0.0, costs=costs))) for _ in range(40)]
    fills = sum(1 for b in picks if b != ["ls"])
    assert picks[0] == ["ls"] and fills > 0
    ls_op, fill_op = costs.predict(OpKind.ATTENTION, 1), costs.predict(OpKind.MOE, 4)
    share = fills * fill_op / (fills * fill_op + (40 - fills) * ls_op)
    assert 0.25 <= share <= 0.25 + fill_op / (40 * ls_op)  # the floor, give or take one op


def test_without_best_effort_work_or_with_pacing_off_the_cohort_steps_as_before():
    costs = cpu_costs()
    ls = [decoding(f"ls{i}", last_token=0.0, tpot_slo=0.001) for i in range(3)]
    assert ids(policy().select(make_kernel(ls, costs=costs))) == ["ls0", "ls1", "ls2"]
    be = [make_request(f"be{i}", decode=True) for i in range(5)]
    assert ids(policy(pace=False).select(make_kernel([*be, *ls], costs=costs))) == [
        "ls0",
        "ls1",
        "ls2",
        *ids(be),
    ]


def test_unknown_costs_pace_nothing():
    ls = decoding("ls", last_token=0.0, tpot_slo=0.001)
    be = [make_request(f"be{i}", decode=True) for i in range(3)]
    assert ids(policy().select(make_kernel([*be, ls]))) == ["ls", *ids(be)]


def saturating_costs() -> OpCosts:
    """A MoE op whose time stops growing at 8 rows, where its rows read every expert (the CPU's
    measured curve: 11 ms for 1 row, 38 ms for 8, 40 ms for 12)."""
    costs = OpCosts()
    moe = {1: 0.011, 4: 0.025, 8: 0.038, 12: 0.040, 16: 0.041, 32: 0.042}
    for n, t in moe.items():
        costs.record(OpKind.ATTENTION, n, 0.005 + 0.0003 * n)
        costs.record(OpKind.MOE, n, t)
        costs.record(OpKind.HEAD, n, 0.02)
    return costs


def test_riders_that_cost_the_ls_pass_next_to_nothing_ride_even_past_its_deadline():
    costs = saturating_costs()
    ls = [decoding(f"ls{i}", last_token=0.0, tpot_slo=0.001) for i in range(12)]  # out of budget alone
    be = [make_request(f"be{i}", decode=True, arrival=i) for i in range(40)]
    kernel = make_kernel([*be, *ls], now=0.0, costs=costs, max_batch=64)
    p = policy()
    alone = pass_s(p, 12, costs)
    fits = max(k for k in range(41) if pass_s(p, 12 + k, costs) <= 1.1 * alone)
    # 12 LS rows already read every expert: the riders that add at most 10% to their pass ride
    # (more than a bucket of them, fewer than all); without free riders, only the bucket's.
    assert 4 < fits < 40
    assert ids(p.select(kernel)) == [*ids(ls), *ids(be[:fits])]
    assert ids(policy(free=0, floor=0).select(kernel)) == ids(ls)
    # Where riders cost their rows (a lone LS row), only its bucket's riders ride.
    one = decoding("ls", last_token=0.0, tpot_slo=0.001)
    assert ids(policy(floor=0).select(make_kernel([*be, one], now=0.0, costs=costs))) == [
        "ls",
        "be0",
        "be1",
        "be2",
    ]


def test_options_are_checked():
    with pytest.raises(ValueError, match="floor"):
        Pacer(floor=1.0)
    with pytest.raises(ValueError, match="free"):
        CohortPolicy(free=1.5)
    with pytest.raises(ValueError, match="tpot_scale"):
        CohortPolicy(tpot_scale=0)


def test_a_looser_plan_lets_more_best_effort_rows_ride():
    costs = cpu_costs()
    p = policy()
    budget = (pass_s(p, 4, costs) + 0.0005) / SCALE
    be = [make_request(f"be{i}", decode=True, arrival=i) for i in range(8)]
    ls = decoding("ls", last_token=0.0, tpot_slo=budget)
    assert len(policy().select(make_kernel([*be, ls], costs=costs))) == 4
    loose = policy(tpot_scale=SCALE * pass_s(p, 8, costs) / pass_s(p, 4, costs))
    assert len(loose.select(make_kernel([*be, ls], costs=costs))) == 8
