"""The cost model of ops: how long a batched op takes, by op kind and rows, learned online.

The dispatcher records the time of every batched op it runs (its kind, its rows and the seconds
it took, hand-off to the compute thread included); policies read predictions through
:attr:`KernelView.costs <qllm.kernel.view.KernelView.costs>`. One model per kernel, so per device.

Rows are grouped in buckets of ``GRAIN`` (the executor pads batched rows as probed on the machine,
often to a multiple of 4 or 16, so nearby row counts cost alike). Each bucket keeps an exponentially weighted mean of
its op times, so the model follows a machine whose load drifts. A prediction for rows between two
measured buckets interpolates linearly; past the largest measured bucket it extends the slope of
the two largest, and below the smallest it takes the smallest. With a single bucket known, time is
taken as proportional to rows (the most a larger batch could cost): a policy that trusts it keeps
an LS op's riders few until a larger batch (a best-effort step, say) has been measured.
Predictions never decrease with rows (a noisy small bucket does not make more rows look cheaper).
"""

from __future__ import annotations

from dataclasses import dataclass

from qllm.kernel.runtime.ops import OpKind

SMOOTHING = 0.2
"""Weight of a new measurement in its bucket's mean."""
GRAIN = 4
"""Rows per bucket: the executor's row padding."""


def bucket(rows: int) -> int:
    """The bucket of ``rows``: ``rows`` rounded up to a multiple of ``GRAIN``."""
    if rows < 1:
        raise ValueError("an op has at least one row")
    return -(-rows // GRAIN) * GRAIN


@dataclass
class _Bucket:
    mean_s: float
    count: int


class OpCosts:
    """Op time in seconds as a function of (kind, rows), measured online from the kernel's own ops."""

    def __init__(self, smoothing: float = SMOOTHING):
        if not 0 < smoothing <= 1:
            raise ValueError("smoothing must be in (0, 1]")
        self.smoothing = smoothing
        self._buckets: dict[OpKind, dict[int, _Bucket]] = {}

    def record(self, kind: OpKind, rows: int, seconds: float) -> None:
        """One batched op of ``kind`` over ``rows`` rows took ``seconds``."""
        buckets = self._buckets.setdefault(OpKind(kind), {})
        b = buckets.get(bucket(rows))
        if b is None:
            buckets[bucket(rows)] = _Bucket(seconds, 1)
        else:
            b.mean_s += self.smoothing * (seconds - b.mean_s)
            b.count += 1

    def known(self, kind: OpKind) -> bool:
        """Whether any op of ``kind`` was measured."""
        return bool(self._buckets.get(OpKind(kind)))

    def predict(self, kind: OpKind, rows: int) -> float | None:
        """Predicted seconds of one batched op of ``kind`` over ``rows`` rows (None: never measured)."""
        buckets = self._buckets.get(OpKind(kind))
        if not buckets:
            return None
        points = _monotone(sorted((size, b.mean_s) for size, b in buckets.items()))
        x = bucket(rows)
        below = [p for p in points if p[0] <= x]
        above = [p for p in points if p[0] >= x]
        if below and above:
            (x0, y0), (x1, y1) = below[-1], above[0]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        if above:  # smaller than anything measured: the smallest bucket's time
            return above[0][1]
        if len(points) == 1:
            size, seconds = points[0]
            return seconds * x / size
        (x0, y0), (x1, y1) = points[-2], points[-1]
        return y1 + (y1 - y0) * (x - x1) / (x1 - x0)

    def snapshot(self) -> dict[str, dict[int, dict[str, float]]]:
        """Every measured bucket: ``{kind: {rows: {"mean_s", "count"}}}``."""
        return {
            kind.name.lower(): {
                size: {"mean_s": b.mean_s, "count": b.count} for size, b in sorted(buckets.items())
            }
            for kind, buckets in self._buckets.items()
        }


def _monotone(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """``points`` with each time raised to the largest time of the smaller buckets."""
    out, top = [], 0.0
    for size, seconds in points:
        top = max(top, seconds)
        out.append((size, top))
    return out
