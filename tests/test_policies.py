"""Scheduling policies: their decisions on fake kernels, preemption and starvation on a live engine,
isolation of a policy that raises or returns a bad batch, and loading errors.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from types import SimpleNamespace

import pytest
import structlog
import torch
from kernel_helpers import Recorder, greedy

import qllm
from qllm.errors import PolicyError
from qllm.kernel.costs import OpCosts, bucket
from qllm.kernel.program import Forward
from qllm.kernel.request import Phase, Position, PriorityClass, Request
from qllm.kernel.runtime.ops import OpKind
from qllm.kernel.view import CostView, KernelView, MemoryView, RequestView
from qllm.policies import API_VERSION, DEFAULT_POLICY, Policy, available_policies, load_policy
from qllm.policies.cohort import CohortPolicy
from qllm.policies.fcfs import FCFSPolicy
from qllm.policies.priority_aging import PriorityAgingPolicy
from qllm.policies.qllm import QLLMPolicy
from qllm.spec import RequestSpec

ATTN0 = (OpKind.ATTENTION, 0, -1)
ATTN1 = (OpKind.ATTENTION, 1, -1)


# ---------------------------------------------------------------- decisions on fake kernels
def make_request(
    rid: str,
    priority: str = "be",
    *,
    op: tuple[OpKind, int, int] = ATTN0,
    decode: bool = False,
    rank: int = 0,
    arrival: float = 0.0,
    rows: int = 1,
    at_boundary: bool = True,
) -> RequestView:
    """A ready request (its pending op at ``op``), seen as a policy sees it."""
    request = Request(
        id=rid,
        prompt_ids=[1, 2, 3],
        spec=RequestSpec(priority=PriorityClass(priority), rank=rank),
        arrival=arrival,
    )
    request.token_ids = [7] if decode else []
    kind, layer, expert = op
    request.forward = Forward(torch.zeros(rows, dtype=torch.long))
    request.position = Position(kind, layer, expert, at_start=at_boundary)
    return RequestView(request)


def make_kernel(
    ready, *, now: float = 0.0, max_batch: int = 32, waiting=(), live=None, costs: OpCosts | None = None
) -> KernelView:
    return KernelView(
        now=now,
        ready=list(ready),
        waiting=list(waiting),
        live=list(ready if live is None else live),
        max_batch=max_batch,
        memory=MemoryView(None, 0, 0),
        costs=CostView(costs or OpCosts()),
    )


def linear_costs(kind: OpKind, fixed_s: float, per_row_s: float, rows=(4, 8, 16, 32, 64)) -> OpCosts:
    """A cost model that measured ``fixed_s + per_row_s * rows`` for ops of ``kind``."""
    costs = OpCosts()
    for n in rows:
        costs.record(kind, n, fixed_s + per_row_s * n)
    return costs


def ids(batch) -> list[str]:
    return [r.id for r in batch]


def test_qllm_algorithm1_runs_a_full_ls_decode_batch_first():
    ls_d = [make_request(f"lsd{i}", "ls", decode=True, op=ATTN1) for i in range(2)]
    ls_p = make_request("lsp", "ls", op=ATTN0)
    assert ids(QLLMPolicy().select(make_kernel([ls_p, *ls_d], max_batch=2))) == ["lsd0", "lsd1"]


def test_qllm_algorithm1_ls_prefill_filled_from_be_prefill_only():
    ls_p = make_request("lsp", "ls", arrival=2.0)
    be_p = make_request("bep", arrival=0.0)
    be_d = make_request("bed", decode=True, arrival=1.0)
    ls_d = make_request("lsd", "ls", decode=True, op=ATTN1)
    assert ids(QLLMPolicy().select(make_kernel([be_d, be_p, ls_d, ls_p]))) == ["lsp", "bep"]


def test_qllm_algorithm1_ls_decode_filled_from_be_decode_then_be_alone():
    ls_d = make_request("lsd", "ls", decode=True)
    be_d = make_request("bed", decode=True)
    be_p = make_request("bep")
    assert ids(QLLMPolicy().select(make_kernel([be_p, be_d, ls_d]))) == ["lsd", "bed"]
    assert ids(QLLMPolicy().select(make_kernel([be_p, be_d]))) == ["bed", "bep"]
    assert ids(QLLMPolicy().select(make_kernel([be_p]))) == ["bep"]


def test_ls_runs_its_op_furthest_behind_while_be_waits():
    ahead = make_request("ls-ahead", "ls", op=ATTN1, arrival=0.0)
    behind = make_request("ls-behind", "ls", op=ATTN0, arrival=1.0)
    be = make_request("be", op=(OpKind.EXPERT, 0, 3))
    for policy in (QLLMPolicy(), PriorityAgingPolicy()):
        assert ids(policy.select(make_kernel([be, ahead, behind]))) == ["ls-behind"]


def test_fcfs_ignores_classes_and_admits_only_at_iteration_boundaries():
    be = make_request("be", op=ATTN0, arrival=0.0)
    ls = make_request("ls", "ls", op=ATTN1, arrival=1.0)
    policy = FCFSPolicy()
    assert ids(policy.select(make_kernel([ls, be]))) == ["be"]
    assert policy.precedence(ls) == policy.precedence(be)  # nobody preempts anybody
    newcomer = make_request("new", "ls")
    mid_pass = make_request("mid", op=(OpKind.EXPERT, 2, 1), at_boundary=False)
    assert not policy.admit(newcomer, make_kernel([mid_pass]))
    assert policy.admit(newcomer, make_kernel([make_request("b", at_boundary=True)]))
    assert not policy.admit(newcomer, make_kernel([make_request("b")], max_batch=1))


def test_base_policy_ranks_class_then_rank_and_always_admits_ls():
    policy = Policy()
    ls, be, be_urgent = make_request("ls", "ls", rank=5), make_request("be"), make_request("u", rank=-1)
    assert policy.precedence(ls) < policy.precedence(be_urgent) < policy.precedence(be)
    full = make_kernel([make_request("x")], max_batch=1)
    assert policy.admit(ls, full) and not policy.admit(be, full)


def test_priority_aging_runs_be_after_it_waited_max_wait():
    policy = PriorityAgingPolicy(be_share=0.0, max_wait_s=2.0)
    ls = make_request("ls", "ls", op=ATTN0, arrival=0.0)
    be = make_request("be", op=ATTN1, arrival=0.0)
    assert ids(policy.select(make_kernel([ls, be], now=0.0))) == ["ls"]
    assert ids(policy.select(make_kernel([ls, be], now=1.0))) == ["ls"]
    assert ids(policy.select(make_kernel([ls, be], now=2.5))) == ["be"]


def test_priority_aging_grants_starved_be_one_op_then_ls_again():
    policy = PriorityAgingPolicy(be_share=0.0, max_wait_s=2.0)
    ls = make_request("ls", "ls", op=ATTN0, arrival=0.0)
    be_a = make_request("be-a", op=ATTN1, arrival=0.0)
    be_b = make_request("be-b", op=(OpKind.EXPERT, 1, 3), arrival=0.0)  # another op: not batchable with be-a
    kernel = [ls, be_a, be_b]
    assert ids(policy.select(make_kernel(kernel, now=2.5)))[0].startswith("be")  # waited > max_wait
    assert ids(policy.select(make_kernel(kernel, now=2.6))) == ["ls"]  # one BE op, then LS again
    assert ids(policy.select(make_kernel(kernel, now=4.0))) == ["ls"]
    assert ids(policy.select(make_kernel(kernel, now=4.7)))[0].startswith("be")


def test_priority_aging_gives_be_its_share_of_compute_time():
    policy = PriorityAgingPolicy(be_share=0.25, max_wait_s=1e9)
    ls = make_request("ls", "ls", op=ATTN0)
    be = make_request("be", op=ATTN1)
    # Equal 10 ms ops with LS always ready: BE leads about a quarter of the batches.
    led = [ids(policy.select(make_kernel([ls, be], now=i * 0.01)))[0] for i in range(400)]
    assert abs(led.count("be") / len(led) - 0.25) < 0.03
    assert QLLMPolicy().select(make_kernel([ls, be]))[0].id == "ls"  # qllm: never


def test_priority_aging_caps_be_rows_riding_along_with_ls():
    ls = make_request("ls", "ls", rows=1)
    big_be = make_request("be", rows=8)
    assert ids(QLLMPolicy().select(make_kernel([ls, big_be]))) == ["ls", "be"]
    assert ids(PriorityAgingPolicy(fill_rows=4).select(make_kernel([ls, big_be]))) == ["ls"]
    small_be = make_request("be-small", rows=2)
    assert ids(PriorityAgingPolicy(fill_rows=4).select(make_kernel([ls, small_be]))) == ["ls", "be-small"]


def test_priority_aging_takes_no_rider_when_ls_fills_the_batch():
    """LS requests that fill ``max_batch`` leave no room: a BE request at their op waits."""
    ls = [make_request(f"ls{i}", "ls", arrival=i) for i in range(2)]
    be = make_request("be")
    assert ids(PriorityAgingPolicy().select(make_kernel([*ls, be], max_batch=2))) == ["ls0", "ls1"]


EXPERT0 = (OpKind.EXPERT, 0, 2)


def test_cohort_ls_prefill_leads_and_ready_rows_at_its_op_ride_along():
    ls = make_request("ls", "ls", op=EXPERT0, rows=4, arrival=5.0)
    be_d = [make_request(f"bed{i}", decode=True, op=EXPERT0, arrival=i) for i in range(3)]
    be_p = make_request("bep", op=EXPERT0, rows=6, arrival=0.5)  # a prefill chunk rides too
    ls_d = make_request("lsd", "ls", decode=True, op=EXPERT0, arrival=9.0)
    behind = make_request("be-behind", op=ATTN0, arrival=0.0)  # another op: waits
    kernel = make_kernel([*be_d, be_p, ls_d, behind, ls], costs=linear_costs(OpKind.EXPERT, 0.002, 0.0))
    assert ids(CohortPolicy(stretch=1.3).select(kernel)) == ["ls", "lsd", "bed0", "bep", "bed1", "bed2"]


def test_cohort_riders_stop_at_the_latency_budget():
    # 1 ms + 0.1 ms a row: 4 LS rows predict 1.4 ms alone, so stretch 1.3 allows 1.82 ms: 8 rows.
    costs = linear_costs(OpKind.EXPERT, 0.001, 0.0001)
    ls = make_request("ls", "ls", op=EXPERT0, rows=4, arrival=5.0)
    big = make_request("be-chunk", op=EXPERT0, rows=8, arrival=0.0)  # 12 rows: 2.2 ms, over budget
    small = [make_request(f"be{i}", decode=True, op=EXPERT0, arrival=1.0 + i) for i in range(6)]
    policy = CohortPolicy(stretch=1.3)
    kernel = make_kernel([big, *small, ls], costs=costs)
    batch = policy.select(kernel)
    assert ids(batch) == ["ls", "be0", "be1", "be2", "be3"]
    rows = sum(r.rows for r in batch)
    budget = policy.budget_s(OpKind.EXPERT, 4, kernel)
    assert budget == pytest.approx(1.3 * 0.0014)
    assert costs.predict(OpKind.EXPERT, rows) <= budget < costs.predict(OpKind.EXPERT, rows + 1)
    # Before anything is measured, the LS rows run alone (their time teaches the model) ...
    assert ids(policy.select(make_kernel([big, *small, ls]))) == ["ls"]
    # ... and with one bucket measured, time is taken as proportional to rows: at stretch 2, the
    # 4 LS rows take 4 more (the 8-row chunk does not fit), at 1.3 none.
    one = OpCosts()
    one.record(OpKind.EXPERT, 4, 0.002)
    assert ids(CohortPolicy(stretch=2).select(make_kernel([big, *small, ls], costs=one))) == [
        "ls", "be0", "be1", "be2", "be3"
    ]  # fmt: skip
    assert ids(policy.select(make_kernel([big, *small, ls], costs=one))) == ["ls"]


def test_cohort_ls_runs_alone_until_it_reaches_the_cohort():
    policy = CohortPolicy(stretch=1.3)
    policy.layers = 8
    cohort = [make_request(f"be{i}", op=(OpKind.EXPERT, 3, 1), at_boundary=False) for i in range(3)]
    ls = make_request("ls", "ls", op=ATTN0, arrival=9.0)
    assert ids(policy.select(make_kernel([*cohort, ls]))) == ["ls"]
    ls_at_3 = make_request("ls", "ls", op=(OpKind.EXPERT, 3, 1), arrival=9.0, at_boundary=False)
    flat = linear_costs(OpKind.EXPERT, 0.002, 0.0)  # riders cost nothing here
    assert ids(policy.select(make_kernel([*cohort, ls_at_3], costs=flat))) == ["ls", "be0", "be1", "be2"]
    assert ids(policy.select(make_kernel(cohort))) == ["be0", "be1", "be2"]


def test_cohort_ls_that_reached_the_cohort_advances_with_it_within_its_slack():
    costs = linear_costs(OpKind.EXPERT, 0.010, 0.0)  # every expert op: 10 ms
    costs.record(OpKind.ATTENTION, 4, 0.010)
    policy = CohortPolicy(stretch=1.3)
    policy.layers = 8
    ls = make_request("ls", "ls", op=(OpKind.EXPERT, 3, 4), arrival=0.0, at_boundary=False)
    at_1 = make_request("be-e1", op=(OpKind.EXPERT, 3, 1), at_boundary=False)
    at_4 = make_request("be-e4", op=(OpKind.EXPERT, 3, 4), at_boundary=False)
    ahead = make_request("be-e6", op=(OpKind.EXPERT, 3, 6), at_boundary=False)
    # The LS request ran 20 ops alone (200 ms predicted) in 210 ms: 1.3 x 210 - 210 - 10 = 53 ms of
    # slack, so the part of the cohort at a smaller expert of the layer runs first ...
    policy.solo_s["ls"] = 0.200
    assert policy.slack_s(ls, make_kernel([ls], now=0.210, costs=costs)) == pytest.approx(0.053)
    assert ids(policy.select(make_kernel([ls, at_1, at_4, ahead], now=0.210, costs=costs))) == ["be-e1"]
    # ... then the LS request and the cohort run each op together.
    assert ids(policy.select(make_kernel([ls, at_4, ahead], now=0.220, costs=costs))) == ["ls", "be-e4"]
    assert policy.solo_s["ls"] == pytest.approx(0.210)
    # Past the layer's experts the LS request waits for the rest of the layer, not for fragments
    # left further behind (those rejoin at the step boundary).
    ls_next = make_request("ls", "ls", op=(OpKind.ATTENTION, 4, -1), arrival=0.0, at_boundary=False)
    far = make_request("be-far", op=(OpKind.EXPERT, 1, 0), at_boundary=False)
    assert ids(policy.select(make_kernel([ls_next, ahead, far], now=0.230, costs=costs))) == ["be-e6"]
    assert ids(policy.select(make_kernel([ls_next, far], now=0.240, costs=costs))) == ["ls"]
    # Out of slack, the LS request runs on alone, taking nobody along (not even at its own op).
    late = make_kernel([ls, at_1, at_4, ahead], now=0.300, costs=costs)
    assert policy.slack_s(ls, late) < 0 and ids(policy.select(late)) == ["ls"]


def test_cohort_oldest_ls_leads_and_newer_ones_within_a_layer_join_it():
    # A newer LS request a few layers behind waits: catching up would cost the oldest its slack.
    old = make_request("ls-old", "ls", op=(OpKind.EXPERT, 2, 1), arrival=1.0, at_boundary=False)
    new = make_request("ls-new", "ls", op=ATTN0, arrival=2.0)
    policy = CohortPolicy(stretch=1.3)
    policy.layers = 8
    assert ids(policy.select(make_kernel([new, old]))) == ["ls-old"]
    # Less than a layer behind, it catches up whatever the slack: the two then run as one batch.
    near = make_request("ls-old", "ls", op=(OpKind.ATTENTION, 1, -1), arrival=1.0, at_boundary=False)
    assert ids(policy.select(make_kernel([new, near], now=5.0))) == ["ls-new"]
    # A better-ranked LS request leads whatever its age.
    urgent = make_request("ls-urgent", "ls", op=(OpKind.EXPERT, 2, 1), rank=-1, at_boundary=False)
    flat = linear_costs(OpKind.EXPERT, 0.002, 0.0)  # riders cost nothing here
    assert ids(CohortPolicy(stretch=1.3).select(make_kernel([new, old, urgent], costs=flat))) == [
        "ls-urgent",
        "ls-old",
    ]


def test_cohort_pairs_lets_an_early_second_ls_request_catch_up_and_a_late_one_wait():
    """With ``pairs``, the next LS request catches up with the lead where the two passes are then
    predicted to end with a lower worse ratio to each one's pass alone; else it waits its turn."""
    costs = linear_costs(OpKind.MOE, 0.008, 0.0005)  # 10 ms at 4 rows, 12 ms at 8
    for n in (4, 8, 16, 32, 64):
        costs.record(OpKind.ATTENTION, n, 0.005)
    costs.record(OpKind.HEAD, 1, 0.010)

    def decide(pairs: bool, layer: int, now: float) -> list[str]:
        second = make_request("ls-new", "ls", op=ATTN0, arrival=now - 0.005, rows=4)
        policy = CohortPolicy(pairs=pairs)
        policy.layers = 8
        lead = make_request("ls-old", "ls", op=(OpKind.ATTENTION, layer, -1), rows=4, at_boundary=False)
        policy.solo_s["ls-old"] = layer * 0.015  # its ops so far, alone
        return ids(policy.select(make_kernel([second, lead], now=now, costs=costs)))

    # The second arrived 5 ms ago. Lead 2 layers in: waiting would give the second 1.81x its
    # pass alone; catching up 30 ms and sharing 6 layers (17 ms each) ends both at 1.32x at worst.
    assert decide(pairs=True, layer=2, now=0.030) == ["ls-new"]
    assert decide(pairs=False, layer=2, now=0.030) == ["ls-old"]
    # Lead 7 layers in: catching up would cost it 105 ms (1.82x); the second waits (1.23x).
    assert decide(pairs=True, layer=7, now=0.105) == ["ls-old"]
    assert CohortPolicy().pairs is False and load_policy("cohort:pairs=true").pairs is True


