"""A worker rank: loads its experts, then answers rank 0's messages until told to stop.

The worker holds no request state: each message is one expert call on the rows it carries, and
its reply is the expert's output (or an error status with a zero payload, after which the worker
keeps serving). It waits for rank 0 without a timeout; when rank 0 goes away the transport fails
and the worker exits.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import sys
from typing import Any

import torch
import torch.distributed as dist

from qllm.logging import get_logger
from qllm.parallel import wire
from qllm.parallel.ranks import RankSpec, init_ranks, rank_device, rank_report
from qllm.parallel.shard import drop_all_but_experts, keep_experts

log = get_logger()

FOREVER = datetime.timedelta(days=3650)
"""A worker waits for rank 0's next message this long: idle time is not a failure."""


def spawned_main(index: int, spec: RankSpec, world: int) -> None:
    """Entry point of a worker spawned by rank 0 (``torch.multiprocessing``): rank ``index + 1``.
    Its log lines (warnings and errors: a failed call) go to the shared stderr as JSON."""
    from qllm.logging import configure

    configure("warning", "json")
    sys.exit(serve_rank(spec, index + 1, world))


def serve_rank(spec: RankSpec, rank: int, world: int) -> int:
    """Join the ranks as ``rank``, load and keep this rank's experts, serve rank 0. Exit status."""
    from qllm.kernel.openmp import configure_openmp
    from qllm.models.loading import load_model

    # A terminal's SIGINT and a launcher's SIGTERM reach every rank: rank 0 drains its requests,
    # which need this rank, and then stops it (or exits, which ends this rank's wait).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    configure_openmp()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    control = init_ranks(spec, rank, world)
    device = rank_device(spec, rank)
    model = error = held = None
    try:
        model = load_model(spec.model, dtype=spec.dtype, device=device, batch_invariant=spec.batch_invariant)
        held = keep_experts(model, spec.placement, rank)
        drop_all_but_experts(model)
    except Exception as exc:  # reported to rank 0, which refuses to start
        error = f"{type(exc).__name__}: {exc}"[:500]
    dist.all_gather_object([None] * world, rank_report(model, rank, held, error), group=control)
    if model is None:
        return 1
    log.info("expert_parallel_worker_ready", rank=rank)
    try:
        return _loop(model, control, device)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _loop(model: Any, control: Any, device: str) -> int:
    head = wire.empty_header()
    while True:
        try:
            dist.irecv(head, src=0, group=control).wait(FOREVER)
        except Exception:  # rank 0 is gone
            return 0
        op, layer, expert, rows, cols, dtype, seq, _ = head.tolist()
        if op == wire.Op.STOP:
            dist.send(wire.header(wire.Status.OK, seq=seq), dst=0, group=control)
            return 0
        x = torch.empty((rows, cols), dtype=wire.DTYPES[dtype], device=device)
        try:
            dist.recv(x, src=0)
        except Exception:
            return 0
        status = wire.Status.OK
        try:
            with torch.no_grad():
                y = model.expert(model.moe_blocks[layer], expert, x)
            if y.shape != x.shape or y.dtype != x.dtype:
                raise ValueError(f"expert output {tuple(y.shape)} {y.dtype} is not its input's shape")
        except Exception as exc:
            log.error("expert_parallel_call_failed", layer=layer, expert=expert, error=str(exc)[:300])
            status, y = wire.Status.ERROR, torch.zeros_like(x)
        try:
            dist.send(wire.header(status, layer, expert, (rows, cols), dtype, seq), dst=0, group=control)
            dist.send(y.contiguous(), dst=0)
        except Exception:
            return 0
