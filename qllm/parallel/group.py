"""Rank 0's side of expert parallel: start the ranks, post remote experts, wait for them.

:meth:`ExpertGroup.start` either spawns the workers on this machine (``torch.multiprocessing``,
spawn) or, under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment), joins the ranks it
started (``env://``). Every rank loads the model and calibrates its batch-invariance padding; the
ranks then compare their padding (exact mode is refused where it differs) and each keeps only the
experts it holds.

The executor posts an expert call (:meth:`ExpertGroup.post`) a bounded window ahead of where it
computes and waits for it (:meth:`ExpertGroup.wait`) when its turn in the ascending expert order
comes. A failed exchange (a dead worker, one past the timeout, an error reply) raises
:class:`~qllm.errors.ExpertParallelError`; after a transport failure the group is broken and every
later call fails at once with the same error.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from qllm.errors import ExpertParallelError
from qllm.logging import get_logger
from qllm.parallel import torchrun_env, wire
from qllm.parallel.ranks import RankSpec, check_reports, init_ranks, rank_report, rank_spec
from qllm.parallel.shard import expert_count, keep_experts
from qllm.paths import free_port

if TYPE_CHECKING:
    from qllm.kernel.config import EngineConfig
    from qllm.models.base import MoEModel

log = get_logger()

STOP_TIMEOUT = 5.0
"""Seconds a worker gets to acknowledge STOP and exit before it is killed."""


@dataclass(slots=True, eq=False)
class Ticket:
    """One posted remote expert call: the works in flight and the tensors they fill."""

    rank: int
    layer: int
    expert: int
    seq: int
    works: list[Any]
    reply: torch.Tensor
    out: torch.Tensor
    keep: tuple[torch.Tensor, ...] = ()  # the sent tensors, alive until the sends complete


@dataclass(slots=True)
class Counters:
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0  # rank 0 blocked waiting on remote replies
    moe_ops: int = 0  # MoE layers computed with split experts (a stopped op's resumed parts not again)
    moe_rows: int = 0  # their rows
    per_rank_calls: dict[int, int] = field(default_factory=dict)


class ExpertGroup:
    """Rank 0's handle on the ranks of an expert-parallel model."""

    def __init__(
        self, model: MoEModel, spec: RankSpec, world: int, control: Any, processes: Any, window: int
    ):
        self.spec = spec
        self.placement = spec.placement
        self.world = world
        self.window = window
        self.control = control
        self.processes = processes  # the spawned workers' context (None under torchrun)
        self.counts = [0 if b is None else expert_count(b) for b in model.moe_blocks]
        self.failed: str | None = None
        self.closed = False
        self.ranks: list[dict[str, Any]] = []
        self.counters = Counters()
        self._seq = 0
        self._timeout = datetime.timedelta(seconds=spec.timeout)

    # ---------------------------------------------------------------- start
    @classmethod
    def start(cls, model: MoEModel, spec: RankSpec, world: int, *, window: int = 4) -> ExpertGroup:
        """Start (or join) the ranks for ``model``, already loaded and calibrated on rank 0; keep
        rank 0's experts. ExpertParallelError when a rank fails to start or the ranks disagree."""
        from qllm.parallel.worker import spawned_main

        launched = torchrun_env()
        processes = None
        if launched is None:
            spec = replace(spec, init_method=f"tcp://127.0.0.1:{free_port()}")
            import torch.multiprocessing as mp

            processes = mp.start_processes(
                spawned_main, args=(spec, world), nprocs=world - 1, join=False, start_method="spawn"
            )
        else:
            rank, size = launched
            if rank != 0 or size != world:
                raise ExpertParallelError(
                    f"expert_parallel = {world}, but the launcher started rank {rank} of {size}: "
                    f"launch {world} processes and serve from rank 0"
                )
            spec = replace(spec, init_method="env://")
        try:
            control = init_ranks(spec, 0, world)
        except Exception as exc:
            _kill(processes, 0.0)
            raise ExpertParallelError(f"expert parallel ranks did not start: {exc}") from None
        group = cls(model, spec, world, control, processes, window)
        try:
            group._handshake(model)
        except BaseException:
            group.close()
            raise
        return group

    def _handshake(self, model: MoEModel) -> None:
        held = keep_experts(model, self.placement, 0)
        mine = rank_report(model, 0, held, None)
        reports: list[Any] = [None] * self.world
        dist.all_gather_object(reports, mine, group=self.control)
        self.ranks = reports
        check_reports(reports, self.spec.batch_invariant)
        log.info(
            "expert_parallel_ready",
            ranks=self.world,
            placement=self.placement.kind,
            expert_bytes=[r["expert_bytes"] for r in reports],
            pids=[r["pid"] for r in reports],
        )

    # ---------------------------------------------------------------- calls
    def holds(self, layer: int, expert: int) -> bool:
        """Whether rank 0 computes ``expert`` of ``layer`` itself."""
        return self.placement.rank_of(expert, self.counts[layer]) == 0

    def post(self, layer: int, expert: int, x: torch.Tensor) -> Ticket:
        """Send ``x`` (the expert's input rows, padded) to the rank that holds ``expert`` and post
        the receive of its reply."""
        self._check()
        rank = self.placement.rank_of(expert, self.counts[layer])
        x = x.contiguous()
        self._seq += 1
        shape = (int(x.shape[0]), int(x.shape[1]))
        head = wire.header(wire.Op.EXPERT, layer, expert, shape, wire.dtype_code(x.dtype), self._seq)
        reply = wire.empty_header()
        out = torch.empty_like(x)
        try:
            works = [
                dist.isend(head, dst=rank, group=self.control),
                dist.isend(x, dst=rank),
                dist.irecv(reply, src=rank, group=self.control),
                dist.irecv(out, src=rank),
            ]
        except Exception as exc:
            raise self._broken(rank, exc) from None
        c = self.counters
        c.calls += 1
        c.bytes_sent += x.numel() * x.element_size()
        c.per_rank_calls[rank] = c.per_rank_calls.get(rank, 0) + 1
        return Ticket(rank, layer, expert, self._seq, works, reply, out, (head, x))

    def wait(self, ticket: Ticket) -> torch.Tensor:
        """The expert's output rows of a posted call (the raw output, as the family hook returns
        it). ExpertParallelError when the rank failed."""
        start = time.perf_counter()
        try:
            for work in ticket.works:
                work.wait(self._timeout)
        except Exception as exc:
            raise self._broken(ticket.rank, exc) from None
        finally:
            ticket.works = []
            self.counters.wait_s += time.perf_counter() - start
        status, layer, expert, _, _, _, seq, _ = ticket.reply.tolist()
        if status != wire.Status.OK or (layer, expert, seq) != (ticket.layer, ticket.expert, ticket.seq):
            raise ExpertParallelError(
                f"rank {ticket.rank} failed expert {ticket.expert} of layer {ticket.layer} "
                f"(status {status}; its log has the cause)"
            )
        self.counters.bytes_received += ticket.out.numel() * ticket.out.element_size()
        return ticket.out

    def call(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.wait(self.post(layer, expert, x))

    def drain(self, tickets: list[Ticket]) -> None:
        """Wait for posted calls whose results are no longer wanted (an op failed): nothing is
        left in flight when the op ends. Errors are already being reported; these are dropped."""
        for ticket in tickets:
            with contextlib.suppress(ExpertParallelError):
                self.wait(ticket)

    def count_op(self, rows: int) -> None:
        """A MoE layer of ``rows`` rows is computed with split experts (for the per-op figures)."""
        self.counters.moe_ops += 1
        self.counters.moe_rows += rows

    def _check(self) -> None:
        if self.failed is not None:
            raise ExpertParallelError(self.failed)
        if self.closed:
            raise ExpertParallelError("expert parallel ranks are stopped")

    def _broken(self, rank: int, exc: Exception) -> ExpertParallelError:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if self.failed is None:
            self.failed = f"expert parallel rank {rank} failed or timed out ({detail})"
            log.error("expert_parallel_failed", rank=rank, detail=detail, timeout_s=self.spec.timeout)
        return ExpertParallelError(self.failed)

    # ---------------------------------------------------------------- health, stats, stop
    @property
    def healthy(self) -> bool:
        """No exchange has failed, and every spawned worker is alive."""
        if self.failed is not None or self.closed:
            return False
        if self.processes is not None and not all(p.is_alive() for p in self.processes.processes):
            dead = [i + 1 for i, p in enumerate(self.processes.processes) if not p.is_alive()]
            self.failed = f"expert parallel rank {dead[0]} exited"
            log.error("expert_parallel_failed", rank=dead[0], detail="exited")
            return False
        return True

    def stats(self) -> dict[str, Any]:
        c = self.counters
        exchanged = c.bytes_sent + c.bytes_received
        layers = sum(1 for n in self.counts if n)
        return {
            "ranks": self.world,
            "placement": self.placement.kind,
            "healthy": self.failed is None and not self.closed,
            "error": self.failed,
            "expert_bytes": [r.get("expert_bytes", 0) for r in self.ranks],
            "pids": [r.get("pid") for r in self.ranks],
            "window": self.window,
            "remote_calls": c.calls,
            "remote_calls_by_rank": {str(r): n for r, n in sorted(c.per_rank_calls.items())},
            "bytes_exchanged": exchanged,
            "remote_wait_s": c.wait_s,
            "moe_ops_remote": c.moe_ops,
            "remote_wait_per_moe_op_s": c.wait_s / c.moe_ops if c.moe_ops else 0.0,
            # A decode step moves one row per request through every MoE layer.
            "bytes_per_token": exchanged * layers / c.moe_rows if c.moe_rows else 0.0,
        }

    def close(self) -> None:
        """Stop the workers (each acknowledges STOP; one that does not within STOP_TIMEOUT is
        killed) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        if self.failed is None:
            stop = datetime.timedelta(seconds=STOP_TIMEOUT)
            for rank in range(1, self.world):
                reply = wire.empty_header()
                try:
                    dist.isend(wire.header(wire.Op.STOP), dst=rank, group=self.control).wait(stop)
                    dist.irecv(reply, src=rank, group=self.control).wait(stop)
                except Exception:
                    break
        _kill(self.processes, STOP_TIMEOUT if self.failed is None else 0.0)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def start_experts(model: MoEModel, name: Any, config: EngineConfig) -> ExpertGroup:
    """Start expert parallel for ``model`` (loaded on rank 0 from ``name``) as ``config`` says,
    and route its remote experts through the group. The workers stop with the group, at the
    latest when this process exits."""
    if not isinstance(name, str | os.PathLike):
        raise ValueError(
            "expert_parallel needs the model as a preset name or a model directory: every rank loads it"
        )
    spec = rank_spec(config, str(name), str(model.device))
    group = ExpertGroup.start(model, spec, config.expert_parallel, window=config.expert_window)
    model.remote = group
    atexit.register(group.close)
    return group


def _kill(processes: Any, wait: float = STOP_TIMEOUT) -> None:
    """Join the spawned workers for up to ``wait`` s; kill those still alive."""
    if processes is None:
        return
    deadline = time.monotonic() + wait
    for p in processes.processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