def test_cohort_slack_covers_the_whole_pass_of_the_lead():
    """With grouped MoE ops measured, the lead's slack is ``stretch`` times its whole pass alone
    (predicted), less the time since it arrived and the rest of its pass alone: it can be spent
    at the start, on riders and on a cohort that catches up."""
    costs = linear_costs(OpKind.MOE, 0.010, 0.0)  # every MoE op: 10 ms
    for n in (4, 8, 16, 32, 64):
        costs.record(OpKind.ATTENTION, n, 0.005)
    costs.record(OpKind.HEAD, 1, 0.010)
    policy = CohortPolicy(stretch=1.3)
    policy.layers = 8
    ls = make_request("ls", "ls", op=ATTN0, arrival=0.0, rows=4)
    kernel = make_kernel([ls], now=0.010, costs=costs)
    # 8 layers x 15 ms + 10 ms head = 130 ms alone: 1.3 x 130 - 10 - 130 = 29 ms.
    assert policy.remaining_s(ls, kernel) == pytest.approx(0.130)
    assert policy.slack_s(ls, kernel) == pytest.approx(0.029)
    # A cohort that starts its next pass (at boundary) just behind the lead catches up first ...
    lead = make_request("ls", "ls", op=(OpKind.MOE, 0, -1), arrival=0.0, rows=4, at_boundary=False)
    policy.solo_s["ls"] = 0.005
    cohort = [make_request(f"be{i}", decode=True, op=ATTN0) for i in range(3)]
    assert ids(policy.select(make_kernel([lead, *cohort], now=0.015, costs=costs))) == ["be0", "be1", "be2"]
    # ... and not once the lead is out of slack.
    assert ids(policy.select(make_kernel([lead, *cohort], now=0.060, costs=costs))) == ["ls"]


