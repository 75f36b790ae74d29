"""Which rank holds which routed expert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PlacementName = Literal["contiguous", "round-robin"]
PLACEMENTS: tuple[PlacementName, ...] = ("contiguous", "round-robin")


@dataclass(frozen=True, slots=True)
class Placement:
    """Experts ``0 .. experts-1`` of every MoE layer over ``ranks`` ranks: in contiguous runs
    (rank 0 the first ``ceil(experts / ranks)``), or dealt round-robin (expert ``e`` on rank
    ``e % ranks``). Every layer places its experts alike."""

    ranks: int
    kind: PlacementName = "contiguous"

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"expert parallel needs at least 1 rank, got {self.ranks}")
        if self.kind not in PLACEMENTS:
            raise ValueError(f"expert placement must be one of {', '.join(PLACEMENTS)}, got {self.kind!r}")

    def rank_of(self, expert: int, experts: int) -> int:
        """The rank that holds ``expert`` of a layer with ``experts`` routed experts."""
        if self.kind == "round-robin":
            return expert % self.ranks
        return expert // -(-experts // self.ranks)

    def held_by(self, rank: int, experts: int) -> list[int]:
        """The experts ``rank`` holds, ascending."""
        return [e for e in range(experts) if self.rank_of(e, experts) == rank]
