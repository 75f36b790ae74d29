"""LS decode pacing for ``cohort``: an LS request past its first token gets its next token within
its TPOT budget; best-effort work gets what the budget leaves (pure decisions over a view).

Each LS request decoding has a **deadline** for its next token: its latest token's time plus its
TPOT SLO (``RequestView.tpot_slo``, else ``TPOT_STEPS`` single-request decode steps as the cost
model predicts them), scaled by ``tpot_scale`` (``SCALE``, 0.9). The LS requests at
the LS op furthest behind are the **group**; their pass from that op on, predicted by the cost
model, must end by the earliest deadline among them. At each decision:

1. **Riders**: the other requests at the group's op (best-effort ones in turn, clients in turn)
   ride along while the group's pass with them is still predicted to end by the deadline, or to
   take at most ``free`` (``FREE``, 0.1) more than the group's pass alone: where a MoE op already
   reads every expert's weights (a CPU reaches that at about 8 rows), more rows cost next to
   nothing, and leaving them out would cost best-effort work a whole op later. When every ready
   request rides, this is the cohort as without pacing: light LS load costs best-effort work
   nothing.
2. **Fill**: requests left out (at other ops, or not fitting) run their op, the cohort furthest
   behind first, when the group's pass is still predicted to end by the deadline after it: the
   time the LS requests do not need goes to best-effort work.
3. Otherwise the group's op runs with its riders; with none fitting, the LS rows advance alone in
   their own smaller batch.

A deadline that cannot be held even alone (LS rows too many for the SLO) lets the group run alone
at every op: best-effort work then gets only ``floor`` of the time (predicted op time of fill ops
over all ops paced since pacing began), so that it is never starved. ``floor`` is the knob of the
trade between LS TPOT and best-effort throughput (docs/policies.md has the measured frontier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qllm.policies.api import TPOT_STEPS, KernelView, OpKind, Phase, RequestView
from qllm.policies.fair import fair_order

SCALE = 0.9
"""The plan's deadline in TPOT SLOs after the latest token (``cohort:tpot_scale``): below 1 the
plan keeps a margin for the cost model's error. Above 1 more best-effort rows ride, for a slower
LS stream: on a CPU, where a cut rider costs best-effort work a whole op's fixed cost, 2 kept
best-effort tokens/s near fcfs's in the runs measured, and its LS TPOT varied from run to run
(docs/policies.md, the frontier)."""

FREE = 0.1
"""Riders that lengthen the LS group's pass by at most this share ride even past the deadline
(``cohort:free``): their cost to the LS stream is within the cost model's error."""

Rest = Callable[[OpKind, int, int, KernelView], "float | None"]
"""(op kind, layer, rows, kernel) -> predicted time of a pass's ops from that op through its head."""


class Pacer:
    """The pacing state of one policy instance: the predicted op time given to fill ops and to LS
    groups since pacing began (it begins when an LS request decodes beside best-effort work)."""

    def __init__(self, floor: float = 0.2, scale: float = SCALE, free: float = FREE):
        if not 0 <= free <= 1:
            raise ValueError(
                "free must be in [0, 1]: the share of the LS pass that riders may add past the deadline"
            )
        if not 0 <= floor < 1:
            raise ValueError("floor must be in [0, 1): the least share of time best-effort work gets")
        if scale <= 0:
            raise ValueError("tpot_scale must be > 0: the share of the TPOT SLO that LS decode is planned in")
        self.floor = floor
        self.scale = scale
        self.free = free
        self.fill_s = 0.0
        self.group_s = 0.0

    def target_s(self, r: RequestView, rest: Rest, kernel: KernelView) -> float | None:
        """``r``'s TPOT budget: its SLO, else the default steps of the predicted lone decode pass."""
        if r.tpot_slo is not None:
            return r.tpot_slo
        step = rest(OpKind.ATTENTION, 0, 1, kernel)
        return None if step is None else TPOT_STEPS * step

    def select(
        self,
        ready: Sequence[RequestView],
        kernel: KernelView,
        position: Callable[[RequestView], tuple],
        layer_of: Callable[[RequestView], int],
        rest: Rest,
    ) -> list[RequestView] | None:
        """The batch that paces LS decode (see the module doc), or None where there is nothing to
        pace (no LS request decoding, or no other work beside it, or costs not measured yet): the
        caller then steps the cohort as without pacing."""
        decoding = [r for r in ready if r.is_ls and r.phase is Phase.DECODE and r.last_token is not None]
        if not decoding or all(r.is_ls for r in ready):
            self.fill_s = self.group_s = 0.0
            return None
        key = min(decoding, key=position).op_key
        group = [r for r in decoding if r.op_key == key][: kernel.max_batch]
        targets = [self.target_s(r, rest, kernel) for r in group]
        if None in targets:
            return None
        deadline = min(r.last_token + self.scale * t for r, t in zip(group, targets))  # type: ignore[operator]
        lead = group[0]
        kind, layer = lead.op_kind, layer_of(lead)

        def pass_s(rows: int) -> float | None:
            return rest(kind, layer, rows, kernel)

        rows = sum(r.rows for r in group)
        alone = pass_s(rows)
        if alone is None:
            return None
        limit = max(deadline, kernel.now + (1 + self.free) * alone)
        batch, chosen = list(group), {r.id for r in group}
        riders = fair_order(
            (r for r in ready if r.op_key == key and r.id not in chosen), key=lambda r: r.sort_key
        )
        for r in riders:
            if len(batch) >= kernel.max_batch:
                break
            t = pass_s(rows + r.rows)
            if t is not None and kernel.now + t <= limit:
                batch.append(r)
                rows += r.rows
        chosen = {r.id for r in batch}
        left = [r for r in ready if r.id not in chosen]
        if not left:
            return batch  # everyone rides: the cohort
        fill_key = min(left, key=position).op_key
        fill = fair_order((r for r in left if r.op_key == fill_key), key=lambda r: r.sort_key)[
            : kernel.max_batch
        ]
        fill_rows = sum(r.rows for r in fill)
        fill_t = kernel.costs.predict(fill[0].op_kind, fill_rows) if fill[0].op_kind is not None else None
        group_t = kernel.costs.predict(kind, rows) or 0.0
        in_time = fill_t is not None and kernel.now + fill_t + (pass_s(rows) or 0.0) <= deadline
        owed = self.fill_s < self.floor * (self.fill_s + self.group_s)
        if in_time or owed:
            self.fill_s += fill_t or group_t
            return fill
        self.group_s += group_t
        return batch