def test_cohort_tail_lets_a_short_ls_request_take_riders_up_to_a_long_ones_pass_alone():
    """With ``tail``, an LS request may take as long as the recent long LS requests' passes alone
    (their 90th percentile, predicted): a short one lets the cohort ride its ops, a long one
    still runs alone, and without ``tail`` the short one runs alone too."""
    costs = linear_costs(OpKind.MOE, 0.002, 0.001)  # 6 ms at 4 rows, 66 ms at 64
    for n in (4, 8, 16, 32, 64):
        costs.record(OpKind.ATTENTION, n, 0.001 + 0.0001 * n)
    costs.record(OpKind.HEAD, 1, 0.010)
    cohort = [make_request(f"be{i}", decode=True, op=ATTN0, arrival=0.1 * i) for i in range(8)]

    def first_batch(policy: CohortPolicy, rows: int, rid: str, now: float) -> list[str]:
        ls = make_request(rid, "ls", op=ATTN0, arrival=now, rows=rows)
        batch = ids(policy.select(make_kernel([*cohort, ls], now=now, costs=costs)))
        policy.on_finish(ls, make_kernel([], costs=costs))
        return batch

    policy = CohortPolicy(tail=True)
    policy.layers = 8
    for i in range(9):  # long LS requests: each alone (its own pass is the tail)
        assert first_batch(policy, 64, f"long{i}", now=1.0 + i) == [f"long{i}"]
    # 8 layers of (66 + 7.4) ms + 10 ms head: the tail of recent passes alone is 597 ms.
    assert max(policy.passes) == pytest.approx(8 * (0.066 + 0.0074) + 0.010)
    # A short LS request (4 rows: 8 x 7.4 ms + 10 ms alone) takes the cohort along at its first op.
    assert first_batch(policy, 4, "short", now=20.0) == ["short", *ids(cohort)]
    plain = CohortPolicy()
    plain.layers = 8
    assert first_batch(plain, 4, "short", now=20.0) == ["short"]
    assert load_policy("cohort:tail=true").tail is True and CohortPolicy().tail is False


