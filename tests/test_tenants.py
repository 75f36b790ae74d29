"""Tenants: the ledger (qllm/kernel/tenants.py), the fair-share helpers policies use
(qllm/policies/fair.py), the settings, and the engine serving backlogged tenants by weight."""

from __future__ import annotations

import asyncio

import pytest

from qllm import Engine
from qllm.bench.tenants import share_report
from qllm.commands import serve
from qllm.commands.serve import overrides
from qllm.errors import InvalidRequest, TenantOverQuota
from qllm.kernel.config import FairnessConfig, TenantConfig, engine_config, parse_tenant
from qllm.kernel.request import PriorityClass, Request
from qllm.kernel.tenants import TenantLedger, jain_index
from qllm.kernel.view import KernelView, MemoryView, RequestView, TenantView
from qllm.policies.fair import fair_order, within_share
from qllm.spec import RequestSpec, build_spec


def request(
    rid: str, tenant: str = "", *, ls: bool = False, client: str = "c", arrival: float = 0.0
) -> Request:
    spec = RequestSpec(priority=PriorityClass.LS if ls else PriorityClass.BE, tenant=tenant, client=client)
    return Request(id=rid, prompt_ids=[1], spec=spec, arrival=arrival)


def kernel(ready: list[RequestView], ledger: TenantLedger) -> KernelView:
    return KernelView(0.0, ready, [], ready, 32, MemoryView(None, 0, 0), tenants=TenantView(ledger))


# ---------------------------------------------------------------- the ledger


def test_op_time_is_split_by_rows_and_counted_against_the_weight():
    ledger = TenantLedger(tenants={"heavy": TenantConfig(weight=2.0)})
    a, b = ledger.enter(request("a1", "light")), ledger.enter(request("b1", "heavy"))

    ledger.charge([(a, 1), (b, 3)], 0.4)

    assert a.service_s == pytest.approx(0.1) and b.service_s == pytest.approx(0.3)
    assert a.counter == pytest.approx(0.1) and b.counter == pytest.approx(0.15)  # 0.3 / weight 2
    assert a.requests == b.requests == 1


def test_a_tenant_back_from_idle_is_lifted_to_the_lowest_backlogged_counter():
    ledger = TenantLedger()
    a, b = ledger.enter(request("a1", "a")), ledger.enter(request("b1", "b"))
    ledger.charge([(a, 1)], 1.0)
    ledger.leave(b)  # b goes idle with a counter of 0 while a is served
    ledger.charge([(a, 1)], 2.0)

    back = ledger.enter(request("b2", "b"))

    assert back is b and b.counter == pytest.approx(3.0)  # no credit banked while idle
    assert ledger.enter(request("c1", "new")).counter == pytest.approx(3.0)


def test_the_table_is_bounded_idle_tenants_are_forgotten_and_busy_ones_overflow():
    ledger = TenantLedger(FairnessConfig(max_tenants=2), {"named": TenantConfig(weight=3)})
    ledger.enter(request("x1", "x"))
    y = ledger.enter(request("y1", "y"))
    ledger.leave(y)

    z = ledger.enter(request("z1", "z"))  # y is idle: forgotten to make room
    other = ledger.enter(request("w1", "w"))  # x and z are busy

    assert set(ledger.accounts) == {"named", "x", "z", "other"}
    assert z.name == "z" and other.name == "other"
    assert ledger.enter(request("v1", "v")) is other


def test_a_request_naming_no_tenant_is_the_default_tenants():
    ledger = TenantLedger()
    assert ledger.enter(request("r1")).name == "default"


def test_reject_refuses_a_request_over_the_live_quota_and_wait_does_not():
    rejecting = TenantLedger(FairnessConfig(quota_action="reject"), {"a": TenantConfig(max_live=1)})
    rejecting.enter(request("a1", "a"))
    with pytest.raises(TenantOverQuota, match="quota of 1 live requests"):
        rejecting.enter(request("a2", "a"))
    rejecting.enter(request("b1", "b"))  # other tenants are not limited
    assert rejecting.accounts["a"].rejected == 1 and rejecting.accounts["a"].live == 1

    waiting = TenantLedger(FairnessConfig(quota_action="wait"), {"a": TenantConfig(max_live=1)})
    waiting.enter(request("a1", "a"))
    assert waiting.enter(request("a2", "a")).live == 2


