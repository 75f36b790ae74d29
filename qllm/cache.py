"""Per-request cache: one preallocated, growable key and value buffer per attention layer, and
the fixed-size recurrent state of each linear-attention layer."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one request, ``[kv_heads, capacity, head_dim]`` per layer (values
    ``[kv_heads, capacity, value_dim]`` where the two differ, as in latent attention).

    Capacity grows by doubling, so appending a token is amortised O(1). The tensor manager
    (qllm/kernel/tensors.py) offloads and restores the buffers.
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        value_dim: int | None = None,
    ):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.states: list[list[torch.Tensor] | None] = [None] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` ([kv_heads, n, head_dim]) to ``layer``; return all keys and values so far."""
        n = k.shape[1]
        start = self.lengths[layer]
        end = start + n
        buf_k = self.keys[layer]
        if buf_k is None or buf_k.shape[1] < end:
            capacity = max(16, end, 2 * (0 if buf_k is None else buf_k.shape[1]))
            new_k = torch.empty(self.kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)
            new_v = torch.empty(self.kv_heads, capacity, self.value_dim, dtype=self.dtype, device=self.device)
            if buf_k is not None:
                new_k[:, :start] = buf_k[:, :start]
                new_v[:, :start] = self.values[layer][:, :start]
            self.keys[layer], self.values[layer] = new_k, new_v
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :end], self.values[layer][:, :end]

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