def test_cohort_riders_never_take_more_than_the_slack():
    costs = linear_costs(OpKind.EXPERT, 0.001, 0.0001)
    policy = CohortPolicy(stretch=1.3)
    kernel = make_kernel([], costs=costs)
    alone = costs.predict(OpKind.EXPERT, 4)
    assert policy.budget_s(OpKind.EXPERT, 4, kernel) == pytest.approx(1.3 * alone)
    assert policy.budget_s(OpKind.EXPERT, 4, kernel, slack=0.0001) == pytest.approx(alone + 0.0001)
    assert policy.budget_s(OpKind.EXPERT, 4, kernel, slack=-1.0) == pytest.approx(alone)


def test_cohort_and_fcfs_let_best_effort_arrivals_leave_the_op_in_flight_running():
    ls, be = make_request("ls", "ls"), make_request("be")
    assert CohortPolicy(stretch=1.3).interrupts(ls) and not CohortPolicy(stretch=1.3).interrupts(be)
    assert not load_policy("fcfs").interrupts(ls)
    assert load_policy("qllm").interrupts(be)  # Algorithm 1 looks at every arrival at once


def test_cohort_left_behind_requests_rejoin_at_the_step_boundary():
    # Two BE requests start their next pass; one is still at layer 2 of the previous one: it
    # catches up first, so the three start the next pass together instead of trailing.
    at_boundary = [make_request(f"be{i}", decode=True, op=ATTN0) for i in range(2)]
    behind = make_request("late", decode=True, op=(OpKind.EXPERT, 2, 5), at_boundary=False)
    ls_decode = make_request("lsd", "ls", decode=True, op=ATTN0)
    assert ids(CohortPolicy(stretch=1.3).select(make_kernel([*at_boundary, ls_decode, behind]))) == ["late"]
    assert ids(CohortPolicy(stretch=1.3).select(make_kernel([*at_boundary, ls_decode]))) == [
        "lsd",
        "be0",
        "be1",
    ]


