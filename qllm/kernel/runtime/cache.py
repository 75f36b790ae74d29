"""Per-request cache: the keys and values of each attention layer, and the fixed-size recurrent
state of each linear-attention layer.

Keys and values live in one of two layouts, chosen when the cache is made:

- **Growable buffers** (the default): one preallocated buffer per layer that doubles when full.
  A layer's keys are a view of its buffer, with no copy; up to half of a buffer may be unused.
- **Blocks** (a :class:`BlockPool`, ``Engine(kv_block_size=N)``): fixed-size blocks of ``N``
  tokens, taken from a pool that all requests of an engine share and recycled when a request
  ends. A request holds at most one partly filled block per layer, and the tensor manager counts,
  offloads and restores its memory block by block. Attention reads a layer's blocks joined into
  one tensor (a copy of the request's keys and values at each op, the price of the layout).

Both layouts hand attention the same values in the same shape, so a request's output does not
depend on the layout (tests/test_kv_blocks.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class BlockPool:
    """Blocks of keys or values, ``[heads, block_size, width]`` each, shared by the caches of one
    engine. A block holds ``block_size`` tokens of one layer's keys (or values) of one request.
    Blocks given back are kept for reuse (:meth:`trim` frees them); every shape of block (layers
    and keys and values may differ, e.g. latent attention) has its own free list."""

    def __init__(self, block_size: int, dtype: torch.dtype, device: torch.device | str):
        if block_size < 1:
            raise ValueError("block_size must be >= 1 token")
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self._free: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.in_use = 0
        self.bytes_in_use = 0
        self.free_bytes = 0
        self.cached = 0  # blocks the prefix index holds (qllm/kernel/runtime/prefix.py), not in use
        self.cached_bytes = 0
        self.allocated = 0  # blocks made so far (a measure of the pool's churn)

    def take(self, heads: int, width: int) -> torch.Tensor:
        """A block for ``heads`` heads of ``width`` (a reused one where one is free; uninitialised)."""
        free = self._free.get((heads, width))
        if free:
            block = free.pop()
            self.free_bytes -= block.nbytes
        else:
            block = torch.empty(heads, self.block_size, width, dtype=self.dtype, device=self.device)
            self.allocated += 1
        self.in_use += 1
        self.bytes_in_use += block.nbytes
        return block

    def give(self, blocks: Sequence[torch.Tensor]) -> None:
        """Take back blocks that a cache no longer holds."""
        self.drop(blocks)
        self._keep(blocks)

    def drop(self, blocks: Sequence[torch.Tensor]) -> None:
        """Stop counting blocks that leave the pool for good (their memory is freed when the last
        reference goes: on CUDA, after the copies queued on them ran)."""
        for block in blocks:
            self.in_use -= 1
            self.bytes_in_use -= block.nbytes

    def cache(self, blocks: Sequence[torch.Tensor]) -> None:
        """Count blocks a request held as the prefix index's from now on."""
        self.drop(blocks)
        self.cached += len(blocks)
        self.cached_bytes += sum(block.nbytes for block in blocks)

    def uncache(self, blocks: Sequence[torch.Tensor]) -> None:
        """Take back blocks the prefix index evicted (kept for reuse, as :meth:`give`)."""
        self.cached -= len(blocks)
        self.cached_bytes -= sum(block.nbytes for block in blocks)
        self._keep(blocks)

    def _keep(self, blocks: Sequence[torch.Tensor]) -> None:
        """Keep blocks no one holds for reuse."""
        for block in blocks:
            self._free.setdefault((block.shape[0], block.shape[2]), []).append(block)
            self.free_bytes += block.nbytes

    @property
    def free(self) -> int:
        return sum(len(blocks) for blocks in self._free.values())

    def trim(self) -> int:
        """Free the blocks kept for reuse; returns the bytes freed."""
        freed, self.free_bytes = self.free_bytes, 0
        self._free.clear()
        return freed

    def stats(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "blocks_in_use": self.in_use,
            "blocks_free": self.free,
            "bytes_in_use": self.bytes_in_use,
            "bytes_free": self.free_bytes,
            "blocks_cached": self.cached,
            "bytes_cached": self.cached_bytes,
            "blocks_allocated": self.allocated,
        }


