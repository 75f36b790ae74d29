"""Where the compute time of a ``qllm bench`` run goes: every batched op of every qllm system, traced.

Runs ``qllm bench`` with the arguments after ``--``, with a tracer that every kernel of the process
calls (:class:`qllm.kernel.stats.Tracer`: each step's ops, each finished request's arrival and
first token), writes the trace as JSON and prints, for each engine of a qllm system that served more than one
request, in the order they ran (the bench's warm-up and capacity probe first, then one cell per
system and rate; the lone-request probes, decode step and isolated LS TTFT, are left out):

- the time spent in ops, their count, and the span from the first op to the last;
- that time split by who was in the op (LS requests only, best-effort only, both) and by rows;
- with ``--slowest N``: the N slowest LS first tokens, each with every op between its arrival and
  its first token (``*``: a request still waiting for its first token).

    .venv/bin/python scripts/bench_trace.py --trace /tmp/trace.json -- \\
        --systems fcfs,cohort --ls-share 0.3 --max-batch 16 --seed 11 --rates 6

``--summarize`` prints that again from a trace written earlier, without running anything.
The bench's own JSON (``--json``) and report are written as usual. Tracing costs a few
microseconds a step, the same for every system.
"""

from __future__ import annotations

import argparse
import json
import time
import weakref
from collections import defaultdict

from qllm.bench import main as bench_main
from qllm.kernel.stats import TRACERS, Tracer

EVENTS: list[dict] = []


class Trace(Tracer):
    """Appends every kernel's ops and finished requests to :data:`EVENTS`."""

    def __init__(self) -> None:
        self.engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.offset = time.monotonic() - time.perf_counter()  # op starts are perf_counter() times

    def engine(self, kernel) -> int:
        """A number per kernel (per engine), in the order they first ran an op or finished a request."""
        return self.engines.setdefault(kernel, len(self.engines))

    def stepped(self, kernel, members, result) -> None:
        engine, policy = self.engine(kernel), kernel.scheduler.policy.name
        who = [(r.id, r.is_ls, r.first_token is None) for r in members]
        for t in result.timings:
            EVENTS.append(
                {"e": "op", "engine": engine, "policy": policy, "t": t.start + self.offset, "s": t.seconds,
                 "kind": t.kind.name, "layer": t.layer, "expert": t.expert, "rows": t.rows, "members": who}
            )  # fmt: skip

    def finished(self, kernel, result) -> None:
        engine = self.engine(kernel)
        EVENTS.append(
            {"e": "arrive", "engine": engine, "t": result.arrival, "id": result.id, "ls": result.priority == "ls",
             "prompt": result.prompt_tokens}
        )  # fmt: skip
        if result.first_token is not None:
            EVENTS.append({"e": "first", "engine": engine, "t": result.first_token, "id": result.id})


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
        TRACERS.append(Trace())
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