def test_cohort_runs_at_most_max_batch_requests_per_step_and_parks_the_newest_best_effort():
    """LS requests are admitted beyond max_batch: then the newest best-effort requests wait where
    they stand, rather than the cohort running each op twice (max_batch rows, then the rest)."""
    policy = CohortPolicy(stretch=1.3)
    moe2 = (OpKind.MOE, 2, -1)
    be = [make_request(f"be{i}", decode=True, op=moe2, at_boundary=False, arrival=i) for i in range(4)]
    ls_decode = make_request("lsd", "ls", decode=True, op=moe2, at_boundary=False, arrival=9.0)
    everyone = [*be, ls_decode]
    kernel = make_kernel(everyone, max_batch=4)
    assert ids(policy.runnable(kernel)) == ["be0", "be1", "be2", "lsd"]
    assert ids(policy.select(kernel)) == ["lsd", "be0", "be1", "be2"]
    for r in (ls_decode, *be[:3]):  # the batch ran its op: the parked request is furthest behind ...
        r._r.position = Position(OpKind.ATTENTION, 3, at_start=False)
    # ... and still waits: the cohort goes on whole instead of trailing it as a one-row op.
    assert ids(policy.select(kernel)) == ["lsd", "be0", "be1", "be2"]
    # Mid-pass best-effort requests come before those at a pass boundary; a newcomer waiting for
    # its first token is always runnable; with room, nobody waits.
    fresh = make_request("fresh", decode=True, op=ATTN0, arrival=-1.0)
    assert "fresh" not in ids(policy.runnable(make_kernel([fresh, *everyone], max_batch=5)))
    ls = make_request("ls", "ls", op=ATTN0, rows=3, arrival=30.0)
    assert "ls" in ids(policy.runnable(make_kernel([*everyone, ls], max_batch=4)))
    assert len(policy.runnable(make_kernel(everyone, max_batch=5))) == 5


def test_cohort_is_the_default_and_keeps_max_batch():
    assert DEFAULT_POLICY == "cohort"
    ls = make_request("ls", "ls", op=EXPERT0)
    be = [make_request(f"be{i}", op=EXPERT0, arrival=i) for i in range(5)]
    flat = linear_costs(OpKind.EXPERT, 0.002, 0.0)  # riders cost nothing here
    assert ids(CohortPolicy(stretch=1.3).select(make_kernel([*be, ls], max_batch=3, costs=flat))) == [
        "ls",
        "be0",
        "be1",
    ]
    assert ids(CohortPolicy(stretch=1.3).select(make_kernel(be, max_batch=3))) == ["be0", "be1", "be2"]
    with pytest.raises(ValueError, match="stretch"):
        CohortPolicy(stretch=0.5)


def test_recorder_wraps_the_whole_policy_api():
    api = {n for n, v in vars(Policy).items() if inspect.isfunction(v) and not n.startswith("_")}
    assert api <= set(vars(Recorder)), api - set(vars(Recorder))


# ---------------------------------------------------------------- preemption on a live engine
BE_PROMPT = list(range(100, 140))  # 40 tokens: 5 prefill chunks of 8, 9 ops each (4 layers + head)
LS_PROMPT = [7, 8, 9, 10, 11]


async def be_then_ls(model, policy: str, ls_after: int):
    """A long BE request; an LS request arrives right after batch ``ls_after`` ran."""
    recorder = Recorder(load_policy(policy))
    handles = {}
    async with qllm.Engine(model=model, policy=recorder, prefill_chunk=8) as engine:

        def submit_ls():
            handles["ls"] = engine.submit(LS_PROMPT, max_tokens=4, priority="ls", ignore_eos=True)

        recorder.at[ls_after] = [submit_ls]
        handles["be"] = engine.submit(BE_PROMPT, max_tokens=12, priority="be", ignore_eos=True)
        be = await handles["be"].result()
        ls = await handles["ls"].result()
    return ls, be, recorder


@pytest.mark.parametrize("policy", ["qllm", "priority-aging", "cohort"])
@pytest.mark.parametrize("ls_after", [20, 100], ids=["mid-prefill", "mid-decode"])
async def test_ls_preempts_running_be_within_one_op(tiny, policy, ls_after):
    ls, be, recorder = await be_then_ls(tiny, policy, ls_after)

    assert ls.finished < be.finished
    assert be.preemptions >= 1 and ls.preemptions == 0
    # The LS request arrived while batch `ls_after` was chosen; its first op is the very next batch.
    assert recorder.first_batch(ls.id) == ls_after + 1
    assert be.token_ids == greedy(tiny, BE_PROMPT, 12, 8)


@pytest.mark.parametrize("ls_after", [20, 100], ids=["mid-prefill", "mid-decode"])
async def test_fcfs_never_preempts(tiny, ls_after):
    ls, be, recorder = await be_then_ls(tiny, "fcfs", ls_after)

    assert be.preemptions == 0 and ls.preemptions == 0
    # The LS request waits for the BE request's forward pass to end (iteration-level scheduling).
    assert recorder.first_batch(ls.id) > ls_after + 1
    assert be.token_ids == greedy(tiny, BE_PROMPT, 12, 8)