class KVCache:
    """Keys and values of one request, ``[kv_heads, length, head_dim]`` per layer (see the module's
    docstring for the two layouts). A layer's storage takes the head count and widths of what is
    appended to it, so values may be wider than keys (latent attention) and layers may differ
    (MiMo-V2-Flash).

    With buffers, capacity grows by doubling, so appending a token is amortised O(1). The tensor
    manager (qllm/kernel/tensors.py) offloads and restores the buffers or blocks.
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        pool: BlockPool | None = None,
    ):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.pool = pool
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # buffers (without a pool)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_blocks: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # with a pool
        self.value_blocks: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.block_bytes = 0  # bytes of the private blocks held, kept as they come and go
        # The first ``shared`` blocks of every layer's keys and values belong to the prefix index
        # (qllm/kernel/runtime/prefix.py): read-only, counted there, never given back from here.
        self.shared = 0
        self.lengths = [0] * num_layers
        self.states: list[list[torch.Tensor] | None] = [None] * num_layers

    @property
    def paged(self) -> bool:
        return self.pool is not None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` ([kv_heads, n, head_dim]) to ``layer``; return all keys and values so far."""
        slots: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        self.reserve(layer, k, v, slots, rows)
        for slot, row in zip(slots, rows):
            slot.copy_(row)
        return self.kv(layer)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys and values of ``layer``, ``[heads, length, width]`` each: views of the buffers,
        or the blocks joined (one block: a view of it)."""
        end = self.lengths[layer]
        if self.pool is None:
            return self.keys[layer][:, :end], self.values[layer][:, :end]
        return _joined(self.key_blocks[layer], end), _joined(self.value_blocks[layer], end)

    def reserve(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: list[torch.Tensor],
        rows: list[torch.Tensor],
    ) -> None:
        """Grow ``layer`` by ``k``'s length, uninitialised, and add to ``slots`` the new storage and
        to ``rows`` the parts of ``k`` and ``v`` that fill it. The caller copies them, so that the
        copies of many caches run as one call (:func:`append_all`); until then the new positions
        hold garbage."""
        start = self.lengths[layer]
        end = start + k.shape[1]
        if self.pool is not None:
            self._reserve_blocks(layer, k, v, start, end, slots, rows)
            self.lengths[layer] = end
            return
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[1] < end:
            capacity = max(16, end, 2 * (0 if buf_k is None else buf_k.shape[1]))
            # Shaped as what is appended: a layer may have its own head count (MiMo-V2-Flash).
            new_k = torch.empty(k.shape[0], capacity, k.shape[2], dtype=self.dtype, device=self.device)
            new_v = torch.empty(v.shape[0], capacity, v.shape[2], dtype=self.dtype, device=self.device)
            if buf_k is not None:
                new_k[:, :start] = buf_k[:, :start]
                new_v[:, :start] = buf_v[:, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        self.lengths[layer] = end
        slots += (buf_k[:, start:end], buf_v[:, start:end])
        rows += (k, v)

    def _reserve_blocks(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        end: int,
        slots: list[torch.Tensor],
        rows: list[torch.Tensor],
    ) -> None:
        size = self.pool.block_size
        for blocks, new in ((self.key_blocks[layer], k), (self.value_blocks[layer], v)):
            while len(blocks) * size < max(end, 1):
                self.take_block(blocks, new.shape[0], new.shape[2])
            at = start
            while at < end:  # the new tokens, block by block
                block, offset = divmod(at, size)
                n = min(size - offset, end - at)
                slots.append(blocks[block][:, offset : offset + n])
                rows.append(new[:, at - start : at - start + n])
                at += n

    def take_block(self, blocks: list[torch.Tensor], heads: int, width: int) -> torch.Tensor:
        """A block from the pool, appended to ``blocks`` (one layer's keys or values) and counted
        in :attr:`block_bytes`; uninitialised."""
        block = self.pool.take(heads, width)
        blocks.append(block)
        self.block_bytes += block.nbytes
        return block

    def adopt(self, key_blocks: list[list[torch.Tensor]], value_blocks: list[list[torch.Tensor]]) -> None:
        """Start an empty cache with shared blocks (full ones, every layer the same count): the
        keys and values of its first tokens, computed by another request."""
        if self.pool is None or any(self.lengths):
            raise ValueError("only an empty cache of blocks adopts shared blocks")
        for layer in range(self.num_layers):
            self.key_blocks[layer] = list(key_blocks[layer])
            self.value_blocks[layer] = list(value_blocks[layer])
        self.shared = len(key_blocks[0])
        self.lengths = [self.shared * self.pool.block_size] * self.num_layers

    def share(self, start: int, count: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Hand blocks ``start:start + count`` of every layer (full, right after the shared ones)
        to the prefix index: returns them, keys and values per layer, no longer counted here."""
        if start != self.shared:
            raise ValueError(f"blocks from {start} cannot be shared after {self.shared} shared blocks")
        end = start + count
        keys = [blocks[start:end] for blocks in self.key_blocks]
        values = [blocks[start:end] for blocks in self.value_blocks]
        self.block_bytes -= sum(b.nbytes for bs in (*keys, *values) for b in bs)
        self.shared = end
        return keys, values

    def replace(
        self, start: int, key_blocks: list[list[torch.Tensor]], value_blocks: list[list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Put shared blocks (holding the same values) in place of private blocks ``start:``
        onwards, right after the shared ones; returns the private blocks replaced."""
        if start != self.shared:
            raise ValueError(f"blocks from {start} cannot be shared after {self.shared} shared blocks")
        count = len(key_blocks[0])
        replaced = []
        for ours, theirs in (*zip(self.key_blocks, key_blocks), *zip(self.value_blocks, value_blocks)):
            replaced += ours[start : start + count]
            ours[start : start + count] = theirs
        self.block_bytes -= sum(b.nbytes for b in replaced)
        self.shared = start + count
        return replaced

    def state(self, layer: int) -> list[torch.Tensor] | None:
        """The recurrent state tensors of linear-attention ``layer`` (None before its first token)."""
        return self.states[layer]

    def update_state(self, layer: int, tensors: list[torch.Tensor], n: int) -> None:
        """Replace linear-attention ``layer``'s state after it has read ``n`` more tokens."""
        self.states[layer] = tensors
        self.lengths[layer] += n

    def length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    @property
    def blocks(self) -> int:
        """Private blocks held (0 without a pool; shared blocks are the prefix index's)."""
        return sum(len(b) for b in (*self.key_blocks, *self.value_blocks)) - 2 * self.num_layers * self.shared

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (capacity, not only the filled part) or blocks, and the
        recurrent states."""
        states = [t for tensors in self.states if tensors is not None for t in tensors]
        return self.block_bytes + sum(t.nbytes for t in (*self.keys, *self.values, *states) if t is not None)

    def release_blocks(self, reuse: bool = True) -> None:
        """Give every private block back to the pool, or with ``reuse`` False let them go (the
        lengths and the shared blocks stay: the tensor manager offloaded the private ones)."""
        if self.pool is not None:
            for blocks in (*self.key_blocks, *self.value_blocks):
                (self.pool.give if reuse else self.pool.drop)(blocks[self.shared :])
                del blocks[self.shared :]
            self.block_bytes = 0

    def clear(self) -> None:
        """Drop every buffer, give back every private block and let go of the shared ones (the
        request is finished or cancelled)."""
        self.release_blocks()
        for blocks in (*self.key_blocks, *self.value_blocks):
            blocks.clear()
        self.shared = 0
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.lengths = [0] * self.num_layers
        self.states = [None] * self.num_layers


def _joined(blocks: list[torch.Tensor], end: int) -> torch.Tensor:
    """The first ``end`` tokens of a layer's blocks as one tensor."""
    if len(blocks) == 1:
        return blocks[0][:, :end]
    return torch.cat(blocks, dim=1)[:, :end]


def append_all(
    caches: Sequence[KVCache], layer: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:meth:`KVCache.append` of each cache's ``keys``/``values`` to ``layer``, with one copy call
    for them all (a decode step's copies are tiny: the per-call cost is most of their time)."""
    slots: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    for cache, k, v in zip(caches, keys, values):
        cache.reserve(layer, k, v, slots, rows)
    torch._foreach_copy_(slots, rows)
    return [cache.kv(layer) for cache in caches]
