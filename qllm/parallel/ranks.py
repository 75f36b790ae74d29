"""What every rank shares at start-up: the spec it loads from, joining the process group, and
the reports the ranks compare before serving."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from qllm.errors import ExpertParallelError
from qllm.parallel.placement import Placement

if TYPE_CHECKING:
    from qllm.kernel.config import EngineConfig
    from qllm.models.base import MoEModel

START_TIMEOUT = 600.0
"""Seconds the ranks have to start, load the model and meet (a large model loads slowly); the
expert timeout bounds every call after that."""


@dataclass(frozen=True, slots=True)
class RankSpec:
    """What every rank needs to load its part of the model (picklable: a spawned worker gets it)."""

    model: str
    dtype: str
    device: str
    batch_invariant: bool
    threads: int | None
    placement: Placement
    timeout: float
    init_method: str  # tcp://host:port for spawned workers, env:// under torchrun


def backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(spec: RankSpec, rank: int) -> str:
    """The device ``rank`` computes on: rank 0's device on CPU; on GPU one device per rank of a
    machine (``LOCAL_RANK`` under torchrun, else the rank), as NCCL requires."""
    if torch.device(spec.device).type != "cuda":
        return spec.device
    if rank == 0 and "LOCAL_RANK" not in os.environ:
        return spec.device
    local = int(os.environ.get("LOCAL_RANK", rank))
    return f"cuda:{local % max(1, torch.cuda.device_count())}"


def init_ranks(spec: RankSpec, rank: int, world: int) -> Any:
    """Join the ranks: the data group (NCCL on GPU, gloo on CPU) is the default group; returns the
    gloo control group."""
    if torch.device(spec.device).type == "cuda":
        torch.cuda.set_device(rank_device(spec, rank))
    timeout = datetime.timedelta(seconds=max(spec.timeout, START_TIMEOUT))
    kwargs: dict[str, Any] = {"backend": backend(spec.device), "timeout": timeout}
    if spec.init_method != "env://":
        kwargs.update(init_method=spec.init_method, rank=rank, world_size=world)
    dist.init_process_group(**kwargs)
    return (
        dist.new_group(backend="gloo", timeout=timeout) if kwargs["backend"] != "gloo" else dist.group.WORLD
    )


def rank_spec(config: EngineConfig, model: str, device: str) -> RankSpec:
    """What every rank of ``config``'s expert parallel loads and how."""
    return RankSpec(
        model=model,
        dtype=config.dtype,
        device=device,
        batch_invariant=config.batch_invariant,
        threads=config.threads or torch.get_num_threads(),  # the padding is calibrated per thread count
        placement=Placement(config.expert_parallel, config.expert_placement),
        timeout=config.expert_timeout,
        init_method="env://",
    )


def check_reports(reports: list[dict[str, Any]], batch_invariant: bool) -> None:
    """ExpertParallelError when a rank failed to load, or (in exact mode) the ranks' batch-invariance
    padding differs from rank 0's: the same rows would round differently on different ranks."""
    for report in reports[1:]:
        if report.get("error"):
            raise ExpertParallelError(f"rank {report['rank']} failed to start: {report['error']}")
    if batch_invariant:
        mine = reports[0]
        for report in reports[1:]:
            if report["padding"] != mine["padding"]:
                raise ExpertParallelError(
                    "the ranks disagree on batch-invariance padding "
                    f"(rank 0 {mine['padding']}, rank {report['rank']} {report['padding']}): "
                    "exact mode is refused; run the ranks on identical machines and thread "
                    "counts, or set batch_invariant = false"
                )


def rank_report(
    model: MoEModel | None, rank: int, held: dict[str, int] | None, error: str | None
) -> dict[str, Any]:
    """What a rank tells the others at the handshake."""
    if model is None or held is None:
        return {"rank": rank, "error": error}
    summary = model.invariance_summary()
    return {
        "rank": rank,
        "error": error,
        "padding": summary.get("padding"),
        "verified": summary.get("verified"),
        "threads": torch.get_num_threads(),
        "expert_bytes": held["held"] + held["whole"],
        "pid": os.getpid(),
    }
