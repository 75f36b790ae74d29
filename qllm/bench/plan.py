"""What the workload benchmark runs: the systems side by side, the requests at each rate, and the
rates themselves (given, or ``auto`` from the capacity of fcfs on a closed batch).

Top-level imports stay light (stdlib only): the CLI imports the benchmark modules to build its
parser, and torch comes in with the systems.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qllm.bench.systems import System
    from qllm.bench.trace import Item, Lengths
    from qllm.models import MoEModel

PEER = "transformers-cb"
"""The external peer's system name: transformers' own continuous batching."""
VLLM = "vllm"
"""The vLLM peer's system name: ``vllm serve`` with its priority scheduler (qllm/bench/vllm.py).
Not in the default systems: it runs from its own interpreter (``--vllm-python``)."""
PEERS = (PEER, VLLM)
DEFAULT_REQUESTS = 32
"""Requests per rate unless ``--requests`` or ``--duration`` says otherwise."""

Workload = Callable[[float | None], list["Item"]]
"""rate (requests/s; None: a trace at its own pace) -> the requests to replay at it."""


async def systems(args: argparse.Namespace) -> tuple[list[System], dict[str, Any], MoEModel | None]:
    """The systems to measure, a description of the model, and the model when loaded here."""
    from qllm.bench.systems import EngineSystem, HttpSystem, ServeSystem

    if args.socket or args.http:
        served: list[ServeSystem | HttpSystem] = [await ServeSystem.connect(p) for p in args.socket or ()]
        served += [await HttpSystem.connect(target) for target in args.http or ()]
        return list(served), {"name": served[0].model, "context": None}, None
    from qllm.models import load_model
    from qllm.policies import available_policies

    names = system_names(args.systems, available_policies())
    model = load_model(args.model)
    context = getattr(model.config, "max_position_embeddings", None) or 4096
    found: list[System] = []
    for name in names:
        if name == PEER:
            from qllm.bench.peer import TransformersCB

            found.append(TransformersCB(model, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                                        max_len=args.max_prompt + args.max_output))  # fmt: skip
        elif name == VLLM:
            from qllm.bench import vllm

            try:
                found.append(await vllm.connect(
                    model, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                    max_len=args.max_prompt + args.max_output, python=args.vllm_python, eager=args.vllm_eager,
                ))  # fmt: skip
            except BaseException:
                for system in found:
                    await system.close()
                raise
        else:
            found.append(
                EngineSystem(
                    model,
                    name,
                    max_batch=args.max_batch,
                    prefill_chunk=args.prefill_chunk,
                    moe_granularity=args.moe_granularity,
                )
            )
    found += split_systems(args, found)
    return found, {"name": str(args.model), "family": model.family, "context": context}, model


def split_systems(args: argparse.Namespace, found: list[System]) -> list[System]:
    """With ``--expert-parallel N`` (N > 1): each qllm policy again with its experts split across
    N ranks, named ``POLICY@epN``. The ranks share the machine's threads: each runs
    ``threads // N`` (at least 1), where the one-process system runs them all."""
    ranks = args.expert_parallel
    if ranks <= 1:
        return []
    import torch

    from qllm.bench.systems import EngineSystem

    threads = max(1, torch.get_num_threads() // ranks)
    split = []
    for system in found:
        if isinstance(system, EngineSystem):
            variant = EngineSystem(
                system.model,
                system.policy,
                max_batch=system.max_batch,
                prefill_chunk=system.prefill_chunk,
                moe_granularity=system.moe_granularity,
                ranks=ranks,
                threads=threads,
                window=args.expert_window,
            )
            variant.model_name = str(args.model)
            split.append(variant)
    return split


def system_names(spec: str | None, registered: dict[str, Any]) -> list[str]:
    """fcfs first, the other registered policies, then transformers' peer; or the names asked for
    (``vllm`` only when asked for)."""
    if spec is None:
        return ["fcfs", *sorted(n for n in registered if n != "fcfs"), PEER]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS and n not in registered and ":" not in n]
    if unknown or not names:
        raise ValueError(f"unknown systems {unknown}; choose from {', '.join([*sorted(registered), *PEERS])}")
    return names


def workload(args: argparse.Namespace, lengths: Lengths, model: MoEModel | None) -> Workload:
    """rate -> items: the seeded Poisson workload or the trace, rescaled to the rate (with
    ``--only-class``, that class's requests of it)."""
    full = _full_workload(args, lengths, model)
    if not args.only_class:
        return full
    return lambda rate: [i for i in full(rate) if i.cls == args.only_class]


def _full_workload(args: argparse.Namespace, lengths: Lengths, model: MoEModel | None) -> Workload:
    from qllm.bench import trace

    requests = requests_per_rate(args)
    if not args.trace:
        return lambda rate: trace.poisson(
            rate,
            requests=requests,
            duration=args.duration,
            ls_share=args.ls_share,
            lengths=lengths,
            seed=args.seed,
        )
    items = _tokenized(trace.read_trace(args.trace), model)

    def at(rate: float | None) -> list[Item]:
        scaled = trace.at_rate(items, rate) if rate is not None else items
        return trace.limit(scaled, requests=args.requests, duration=args.duration)

    return at


def requests_per_rate(args: argparse.Namespace) -> int | None:
    """Requests per rate: --requests, else 32 unless --duration bounds the workload instead."""
    if args.requests is not None or args.duration is not None:
        return args.requests
    return None if args.trace else DEFAULT_REQUESTS


def _tokenized(items: list[Item], model: MoEModel | None) -> list[Item]:
    """Text prompts as token ids when the model is here, so every system gets the same ids."""
    if model is None:
        return items
    from qllm.text import encode

    return [replace(i, prompt=tuple(ids), prompt_len=len(ids)) if isinstance(i.prompt, str) and (ids := encode(model, i.prompt)) else i
            for i in items]  # fmt: skip


async def rates(
    args: argparse.Namespace, systems: list[System], workload: Workload
) -> tuple[list[float], float | None]:
    """The rates asked for, or for 'auto' the capacity of fcfs on a closed batch times the factors."""
    from qllm.bench import probes

    if args.rates != "auto":
        chosen = sorted({float(r) for r in args.rates.split(",") if r.strip()})
        if not chosen or min(chosen) <= 0:
            raise ValueError("--rates needs positive numbers (requests/s) or 'auto'")
        return chosen, None
    if args.trace:  # replayed at its own pace
        from qllm.bench.trace import trace_rate

        return [round(trace_rate(workload(None)), 4)], None
    base = next((s for s in systems if s.policy == "fcfs"), systems[0])
    capacity = await probes.capacity(base, workload(1.0)[: args.max_batch], args.timeout)
    factors = [float(f) for f in args.auto_factors.split(",") if f.strip()]
    return sorted({round(capacity * f, 4) for f in factors}), capacity
