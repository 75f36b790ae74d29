"""Where the compute time of a ``qllm bench`` run goes: every batched op of every qllm system, traced.

Runs ``qllm bench`` with the arguments after ``--``, with the kernel instrumented from outside (the
dispatcher's hooks and ``MoEModel.run`` are wrapped in this process; the tree is not changed),
writes the trace as JSON and prints, for each engine of a qllm system that served more than one
request, in the order they ran (the bench's warm-up and capacity probe first, then one cell per
system and rate; the lone-request probes, decode step and isolated LS TTFT, are left out):

- the time spent in ops, their count, and the span from the first op to the last;
- that time split by who was in the op (LS requests only, best-effort only, both) and by rows;
- with ``--slowest N``: the N slowest LS first tokens, each with every op between its arrival and
  its first token (``*``: a request still waiting for its first token).

    .venv/bin/python scripts/bench_trace.py --trace /tmp/trace.json -- \\
        --systems fcfs,cohort --ls-share 0.3 --max-batch 16 --seed 11 --rates 6

``--summarize`` prints that again from a trace written earlier, without running anything.
The bench's own JSON (``--json``) and report are written as usual. Wrapping costs a few
microseconds an op, the same for every system.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import defaultdict

import qllm.kernel.dispatcher as dispatcher_module
from qllm.bench import main as bench_main
from qllm.models.base import MoEModel

EVENTS: list[dict] = []
_CURRENT: dict = {}
_ENGINES = itertools.count()


def _engine(dispatcher) -> int:
    """A number per dispatcher (per engine), in the order they started (ids of dead objects recur)."""
    if not hasattr(dispatcher, "_bench_trace_engine"):
        dispatcher._bench_trace_engine = next(_ENGINES)
    return dispatcher._bench_trace_engine


def instrument() -> None:
    """Wrap the dispatcher's arrival, first-token and execute hooks and the executor's op call."""
    Dispatcher = dispatcher_module.Dispatcher
    arrive, emit, execute, run = Dispatcher._arrive, Dispatcher._emit, Dispatcher._execute, MoEModel.run

    def _arrive(self, request):
        EVENTS.append(
            {"e": "arrive", "engine": _engine(self), "t": time.monotonic(), "id": request.id, "ls": request.is_ls,
             "prompt": len(request.prompt_ids)}
        )  # fmt: skip
        return arrive(self, request)

    def _emit(self, request, *token):  # the token's id and the output's text so far
        if request.first_token is None:
            EVENTS.append({"e": "first", "engine": _engine(self), "t": time.monotonic(), "id": request.id})
        return emit(self, request, *token)

    async def _execute(self, group):
        _CURRENT.update(
            engine=_engine(self),
            policy=self.policy.name,
            members=[(s.owner.id, s.owner.is_ls, s.owner.first_token is None) for s in group.segments],
        )
        try:
            await execute(self, group)
        finally:
            _CURRENT.clear()

    def _run(self, ops, stop=None):
        start = time.monotonic()
        try:
            return run(self, ops, stop)
        finally:
            if _CURRENT:
                op = ops[0]
                EVENTS.append(
                    {"e": "op", "engine": _CURRENT["engine"], "policy": _CURRENT["policy"], "t": start,
                     "s": time.monotonic() - start, "kind": op.kind.name, "layer": op.layer,
                     "expert": op.expert, "rows": sum(o.rows for o in ops), "members": _CURRENT["members"]}
                )  # fmt: skip

    Dispatcher._arrive, Dispatcher._emit, Dispatcher._execute = _arrive, _emit, _execute
    MoEModel.run = _run


def cells(events: list[dict]) -> list[tuple[str, list[dict]]]:
    """Events per engine that served more than one request (a lone-request probe is no cell), in
    the order the engines ran."""
    by_engine: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        by_engine[e["engine"]].append(e)
    out = []
    for evs in by_engine.values():
        ops = [e for e in evs if e["e"] == "op"]
        if ops and sum(e["e"] == "arrive" for e in evs) > 1:
            out.append((ops[0]["policy"], evs))
    return out


def rows_bucket(rows: int) -> str:
    return "1" if rows == 1 else "2-4" if rows <= 4 else "5-16" if rows <= 16 else ">16"


def summary(policy: str, evs: list[dict]) -> dict:
    ops = [e for e in evs if e["e"] == "op"]
    split: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for e in ops:
        ls = sum(1 for _, is_ls, _ in e["members"] if is_ls)
        who = "ls-only" if ls == len(e["members"]) else "be-only" if ls == 0 else "both"
        for key in (who, f"{e['kind'].lower()} {who} rows {rows_bucket(e['rows'])}"):
            split[key][0] += 1
            split[key][1] += e["s"]
            split[key][2] += e["rows"]
    return {
        "policy": policy,
        "requests": sum(1 for e in evs if e["e"] == "arrive"),
        "ops": len(ops),
        "op_s": round(sum(e["s"] for e in ops), 3),
        "span_s": round(ops[-1]["t"] + ops[-1]["s"] - ops[0]["t"], 3),
        "by_members": {
            k: {"ops": n, "s": round(s, 3), "mean_ms": round(s / n * 1e3, 2), "rows_mean": round(r / n, 1)}
            for k, (n, s, r) in sorted(split.items(), key=lambda kv: -kv[1][1])
        },
    }


def slowest(evs: list[dict], n: int) -> list[dict]:
    arrive = {e["id"]: e for e in evs if e["e"] == "arrive"}
    first = {e["id"]: e["t"] for e in evs if e["e"] == "first"}
    ls = sorted((first[i] - a["t"], i) for i, a in arrive.items() if a["ls"] and i in first)[::-1][:n]
    out = []
    for ttft, rid in ls:
        t0, t1 = arrive[rid]["t"], first[rid]
        timeline = [
            f"{e['t'] - t0:7.3f} {e['s'] * 1e3:6.1f} ms {e['kind']} L{e['layer']} e{e['expert']} rows {e['rows']}: "
            + " ".join(("L" if is_ls else "b") + m.rsplit("-", 1)[-1] + ("*" if waiting else "") for m, is_ls, waiting in e["members"])
            for e in evs
            if e["e"] == "op" and t0 <= e["t"] <= t1
        ]  # fmt: skip
        out.append({"id": rid, "ttft_s": round(ttft, 3), "prompt": arrive[rid]["prompt"], "ops": timeline})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", required=True, help="where to write the trace (JSON)")
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="read the trace written earlier at --trace instead of running",
    )
    parser.add_argument("--slowest", type=int, default=0, help="show the N slowest LS first tokens per cell")
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- then qllm bench's arguments")
    args = parser.parse_args()
    bench_args = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if args.summarize:
        with open(args.trace) as f:
            EVENTS[:] = json.load(f)
        rc = 0
    else:
        instrument()
        rc = bench_main(bench_args)
        with open(args.trace, "w") as f:
            json.dump(EVENTS, f)
    result = []
    for i, (policy, evs) in enumerate(cells(EVENTS)):
        entry = {"cell": i} | summary(policy, evs)
        if args.slowest:
            entry["slowest_ls"] = slowest(evs, args.slowest)
        result.append(entry)
    print(json.dumps(result, indent=1))
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