@pytest.mark.parametrize("policy", ["qllm", "priority-aging", "cohort", "fcfs"])
async def test_waiting_ls_is_admitted_before_waiting_be(tiny, policy):
    """With the batch full, an LS request that arrives behind queued BE requests starts first
    under the LS-first policies; fcfs keeps arrival order."""
    recorder = Recorder(load_policy(policy))
    async with qllm.Engine(model=tiny, policy=recorder, max_batch=2, prefill_chunk=8) as engine:
        running = [engine.submit(BE_PROMPT, max_tokens=6, ignore_eos=True) for _ in range(2)]
        queued = [engine.submit(BE_PROMPT[:10], max_tokens=2, ignore_eos=True) for _ in range(3)]
        ls = engine.submit(LS_PROMPT, max_tokens=2, priority="ls", ignore_eos=True)
        results = [await h.result() for h in (*running, *queued, ls)]
    ls_result, queued_results = results[-1], results[2:5]
    first_queued = min(r.first_scheduled for r in queued_results)
    if policy == "fcfs":
        assert ls_result.first_scheduled > first_queued
    else:
        assert ls_result.first_scheduled < first_queued
    assert ls_result.token_ids == greedy(tiny, LS_PROMPT, 2, 8)
    assert all(r.status == "length" for r in results)


# ---------------------------------------------------------------- the latency budget on a live engine
LAW = {  # seconds of a batched op: fixed + per row (padded like the executor)
    OpKind.ATTENTION: (0.003, 0.0005),
    OpKind.ROUTER: (0.001, 0.00005),
    OpKind.EXPERT: (0.002, 0.0001),
    OpKind.HEAD: (0.005, 0.0),
    OpKind.MOE: (0.004, 0.0002),
}


class OpClock:
    """A fake device: each batched op advances the kernel's op timer by ``LAW`` for its rows."""

    def __init__(self, model):
        self.model_run = model.run
        self.now = 0.0
        self.ops: list[tuple[OpKind, int, float]] = []  # (kind, rows, seconds) of each batched op

    def run(self, ops, stop=None):
        results = self.model_run(ops, stop)
        fixed, per_row = LAW[ops[0].kind]
        seconds = fixed + per_row * bucket(sum(op.rows for op in ops))
        self.ops.append((ops[0].kind, sum(op.rows for op in ops), seconds))
        self.now += seconds
        return results


class BudgetRecorder(Recorder):
    """Records, for each LS-led batch with riders, what the policy predicted and allowed."""

    def __init__(self, inner: CohortPolicy):
        super().__init__(inner)
        self.ridden: list[dict] = []

    def select(self, kernel):
        batch = super().select(kernel)
        leads = [r for r in batch if r.is_ls and r.phase is Phase.PREFILL]
        if leads and len(batch) > len(leads):
            kind, lead_rows = batch[0].op_kind, sum(r.rows for r in leads)
            self.ridden.append({
                "batch": len(self.batches) - 1,
                "riders": [r.priority_class for r in batch if r not in leads],
                "left": [r for r in kernel.ready if r.op_key == batch[0].op_key and r not in batch],
                "predicted": kernel.costs.predict(kind, sum(r.rows for r in batch)),
                "budget": self.inner.budget_s(kind, lead_rows, kernel),
            })  # fmt: skip
        return batch


async def test_cohort_ls_op_with_riders_is_predicted_and_measured_within_the_budget(tiny, monkeypatch):
    """The kernel times ops on a fake device whose op time grows with rows (``LAW``): every LS op
    that took riders was predicted, by the kernel's cost model, and measured, by the kernel's own
    op timer, within the budget of ``stretch`` times the LS rows alone."""
    import qllm.kernel.runner as runner

    device = OpClock(tiny)
    monkeypatch.setattr(tiny, "run", device.run)
    monkeypatch.setattr(
        runner, "time", SimpleNamespace(perf_counter=lambda: device.now, monotonic=time.monotonic)
    )
    recorder = BudgetRecorder(CohortPolicy(stretch=1.2))
    be_prompts = [list(range(10, 10 + n)) for n in (3, 5, 8, 11, 14, 6)]
    async with qllm.Engine(model=tiny, policy=recorder, prefill_chunk=16, moe_granularity="expert") as engine:

        def submit_ls():
            handles.append(engine.submit(LS_PROMPT, max_tokens=3, priority="ls", ignore_eos=True))

        handles = [engine.submit(p, max_tokens=10, ignore_eos=True) for p in be_prompts]
        recorder.at[60] = [submit_ls]
        recorder.at[150] = [submit_ls, submit_ls]
        results = [await h.result() for h in handles]
        costs = engine.stats()["kernel"]["op_costs"]

    assert [r.token_ids for r in results] == [
        greedy(tiny, p, n, 16) for p, n in [*((p, 10) for p in be_prompts), *[(LS_PROMPT, 3)] * 3]
    ]
    assert set(costs) == {"attention", "router", "expert", "head"}
    with_budget = [d for d in recorder.ridden if d["budget"] is not None]
    assert with_budget and any(PriorityClass.BE in d["riders"] for d in with_budget)
    assert any(d["left"] for d in with_budget)  # the budget, not max_batch, cut some riders
    for d in with_budget:
        measured = device.ops[d["batch"]][2]
        assert d["predicted"] <= d["budget"] + 1e-12, d
        assert measured <= d["budget"] + 1e-12, (d, measured)


