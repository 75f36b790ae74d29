"""A model keeps only the routed experts its rank holds.

Fused expert weights (``experts.gate_up_proj [E, 2I, H]`` and every other parameter of a block's
experts whose first dimension counts the experts) become :class:`HeldExperts`: the held experts'
slices in one tensor, indexed by the global expert number as before, so the family's ``expert``
hook runs unchanged on the same contiguous slices. Per-expert modules (an ``nn.ModuleList``) of
experts held elsewhere are replaced by empty modules. A worker also drops every weight outside the
experts (:func:`drop_all_but_experts`): it computes nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qllm.models import gemm

if TYPE_CHECKING:
    from qllm.models.base import MoEModel
    from qllm.parallel.placement import Placement


class HeldExperts:
    """A fused expert weight with only some experts' slices: ``weight[e]`` for a held expert ``e``
    is its slice, contiguous as in the full weight; any other ``e`` is a LookupError."""

    __slots__ = ("index", "local", "shape")

    def __init__(self, weight: torch.Tensor, held: list[int]):
        self.local = weight.detach()[held].clone() if held else weight.new_empty((0, *weight.shape[1:]))
        self.index = {e: i for i, e in enumerate(held)}
        self.shape = weight.shape  # the full weight's: hooks may read it

    def __getitem__(self, expert: int) -> torch.Tensor:
        try:
            return self.local[self.index[int(expert)]]
        except KeyError:
            raise LookupError(f"expert {expert} is held by another rank") from None

    @property
    def nbytes(self) -> int:
        return self.local.numel() * self.local.element_size()


def expert_count(block: torch.nn.Module) -> int:
    """The number of routed experts of a MoE block."""
    experts = block.experts
    if isinstance(experts, torch.nn.ModuleList):
        return len(experts)
    count = getattr(experts, "num_experts", None)
    if isinstance(count, int):
        return count
    dims = [p.shape[0] for p in experts.parameters() if p.dim() == 3]
    if not dims:
        raise ValueError(f"cannot tell how many experts {type(experts).__name__} holds")
    return max(dims)


def keep_experts(model: MoEModel, placement: Placement, rank: int) -> dict[str, int]:
    """Drop, in every MoE layer of ``model``, the routed experts' weights that ``rank`` does not
    hold. Returns bytes: ``held`` (this rank's routed experts), ``whole`` (expert weights that
    could not be split by expert, kept whole on every rank)."""
    held_bytes = whole_bytes = 0
    for block in model.moe_blocks:
        if block is None:
            continue
        count = expert_count(block)
        held = placement.held_by(rank, count)
        experts = block.experts
        if isinstance(experts, torch.nn.ModuleList):
            for e in range(count):
                if e in held:
                    held_bytes += _module_bytes(experts[e])
                else:
                    experts[e] = torch.nn.Module()
            continue
        for name, weight in list(experts.named_parameters(recurse=False)):
            if weight.dim() >= 2 and weight.shape[0] == count:
                part = HeldExperts(weight, held)
                delattr(experts, name)  # the parameter, replaced by its held part
                setattr(experts, name, part)
                gemm.forget(weight)
                held_bytes += part.nbytes
                gemm.pack(part.local)
            else:
                whole_bytes += weight.numel() * weight.element_size()
        for module in experts.children():  # sub-modules of a fused block: not split by expert
            whole_bytes += _module_bytes(module)
    return {"held": held_bytes, "whole": whole_bytes}


def drop_all_but_experts(model: MoEModel) -> int:
    """Free every weight of ``model`` outside its MoE blocks' routed experts (a worker's: it only
    computes experts). Returns the bytes freed."""
    keep: set[int] = set()
    for block in model.moe_blocks:
        if block is not None:
            keep.update(id(p) for p in block.experts.parameters())
    freed = 0
    empty: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for weight in model.hf.parameters():
        if id(weight) in keep or weight.numel() == 0:
            continue
        freed += weight.numel() * weight.element_size()
        gemm.forget(weight)
        weight.data = empty.setdefault((weight.dtype, weight.device), weight.new_empty(0))
    return freed


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