def test_reject_refuses_over_the_kv_quota():
    ledger = TenantLedger(FairnessConfig(quota_action="reject", default=TenantConfig(max_kv_bytes=1000)))
    ledger.enter(request("a1", "a"), kv_bytes=999)
    with pytest.raises(TenantOverQuota, match="1000 KV bytes"):
        ledger.enter(request("a2", "a"), kv_bytes=1000)


def test_jain_index():
    assert jain_index([1, 1, 1]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([1]) is None and jain_index([0, 0]) is None


# ---------------------------------------------------------------- the policies' helpers


def test_best_effort_requests_of_a_tenant_over_its_share_wait_and_ls_ones_do_not():
    ledger = TenantLedger(FairnessConfig(quantum=0.05))
    reqs = [request("a1", "a"), request("a2", "a"), request("b1", "b"), request("als", "a", ls=True)]
    for r in reqs:
        ledger.enter(r)
    views = [RequestView(r) for r in reqs]
    ledger.charge([(ledger.accounts["a"], 1)], 0.04)
    assert within_share(views, kernel(views, ledger)) == views  # within the quantum

    ledger.charge([(ledger.accounts["a"], 1)], 0.02)

    assert [v.id for v in within_share(views, kernel(views, ledger))] == ["b1", "als"]
    alone = views[:2]  # a tenant alone is never held back
    assert within_share(alone, kernel(alone, ledger)) == alone


def test_tenants_take_turns_the_least_served_first_and_clients_within_a_tenant():
    ledger = TenantLedger()
    reqs = [
        request("a1", "a", client="c1", arrival=1),
        request("a2", "a", client="c1", arrival=2),
        request("a3", "a", client="c2", arrival=3),
        request("b1", "b", client="c1", arrival=4),
        request("b2", "b", client="c1", arrival=5),
    ]
    for r in reqs:
        ledger.enter(r)
    ledger.charge([(ledger.accounts["a"], 1)], 1.0)  # a was served more: b goes first in each turn

    order = [v.id for v in fair_order([RequestView(r) for r in reqs], key=lambda v: v.sort_key)]

    assert order == ["b1", "a1", "b2", "a3", "a2"]


# ---------------------------------------------------------------- settings and the spec


def test_tenant_settings_are_checked():
    config = engine_config(None, {"tenants": {"a": {"weight": 2, "max_live": 4}}})
    assert config.tenants["a"] == TenantConfig(weight=2.0, max_live=4)
    for bad in ({"a": {"weight": 0}}, {"a": {"max_live": 0}}, {"": {}}, {"a b": {}}, {"a": {"share": 1}}):
        with pytest.raises(ValueError, match="invalid engine setting"):
            engine_config(None, {"tenants": bad})
    with pytest.raises(ValueError, match="quota_action"):
        engine_config(None, {"fairness": {"quota_action": "drop"}})


def test_the_tenant_option():
    assert parse_tenant("team-a=2:live=8:kv=1000") == (
        "team-a",
        {"weight": 2.0, "max_live": 8, "max_kv_bytes": 1000},
    )
    for bad in ("team-a", "=2", "a=x", "a=1:live", "a=1:cpu=2", "a=1:live=x"):
        with pytest.raises(ValueError, match="--tenant"):
            parse_tenant(bad)


def test_serve_options_name_tenants():
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--tenant", "a=2", "--tenant", "b=1:live=3"])

    assert overrides(args)["engine"]["tenants"] == {"a": {"weight": 2.0}, "b": {"weight": 1.0, "max_live": 3}}


def test_a_tenant_name_is_bounded_printable_ascii():
    assert build_spec({"tenant": "team-a@example.com"}).tenant == "team-a@example.com"
    for bad in ("a b", "x" * 65, "é", "a\n"):
        with pytest.raises(InvalidRequest, match="tenant"):
            build_spec({"tenant": bad})


# ---------------------------------------------------------------- the engine


async def test_quota_wait_admits_a_tenants_next_request_only_when_one_finishes(tiny):
    async with Engine(model=tiny, tenants={"a": {"max_live": 1}}) as engine:
        first = engine.submit("one", tenant="a", max_tokens=6, ignore_eos=True)
        second = engine.submit("two", tenant="a", max_tokens=6, ignore_eos=True)
        other = engine.submit("three", tenant="b", max_tokens=6, ignore_eos=True)
        one, two, three = await asyncio.gather(first.result(), second.result(), other.result())
    assert two.first_scheduled >= one.finished  # waited for a's first to finish
    assert three.first_scheduled < one.finished  # b is not limited


async def test_quota_reject_raises_a_typed_error(tiny):
    async with Engine(
        model=tiny, tenants={"a": {"max_live": 1}}, fairness={"quota_action": "reject"}
    ) as engine:
        first = engine.submit("one", tenant="a", max_tokens=4, ignore_eos=True)
        with pytest.raises(TenantOverQuota):
            engine.submit("two", tenant="a", max_tokens=4)
        await first.result()
        await engine.generate("two", tenant="a", max_tokens=4, ignore_eos=True)  # room again
        stats = engine.stats()["tenants"]["a"]
    assert (stats["requests"], stats["rejected"], stats["tokens"]) == (2, 1, 8)


async def backlogged_shares(engine, weights: dict[str, float], seconds: float, backlog: int = 3) -> dict:
    """Keep ``backlog`` BE requests of each tenant in flight; the op time each received over
    ``seconds`` after a warm-up (the bench's report)."""
    from qllm.bench.tenants import shares

    names = list(weights)
    return await shares(
        engine, names, list(weights.values()), backlog, lambda: [5, 6, 7, 8], 2000, 0.5, seconds
    )


@pytest.mark.parametrize("policy", ["cohort", "priority-aging"])
async def test_backlogged_tenants_receive_op_time_by_weight(tiny, policy):
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    async with Engine(
        model=tiny, policy=policy, tenants={n: {"weight": w} for n, w in weights.items()}
    ) as engine:
        report = await backlogged_shares(engine, weights, seconds=4.0)
    shares = {n: t["share"] for n, t in report["tenants"].items()}
    assert report["worst_error"] < 0.10, shares  # within 10% of 1:1:2
    assert report["jain_index"] >= 0.95, report


async def test_a_tenant_with_more_requests_gets_no_more_op_time(tiny):
    # In flight: a batch of all of them would give a 4/5 of each op. (b keeps two, so that it stays
    # backlogged between one request and the next: a tenant that goes idle forfeits its credit.)
    running = {"a": 8, "b": 2}
    stop = asyncio.Event()
    async with Engine(model=tiny) as engine:

        async def keep(name: str, tokens: int) -> None:
            while not stop.is_set():
                await engine.generate([5, 6, 7], tenant=name, max_tokens=tokens, ignore_eos=True)

        def service() -> dict[str, float]:
            return {n: engine.stats()["tenants"][n]["service_s"] for n in running}

        async with asyncio.TaskGroup() as tg:
            for name, n in running.items():
                for i in range(n):
                    tg.create_task(keep(name, 16 + 7 * i))  # out of step: never all done at once
            await asyncio.sleep(0.5)
            before = service()
            await asyncio.sleep(3.0)
            after = service()
            stop.set()
    report = share_report(["a", "b"], [1.0, 1.0], {n: after[n] - before[n] for n in running}, 3.0)
    assert report["worst_error"] < 0.15, report  # b's requests are not crowded out


async def test_outputs_under_fairness_preemption_equal_solo_runs(tiny):
    prompts = {f"{t}{i}": [3 + i, 40 + i, 7, 9 + len(t)] for t in ("a", "b") for i in range(4)}
    async with Engine(model=tiny, tenants={"b": {"weight": 4}}, fairness={"quantum": 0.005}) as engine:
        solo = {
            k: (await engine.generate(p, max_tokens=32, ignore_eos=True)).token_ids
            for k, p in prompts.items()
        }
        handles = {
            k: engine.submit(p, tenant=k[0], max_tokens=32, ignore_eos=True) for k, p in prompts.items()
        }
        results = {k: await h.result() for k, h in handles.items()}
    assert {k: r.token_ids for k, r in results.items()} == solo
    # Equal work, weights 1:4: a's requests waited while b was served ahead (one batch of all
    # eight would finish them together), then resumed where they stood.
    start = min(r.arrival for r in results.values())
    last = {t: max(r.finished for k, r in results.items() if k[0] == t) - start for t in "ab"}
    assert last["b"] < 0.85 * last["a"], last


def test_the_first_request_of_a_tenant_back_from_idle_interrupts_the_op_in_flight():
    from qllm.policies.cohort import CohortPolicy

    ledger = TenantLedger()
    first, second = request("a1", "a"), request("a2", "a")
    ledger.enter(first)
    policy = CohortPolicy()
    assert policy.interrupts(RequestView(first))  # its tenant was idle: it may be owed the machine
    ledger.enter(second)
    assert not policy.interrupts(RequestView(second))  # a best-effort newcomer waits for the pass


def test_the_bench_reports_shares_against_weights_and_checks_its_options():
    from qllm.bench.tenants import parse_weights

    report = share_report(["a", "b", "c"], [1, 1, 2], {"a": 1.0, "b": 1.1, "c": 1.9}, 4.0)
    assert report["tenants"]["c"]["fair_share"] == 0.5
    assert report["tenants"]["c"]["share"] == pytest.approx(0.475)
    assert report["worst_error"] == pytest.approx(0.1)  # b: 0.275 against 0.25
    assert 0.99 < report["jain_index"] < 1.0
    assert parse_weights("1,1,2") == [1.0, 1.0, 2.0]
    for bad in ("1", "1,x", "1,0", "1,-2"):
        with pytest.raises(ValueError, match="--weights"):
            parse_weights(bad)


async def test_a_finished_requests_result_and_log_line_name_its_tenant(tiny):
    from structlog.testing import capture_logs

    async with Engine(model=tiny) as engine:
        with capture_logs() as logs:
            result = await engine.generate("Hello", tenant="team-a", max_tokens=2)
            unnamed = await engine.generate("Hello", max_tokens=2)
    assert (result.tenant, unnamed.tenant) == ("team-a", "default")
    finished = [e for e in logs if e["event"] == "request_finished"]
    assert [e["tenant"] for e in finished] == ["team-a", "default"]
    assert all("Hello" not in str(e) for e in logs)


@pytest.mark.parametrize(
    ("body", "header", "default", "tenant"),
    [
        ({"user": "u", "tenant": "t"}, "h", "1000", "h"),  # the header first
        ({"user": "u", "tenant": "t"}, None, "1000", "t"),  # then the body's tenant
        ({"user": "u"}, None, "1000", "u"),  # then OpenAI's user
        ({}, None, "1000", "1000"),  # then the peer's uid
        ({}, None, "", ""),  # a TCP peer: the engine's default tenant
    ],
)
def test_the_tenant_of_an_http_request(body, header, default, tenant):
    import json

    from qllm.server import openai_api as api

    req, fields = api.decode(json.dumps({"prompt": "a", **body}).encode(), api.CompletionRequest)
    spec = api.to_spec(req, fields, None, 16, "h1", tenant_header=header, default_tenant=default)
    assert spec.tenant == tenant


def test_a_bad_tenant_over_http_is_a_400_naming_it():
    import json

    from qllm.server import openai_api as api

    req, fields = api.decode(json.dumps({"prompt": "a", "user": "has space"}).encode(), api.CompletionRequest)
    with pytest.raises(api.ApiError, match="tenant") as error:
        api.to_spec(req, fields, None, 16, "h1")
    assert error.value.status == 400


def test_the_config_file_names_tenants_and_the_command_line_adds_to_them(tmp_path):
    from qllm.server.config import ConfigError, load_config

    path = tmp_path / "qllm.toml"
    path.write_text(
        "[engine.tenants.chat]\nweight = 3\n[engine.tenants.jobs]\nmax_live = 16\n"
        '[engine.fairness]\ndefault = { weight = 0.5 }\nquota_action = "reject"\n'
    )
    config = load_config(path, {"engine": {"tenants": {"jobs": {"weight": 2.0}}}}, serve.OPTIONS)
    assert config.engine.tenants == {
        "chat": TenantConfig(weight=3),
        "jobs": TenantConfig(weight=2, max_live=16),
    }
    assert config.engine.fairness.default.weight == 0.5 and config.engine.fairness.quota_action == "reject"
    path.write_text("[engine.tenants.chat]\nweight = -1\n")
    with pytest.raises(ConfigError, match="weight"):
        load_config(path)


def test_a_plugin_that_keeps_the_base_select_keeps_the_shares():
    from qllm.policies.api import Policy

    class ByArrival(Policy):  # a plugin that only orders
        def order(self, ready, kernel):
            return sorted(ready, key=lambda r: (r.arrival, r.seq))

    from qllm.kernel.request import NEXT_PASS

    ledger = TenantLedger()
    reqs = [request("a1", "a", arrival=1), request("a2", "a", arrival=2), request("b1", "b", arrival=3)]
    for r in reqs:
        ledger.enter(r)
        r.position = NEXT_PASS  # ready, at the first op of a pass
    views = [RequestView(r) for r in reqs]
    assert [v.id for v in ByArrival().select(kernel(views, ledger))] == ["a1", "a2", "b1"]

    ledger.charge([(ledger.accounts["a"], 1)], 0.5)  # a is ahead of b by more than the quantum

    assert [v.id for v in ByArrival().select(kernel(views, ledger))] == ["b1"]