# ---------------------------------------------------------------- starvation
class Feeder(Recorder):
    """Keeps ``ls_live`` LS requests live: each finished LS request is replaced at once, so LS work
    is ready at every decision, until ``stop()`` says so or ``cap`` LS requests were submitted."""

    def __init__(self, inner: Policy, engine_ref: list, *, ls_live: int = 2, cap: int):
        super().__init__(inner)
        self.engine_ref = engine_ref
        self.cap = cap
        self.ls: list = []
        self.stopped = False
        self.ls_live = ls_live

    def feed(self) -> None:
        if not self.stopped and len(self.ls) < self.cap:
            engine = self.engine_ref[0]
            self.ls.append(engine.submit(LS_PROMPT, max_tokens=4, priority="ls", ignore_eos=True))

    def on_finish(self, request, kernel) -> None:
        super().on_finish(request, kernel)
        if request.is_ls:
            self.feed()


async def sustained_ls(model, policy: str, cap: int, moe: str = "layer"):
    """A short BE request under a stream of LS requests (2 always live, at most ``cap``)."""
    engine_ref: list = []
    feeder = Feeder(load_policy(policy), engine_ref, cap=cap)
    async with qllm.Engine(model=model, policy=feeder, prefill_chunk=8, moe_granularity=moe) as engine:
        engine_ref.append(engine)
        be = engine.submit([3, 4, 5, 6], max_tokens=4, priority="be", ignore_eos=True)
        for _ in range(feeder.ls_live):
            feeder.feed()
        be_result = await be.result()
        feeder.stopped = True
        ls_results = [await h.result() for h in list(feeder.ls)]
    return be_result, ls_results, feeder


@pytest.mark.parametrize("policy", ["priority-aging", "cohort"])
async def test_be_finishes_under_sustained_ls_load(tiny, policy):
    be, ls, feeder = await sustained_ls(tiny, policy, cap=400)

    assert be.status == "length" and len(be.token_ids) == 4
    # The LS stream was still going when BE finished: BE got its share, not the leftovers.
    assert len(ls) < feeder.cap
    assert sum(r.finished > be.finished for r in ls) >= feeder.ls_live
    assert be.token_ids == greedy(tiny, [3, 4, 5, 6], 4, 8)


async def test_qllm_starves_be_while_ls_is_always_ready(tiny):
    """``qllm`` runs BE only when no LS work is ready (or riding along at the very same op), so with
    LS always ready the BE request produces nothing until the LS stream ends: the starvation the
    paper names, which ``priority-aging`` bounds. At the paper's granularity, one op per expert:
    with grouped MoE ops a BE request at the LS requests' op rides along at every op of the pass."""
    be, ls, feeder = await sustained_ls(tiny, "qllm", cap=8, moe="expert")

    assert len(ls) == feeder.cap
    last_ls = max(r.finished for r in ls)
    assert be.first_token > last_ls
    assert feeder.ops_of(be.id) > 0 and be.status == "length"


# ---------------------------------------------------------------- faulty policies
class Raising(Policy):
    name = "raising"

    def __init__(self, method: str):
        self.method = method

    def _maybe_raise(self, method: str) -> None:
        if method == self.method:
            raise RuntimeError(f"{method} exploded")

    def select(self, kernel):
        self._maybe_raise("select")
        return super().select(kernel)

    def admit(self, request, kernel):
        self._maybe_raise("admit")
        return super().admit(request, kernel)

    def precedence(self, request):
        self._maybe_raise("precedence")
        return super().precedence(request)

    def on_arrival(self, request, kernel):
        self._maybe_raise("on_arrival")

    def on_finish(self, request, kernel):
        self._maybe_raise("on_finish")


class RaisingDefault(CohortPolicy):
    """A subclass of the default policy (same name) whose select raises."""

    def select(self, kernel):
        raise RuntimeError("select exploded")


class BadBatch(Policy):
    name = "bad-batch"

    def __init__(self, kind: str):
        self.kind = kind

    def select(self, kernel):
        ready = list(kernel.ready)
        good = list(super().select(kernel))
        if self.kind == "mixed-keys":
            return ready if len({r.op_key for r in ready}) > 1 else good
        if self.kind == "unknown-id":
            return [type("Fake", (), {"id": "no-such-request"})()]
        if self.kind == "duplicate":
            return [good[0], good[0]]
        if self.kind == "too-many":  # every ready request at the op, past max_batch
            return [r for r in ready if r.op_key == good[0].op_key]
        return {"empty": [], "none": None, "not-a-list": 42}[self.kind]


async def serve_two(model, policy):
    """A BE request and an LS request arriving a few ops into it; returns results and logs."""
    async with qllm.Engine(model=model, policy=policy, prefill_chunk=4, max_batch=2) as engine:
        with structlog.testing.capture_logs() as logs:
            be = engine.submit([20, 21, 22, 23, 24, 25], max_tokens=3, priority="be", ignore_eos=True)
            chunks = aiter(be)
            await anext(chunks)  # BE has its first token: it is mid-decode
            await chunks.aclose()
            ls = engine.submit([30, 31, 32], max_tokens=3, priority="ls", ignore_eos=True)
            async with asyncio.timeout(60):
                results = [await be.result(), await ls.result()]
            stats = engine.stats()
    return results, logs, stats


def assert_correct(model, results):
    prompts = {"be": [20, 21, 22, 23, 24, 25], "ls": [30, 31, 32]}
    for result in results:
        assert (result.status, result.token_ids) == ("length", greedy(model, prompts[result.priority], 3, 4))


@pytest.mark.parametrize("method", ["select", "admit", "precedence", "on_arrival", "on_finish"])
async def test_policy_that_raises_is_logged_and_the_default_decides(tiny, method):
    results, logs, stats = await serve_two(tiny, Raising(method))

    assert_correct(tiny, results)
    errors = [e for e in logs if e["event"] == "policy_error"]
    assert errors and all(e["method"] == method and e["policy"] == "raising" for e in errors)
    assert all(e["log_level"] == "error" and e.get("exc_info") for e in errors)
    assert stats["kernel"]["policy_errors"] == len(errors)
    assert stats["live"] == {"ls": {}, "be": {}} and stats["memory"]["resident_bytes"] == 0


