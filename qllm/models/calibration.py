"""Calibration of an executor's row padding: which padding of each op kind's calls makes a row's
result independent of its batch mates on this machine, at the thread count in force.

:class:`CalibratedExecutor` traces the GEMMs of a short forward pass, hands them to the probe
(qllm/models/invariance.py), checks each op kind whole at the padding found, and recalibrates
before computing whenever the thread count has changed (kernels split rows differently at
another thread count).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from qllm.kernel.runtime.ops import Op, OpKind
from qllm.logging import get_logger
from qllm.models import gemm, invariance, skinny
from qllm.models.executor import Executor
from qllm.version import __version__ as qllm_version

log = get_logger()


class CalibratedExecutor(Executor):
    """An :class:`~qllm.models.executor.Executor` whose row padding is calibrated (with batch
    invariance on: ``batch_invariant``)."""

    def __init__(self) -> None:
        super().__init__()
        self.invariance: invariance.Calibration | None = None
        self._calibrated_threads = 0

    def run(self, ops: list[Op], stop: Callable[[], bool] | None = None) -> list[Any]:
        """:meth:`Executor.run <qllm.models.executor.Executor.run>`, calibrated first where the
        thread count has changed since the last calibration."""
        if self.batch_invariant and self._calibrated_threads != torch.get_num_threads():
            self.calibrate()  # kernels split rows differently at another thread count
        return super().run(ops, stop)

    def calibrate(self, cache: invariance.ProbeCache | None = None) -> invariance.Calibration:
        """Find, on this machine and at the thread count in force, the row padding of each op kind
        that makes a row's results independent of its batch mates (see qllm/models/invariance.py)."""
        self._padding = {kind: invariance.NO_PADDING for kind in OpKind}
        result = invariance.calibrate(
            self._trace_gemms, self.signature(), self.device.type, cache, verify=self._op_invariant
        )
        for name, padding in result.padding.items():
            self._padding[OpKind[name]] = padding
        if not result.verified and (self.invariance is None or self.invariance.verified):
            log.warning(
                "batch_invariance_unverified",
                op_kinds=sorted(result.unverified),
                threads=result.threads,
                detail="no tested row padding makes these op kinds batch-invariant here; "
                "batched and preempted outputs may differ from solo runs in the last bits",
            )
        self.invariance = result
        self._calibrated_threads = torch.get_num_threads()
        return result

    def invariance_summary(self) -> dict[str, Any]:
        """What batch invariance this executor verified, for stats and reports, with the kernel
        that computes large float32 weights on this machine (``large_weight_gemm``)."""
        kernel = {"large_weight_gemm": gemm.large_weight_kernel()}
        if self.invariance is None:
            return {"enabled": False, "verified": False} | kernel
        return self.invariance.summary() | kernel

    def signature(self) -> str:
        """The adapter and every weight's name, shape, dtype and layout: what picks GEMM kernels."""
        # Which kernel runs a weight is code: the adapter, qllm's version and the oneDNN routing.
        parts = [
            f"{type(self).__module__}.{type(self).__qualname__}",
            qllm_version,
            gemm.ONEDNN,
            gemm.ONEDNN_MIN_WEIGHT,
            gemm.PACK,
            gemm.PACK_BATCH,
            gemm.large_weight_kernel(),
            skinny.KERNEL_ID,
        ]
        for name, t in [*self.hf.named_parameters(), *self.hf.named_buffers()]:
            parts.append(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.stride()}")
        return invariance.ProbeCache.key(parts)

    def _trace_gemms(self) -> dict[str, list[invariance.Gemm]]:
        """The GEMMs each op kind runs, traced over a 3-token prefill and one decode step; keeps
        one op of each kind and layer structure as a template for :meth:`_op_invariant`."""
        found: dict[str, dict[str, invariance.Gemm]] = {}
        templates: dict[tuple[Any, ...], Op] = {}
        cache = self.new_cache()
        tokens = torch.arange(3) % self.vocab_size
        with torch.no_grad():
            for ids in (tokens, tokens[:1]):
                steps = self.forward(cache, ids)
                op = next(steps)
                while True:
                    results = []
                    traced = invariance.trace_gemms(
                        functools.partial(lambda op, out: out.extend(self.compute([op])), op, results),
                        op.x.shape[0],
                    )
                    for call in traced:
                        found.setdefault(op.kind.name, {}).setdefault(call.signature(), call)
                    layer = self.layers[op.layer] if op.layer >= 0 else None
                    structure = (op.kind, type(layer).__name__, *sorted(c.signature() for c in traced))
                    templates.setdefault(structure, op)
                    try:
                        op = steps.send(results[0])
                    except StopIteration:
                        break
        self._op_templates: dict[str, list[Op]] = {}
        for op in templates.values():
            self._op_templates.setdefault(op.kind.name, []).append(op)
        self._op_flops = {
            kind: sum(call.flops_per_row() for call in calls.values()) for kind, calls in found.items()
        }
        return {kind: list(gemms.values()) for kind, gemms in found.items()}

    def _op_invariant(self, kind_name: str, padding: invariance.Padding) -> bool:
        """Whether each traced op of this kind gives every row the same result at any row count
        and offset under ``padding`` (rows of attention ops each from its own one-token request)."""
        kind = OpKind[kind_name]
        saved = self._padding[kind]
        self._padding[kind] = padding
        gen = torch.Generator().manual_seed(1)
        flops = self._op_flops.get(kind_name, 1.0)
        max_rows = invariance.probe_rows(flops)
        # An attention op's rows each come from a request of their own (its own cache): fewer.
        max_rows, windows = (min(max_rows, 24), 48) if kind is OpKind.ATTENTION else (min(max_rows, 64), 192)
        budget = invariance.probe_budget(flops, max_rows)
        try:
            with torch.no_grad():
                for template in self._op_templates.get(kind_name, []):

                    def rows(n: int, t: Op = template) -> torch.Tensor:
                        x = torch.randn(n, *t.x.shape[1:], generator=gen)
                        return x.to(dtype=t.x.dtype, device=t.x.device)

                    def call(x: torch.Tensor, t: Op = template) -> list[torch.Tensor]:
                        if kind is OpKind.ATTENTION:
                            zero = torch.zeros(1, dtype=torch.long, device=x.device)
                            ops = [
                                Op(kind, t.layer, x[i : i + 1], cache=self.new_cache(), positions=zero)
                                for i in range(x.shape[0])
                            ]
                        else:
                            weight = (
                                None
                                if t.weight is None
                                else t.weight.new_ones((x.shape[0], *t.weight.shape[1:]))
                            )
                            ops = [Op(kind, t.layer, x, expert=t.expert, weight=weight)]
                        return by_row(self._runners[kind](ops))

                    if not invariance.is_invariant(
                        call, rows, padding, max_rows, budget_rows=budget, max_windows=windows
                    ):
                        return False
        finally:
            self._padding[kind] = saved
        return True


def by_row(results: list[Any]) -> list[torch.Tensor]:
    """Ops' results as tensors with one row per input row: each component, concatenated over ops."""
    first = results[0]
    if isinstance(first, torch.Tensor):
        return [torch.cat(results)]
    return [torch.cat([r[i] for r in results]) for i in range(len(first))]
