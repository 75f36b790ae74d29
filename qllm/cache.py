"""Per-request cache: one preallocated, growable key and value buffer per attention layer, and
the fixed-size recurrent state of each linear-attention layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Keys and values of one request, ``[kv_heads, capacity, head_dim]`` per layer. A layer's
    buffers take the head count and widths of what is appended to it, so values may be wider than
    keys (latent attention) and layers may differ (MiMo-V2-Flash).

    Capacity grows by doubling, so appending a token is amortised O(1). The tensor manager
    (qllm/kernel/tensors.py) offloads and restores the buffers.
    """

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.states: list[list[torch.Tensor] | None] = [None] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` ([kv_heads, n, head_dim]) to ``layer``; return all keys and values so far."""
        (keys, new_k), (values, new_v) = self._extend(layer, k, v)
        new_k.copy_(k)
        new_v.copy_(v)
        return keys, values

    def _extend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Grow ``layer`` by ``k``'s length, uninitialised: (all keys, the new keys' slots) and the
        same for values; the caller fills the slots."""
        start = self.lengths[layer]
        end = start + k.shape[1]
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
        keys, values = buf_k[:, :end], buf_v[:, :end]
        return (keys, keys[:, start:]), (values, values[:, start:])

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
    def nbytes(self) -> int:
        """Bytes held by the buffers (capacity, not only the filled part) and recurrent states."""
        states = [t for tensors in self.states if tensors is not None for t in tensors]
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *states) if t is not None)

    def clear(self) -> None:
        """Drop every buffer (the request is finished or cancelled)."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.lengths = [0] * self.num_layers
        self.states = [None] * self.num_layers


def append_all(
    caches: Sequence[KVCache], layer: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:meth:`KVCache.append` of each cache's ``keys``/``values`` to ``layer``, with one copy call
    for them all (a decode step's copies are tiny: the per-call cost is most of their time)."""
    filled, slots, rows = [], [], []
    for cache, k, v in zip(caches, keys, values):
        (all_k, new_k), (all_v, new_v) = cache._extend(layer, k, v)
        filled.append((all_k, all_v))
        slots += (new_k, new_v)
        rows += (k, v)
    torch._foreach_copy_(slots, rows)
    return filled