async def test_a_raising_subclass_of_the_default_policy_falls_back_to_the_builtin(tiny):
    results, logs, stats = await serve_two(tiny, RaisingDefault())

    assert_correct(tiny, results)
    assert stats["kernel"]["policy_errors"] > 0
    assert {e["method"] for e in logs if e["event"] == "policy_error"} == {"select"}


@pytest.mark.parametrize("kind", ["mixed-keys", "unknown-id", "duplicate", "empty", "none", "not-a-list"])
async def test_invalid_batch_is_logged_and_the_default_decides(tiny, kind):
    results, logs, stats = await serve_two(tiny, BadBatch(kind))

    assert_correct(tiny, results)
    bad = [e for e in logs if e["event"] == "policy_bad_batch"]
    assert bad and all(e["policy"] == "bad-batch" and e["log_level"] == "error" for e in bad)
    assert stats["kernel"]["policy_errors"] == len(bad)


async def test_batch_over_max_batch_is_logged_and_the_default_decides(tiny):
    prompt = [40, 41, 42, 43]
    async with qllm.Engine(model=tiny, policy=BadBatch("too-many"), max_batch=2) as engine:
        with structlog.testing.capture_logs() as logs:
            # Three LS requests (LS is always admitted) with one prompt: always at the same op.
            handles = [engine.submit(prompt, max_tokens=3, priority="ls", ignore_eos=True) for _ in range(3)]
            results = [await h.result() for h in handles]
            stats = engine.stats()
    assert all(r.token_ids == greedy(tiny, prompt, 3) for r in results)
    bad = [e for e in logs if e["event"] == "policy_bad_batch"]
    assert bad and stats["kernel"]["policy_errors"] == len(bad)
    assert max(op["count"] for op in stats["kernel"]["op_times"].values()) > 0


@pytest.mark.timeout(120, method="signal")  # a kernel that spins starves the loop: only a signal stops it
async def test_when_the_fallback_fails_too_the_kernel_still_decides(tiny, monkeypatch):
    """A policy and a fallback that both give invalid batches do not stall the kernel: a last
    resort (the op furthest behind, every request at it) decides, and every request finishes."""
    prompt = [40, 41, 42, 43]
    async with qllm.Engine(model=tiny, policy=BadBatch("too-many"), max_batch=2) as engine:
        monkeypatch.setattr(
            engine._dispatcher.scheduler.policy.fallback, "select", lambda kernel: list(kernel.ready)
        )
        handles = [engine.submit(prompt, max_tokens=3, priority="ls", ignore_eos=True) for _ in range(3)]
        async with asyncio.timeout(60):
            results = [await h.result() for h in handles]
    assert all(r.token_ids == greedy(tiny, prompt, 3) for r in results)


# ---------------------------------------------------------------- loading
def test_builtin_policies_are_registered_entry_points():
    registered = available_policies()
    assert {"fcfs", "qllm", "priority-aging", "cohort"} <= set(registered)
    builtin = (
        ("fcfs", FCFSPolicy),
        ("qllm", QLLMPolicy),
        ("priority-aging", PriorityAgingPolicy),
        ("cohort", CohortPolicy),
    )
    for name, cls in builtin:
        policy = load_policy(name)
        assert type(policy) is cls and policy.name == name
    assert load_policy(None).name == DEFAULT_POLICY
    assert isinstance(load_policy("qllm.policies.qllm:QLLMPolicy"), QLLMPolicy)


def test_unknown_policy_lists_the_available_ones():
    with pytest.raises(PolicyError, match="unknown policy 'nope'") as info:
        load_policy("nope")
    for name in ("fcfs", "qllm", "priority-aging", "cohort", "module:Class"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_for_qllm:Policy", "cannot import policy 'no_such_module_for_qllm:Policy'"),
        ("qllm.policies.fcfs:NoSuchClass", "cannot import policy 'qllm.policies.fcfs:NoSuchClass'"),
        ("collections:OrderedDict", "not a qllm.policies.Policy subclass"),
    ],
)
def test_bad_module_class_spec(spec, message):
    with pytest.raises(PolicyError, match=message):
        load_policy(spec)


def test_wrong_api_version_and_failing_init_are_rejected():
    class FromTheFuture(Policy):
        api_version = API_VERSION + 1

    class Broken(Policy):
        def __init__(self):
            raise RuntimeError("no config")

    for spec in (FromTheFuture, FromTheFuture()):
        with pytest.raises(PolicyError, match=f"targets policy API version {API_VERSION + 1}"):
            load_policy(spec)
    with pytest.raises(PolicyError, match="failed to initialise: no config"):
        load_policy(Broken)


def test_policy_options_reach_the_constructor():
    assert load_policy("cohort:stretch=2").stretch == 2
    assert load_policy("cohort").stretch == 1.0
    aging = load_policy("qllm.policies.priority_aging:PriorityAgingPolicy:be_share=0.25:fill_rows=8")
    assert (aging.name, aging.be_share, aging.fill_rows) == ("priority-aging", 0.25, 8)
    # Options are checked against the constructor: a typo is named with what it takes.
    with pytest.raises(
        PolicyError, match=r"policy 'cohort:strech=2' has no option 'strech'; it takes: stretch"
    ):
        load_policy("cohort:strech=2")
    with pytest.raises(PolicyError, match="failed to initialise: stretch must be >= 1"):
        load_policy("cohort:stretch=0.5")
    with pytest.raises(PolicyError, match="bad policy spec"):
        load_policy("cohort:stretch=2:qllm.policies.cohort")
    with pytest.raises(PolicyError, match="bad policy option"):
        load_policy("cohort:stretch=1:stretch=2")


def test_engine_rejects_a_bad_policy_before_loading_the_model():
    with pytest.raises(PolicyError, match="unknown policy"):
        qllm.Engine(model="no-such-model-either", policy="nope")
