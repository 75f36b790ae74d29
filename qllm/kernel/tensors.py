"""Tensor manager: owns the KV caches of live requests and keeps them within a memory budget.

On CUDA, when resident request state exceeds the budget, the caches of the coldest suspended
requests are copied to pinned host memory on a dedicated side stream and their device buffers
released; before such a request runs again its cache is copied back on the same stream, and the
compute stream waits on an event (so copies overlap with compute and never race it). Requests the
policy is likely to run soon are prefetched.

On CPU the device *is* host memory, so offloading means compacting: the cache buffers, which grow
by doubling, are trimmed to their filled length; this is the same interface and accounting.

With ``block_size`` the caches hold fixed-size blocks from one :class:`~qllm.kernel.runtime.cache.BlockPool`
instead of buffers (see qllm/kernel/runtime/cache.py), and the manager counts, offloads and restores blocks: on
CUDA an offloaded request's blocks are copied to pinned host memory block by block and freed once
the copies ran; restoring takes blocks from the pool (reused ones where requests ended). On
CPU nothing is over-allocated past a block per layer, so there is nothing to compact. Resident
memory counts the blocks requests hold; blocks the pool keeps for reuse are reported beside it
(``stats()["kv_blocks"]``) and released first when the two together pass the budget.

With blocks, the manager also keeps the :class:`~qllm.kernel.runtime.prefix.PrefixIndex` (unless
prefix caching is off, or the model's state is not per-token keys and values): an admitted
request takes its cached prefix from it, and publishes its own as its prefill chunks complete.
Shared blocks are counted once, in resident memory while a request holds them, and are never
offloaded with a request (only its private blocks are). Memory is freed in this order: the pool's
spare blocks, unreferenced prefixes only best-effort requests used, offloading suspended requests,
then unreferenced prefixes an LS request used. Without a budget, unreferenced prefixes are kept
up to the most resident bytes seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qllm.kernel.runtime.cache import BlockPool, KVCache
from qllm.kernel.runtime.prefix import Chain, PrefixIndex
from qllm.logging import get_logger

log = get_logger()


@dataclass(eq=False)
class _Entry:
    cache: KVCache
    last_used: int = 0
    offloaded: bool = False
    pinned_bytes: int = 0
    ready_event: torch.cuda.Event | None = None  # copy back to device finished
    host_k: list[torch.Tensor | None] = field(default_factory=list)
    host_v: list[torch.Tensor | None] = field(default_factory=list)
    host_states: list[list[torch.Tensor] | None] = field(default_factory=list)  # per layer: recurrent state
    host_key_blocks: list[list[torch.Tensor]] = field(
        default_factory=list
    )  # per layer: host copies of blocks
    host_value_blocks: list[list[torch.Tensor]] = field(default_factory=list)
    chain: Chain = field(default_factory=Chain)  # the cached prefix it holds


class TensorManager:
    """Resident-memory accounting, offload and prefetch of request KV caches."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        budget_bytes: int | None = None,
        *,
        block_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        prefix_chunk: int | None = None,
    ):
        """``prefix_chunk``: the engine's prefill chunk, to cache prefixes over the block pool
        (None: no prefix caching; it needs ``block_size``)."""
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.pool = None if block_size is None else BlockPool(block_size, dtype, self.device)
        self.prefix = (
            None if self.pool is None or prefix_chunk is None else PrefixIndex(self.pool, prefix_chunk)
        )
        self._peak_resident = 0  # the most resident bytes seen (no budget: the prefix cache's bound)
        self._entries: dict[str, _Entry] = {}
        self._clock = 0
        self.offloads = 0
        self.restores = 0
        self.over_budget_events = 0
        self.prefetches = 0
        self._over = False
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ---------------------------------------------------------------- registry
    def register(self, request_id: str, cache: KVCache) -> None:
        self._entries[request_id] = _Entry(cache, last_used=self._tick())

    def release(self, request_id: str) -> None:
        """Forget a finished or cancelled request and free its buffers."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            if self.prefix is not None:
                self.prefix.release(entry.chain)
            entry.cache.clear()
            entry.host_k.clear()
            entry.host_v.clear()
            entry.host_states.clear()
            entry.host_key_blocks.clear()
            entry.host_value_blocks.clear()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ---------------------------------------------------------------- prefix cache
    def attach_prefix(self, request_id: str, prompt: list[int], *, ls: bool) -> int:
        """Give registered request ``request_id`` the cached prefix of ``prompt`` it may reuse;
        returns its tokens (0 without prefix caching)."""
        if self.prefix is None:
            return 0
        entry = self._entries[request_id]
        entry.chain = self.prefix.attach(entry.cache, prompt, ls=ls)
        return self.prefix.tokens(entry.chain)

    def prefilled(self, request_id: str, prompt: list[int], start: int, end: int, *, ls: bool) -> None:
        """Request ``request_id``'s pass of prompt tokens ``start:end`` finished every layer: a
        full prefill chunk publishes the spans it completes."""
        entry = self._entries.get(request_id)
        if self.prefix is None or entry is None or entry.offloaded or end - start != self.prefix.chunk:
            return
        self.prefix.publish(entry.chain, entry.cache, prompt, end, ls=ls)

    def prefix_stats(self) -> dict[str, Any]:
        if self.prefix is None:
            return {"enabled": False}
        return self.prefix.snapshot()

    # ---------------------------------------------------------------- accounting
    @property
    def resident_bytes(self) -> int:
        """Request state on the device: caches not offloaded, and cached prefixes requests hold
        (each counted once)."""
        shared = 0 if self.prefix is None else self.prefix.referenced_bytes
        return shared + sum(e.cache.nbytes for e in self._entries.values() if not e.offloaded)

    @property
    def offloaded_bytes(self) -> int:
        return sum(e.pinned_bytes for e in self._entries.values() if e.offloaded)

    @property
    def held_bytes(self) -> int:
        """Device memory held for KV: resident caches, the blocks the pool keeps for reuse, and
        cached prefixes no request holds."""
        idle = 0 if self.prefix is None else self.prefix.idle_bytes
        return self.resident_bytes + idle + (0 if self.pool is None else self.pool.free_bytes)

    def stats(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "budget_bytes": self.budget_bytes,
            "resident_bytes": self.resident_bytes,
            "offloaded_bytes": self.offloaded_bytes,
            "requests": len(self._entries),
            "offloaded_requests": sum(e.offloaded for e in self._entries.values()),
            "offloads": self.offloads,
            "restores": self.restores,
            "prefetches": self.prefetches,
            "over_budget_events": self.over_budget_events,
            "kv_blocks": None if self.pool is None else self.pool.stats(),
        }

    def is_offloaded(self, request_id: str) -> bool:
        entry = self._entries.get(request_id)
        return bool(entry and entry.offloaded)

    # ---------------------------------------------------------------- scheduling hooks
    def before_run(self, batch_ids: list[str]) -> None:
        """Make the batch's caches resident (restoring any offloaded) and ordered before compute."""
        tick = self._tick()
        for rid in batch_ids:
            entry = self._entries.get(rid)
            if entry is None:
                continue
            entry.last_used = tick
            if entry.offloaded:
                self._restore(entry)
            if entry.ready_event is not None:
                torch.cuda.current_stream(self.device).wait_event(entry.ready_event)
                entry.ready_event = None

    @property
    def has_offloaded(self) -> bool:
        return any(e.offloaded for e in self._entries.values())

    def prefetch(self, request_ids: list[str]) -> None:
        """Start bringing back offloaded requests likely to run soon, as far as the budget allows
        (CUDA: asynchronously on the side stream; the compute stream waits on its event later)."""
        if self._stream is None:
            return
        headroom = None if self.budget_bytes is None else self.budget_bytes - self.resident_bytes
        for rid in request_ids:
            entry = self._entries.get(rid)
            if entry is None or not entry.offloaded:
                continue
            if headroom is not None:
                if entry.pinned_bytes > headroom:
                    break
                headroom -= entry.pinned_bytes
            self.prefetches += 1
            self._restore(entry)

    def enforce(self, running_ids: set[str]) -> None:
        """Free memory until what is held fits the budget, in order: the pool's spare blocks,
        unreferenced prefixes only BE requests used, the coldest requests outside ``running_ids``
        (offloaded), unreferenced prefixes LS requests used."""
        prefix, budget = self.prefix, self.budget_bytes
        resident = self.resident_bytes
        if budget is None:
            if prefix is not None:
                self._peak_resident = max(self._peak_resident, resident)
                excess = prefix.idle_bytes - self._peak_resident
                excess -= prefix.evict(excess, ls=False)
                prefix.evict(excess, ls=True)
            return
        idle = 0 if prefix is None else prefix.idle_bytes
        if self.pool is not None and resident + idle + self.pool.free_bytes > budget:
            self.pool.trim()  # the blocks kept for reuse go first: freeing them costs no request
        if prefix is not None and resident + idle > budget:
            idle -= prefix.evict(resident + idle - budget, ls=False)
        if resident + idle <= budget:
            self._trim_evicted()
            self._over = False
            return
        for rid, entry in sorted(self._entries.items(), key=lambda kv: kv[1].last_used):
            if resident + idle <= budget:
                break
            if entry.offloaded or rid in running_ids or entry.cache.nbytes == 0:
                continue
            before = entry.cache.nbytes
            self._offload(entry)
            resident -= before - (0 if entry.offloaded else entry.cache.nbytes)
        if prefix is not None and resident + idle > budget:
            idle -= prefix.evict(resident + idle - budget, ls=True)
        self._trim_evicted()
        over = resident + idle > budget
        if over and not self._over:  # log the transition, not every op spent over budget
            self.over_budget_events += 1
            log.info("memory_over_budget", resident_bytes=resident, budget_bytes=self.budget_bytes)
        self._over = over

    def _trim_evicted(self) -> None:
        """Over the budget, evicted prefixes' blocks are freed, not kept for reuse."""
        if self.pool is not None and self.held_bytes > self.budget_bytes:
            self.pool.trim()

    # ---------------------------------------------------------------- moves
    def _offload(self, entry: _Entry) -> None:
        cache = entry.cache
        if self._stream is None:  # CPU: compact in place, the state stays where it is
            if _compact(cache):  # an already compact cache is no new offload
                self.offloads += 1
            return
        self.offloads += 1
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)  # the cache's last writes must land before we read it
        entry.host_k, entry.host_v = [], []
        with torch.cuda.stream(self._stream):
            # Only its private blocks: the shared ones stay, for every request that reads them.
            shared = cache.shared
            entry.host_key_blocks = [
                [_to_host(b, self._stream) for b in bs[shared:]] for bs in cache.key_blocks
            ]
            entry.host_value_blocks = [
                [_to_host(b, self._stream) for b in bs[shared:]] for bs in cache.value_blocks
            ]
            for i in range(cache.num_layers):
                for src, dst in ((cache.keys, entry.host_k), (cache.values, entry.host_v)):
                    t = src[i]
                    if t is None:
                        dst.append(None)
                        continue
                    filled = t[:, : max(cache.lengths[i], 1)]
                    host = torch.empty(filled.shape, dtype=filled.dtype, pin_memory=True)
                    host.copy_(filled, non_blocking=True)
                    t.record_stream(self._stream)  # keep the device memory alive until the copy ran
                    dst.append(host)
            entry.host_states = [
                None if tensors is None else [_to_host(t, self._stream) for t in tensors]
                for tensors in cache.states
            ]
        host_states = [h for tensors in entry.host_states if tensors is not None for h in tensors]
        host_blocks = [h for bs in (*entry.host_key_blocks, *entry.host_value_blocks) for h in bs]
        entry.pinned_bytes = sum(
            h.nbytes for h in entry.host_k + entry.host_v + host_states + host_blocks if h is not None
        )
        # Not back to the pool: the side stream still reads them, and a block reused by the compute
        # stream would race the copy. The allocator frees them once it ran (_to_host recorded it).
        cache.release_blocks(reuse=False)
        cache.keys = [None] * cache.num_layers
        cache.values = [None] * cache.num_layers
        cache.states = [None] * cache.num_layers
        entry.offloaded = True

    def _restore(self, entry: _Entry) -> None:
        self.restores += 1
        entry.offloaded = False
        if self._stream is None:
            return
        cache = entry.cache
        if cache.paged:  # blocks from the pool may have been read by the compute stream until now
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            cache.keys = [None if h is None else h.to(self.device, non_blocking=True) for h in entry.host_k]
            cache.values = [None if h is None else h.to(self.device, non_blocking=True) for h in entry.host_v]
            cache.states = [
                None if tensors is None else [h.to(self.device, non_blocking=True) for h in tensors]
                for tensors in entry.host_states
            ]
            for host, blocks in (
                *zip(entry.host_key_blocks, cache.key_blocks),
                *zip(entry.host_value_blocks, cache.value_blocks),
            ):
                for h in host:
                    cache.take_block(blocks, h.shape[0], h.shape[2]).copy_(h, non_blocking=True)
            entry.ready_event = torch.cuda.Event()
            entry.ready_event.record(self._stream)
        states = [t for tensors in cache.states if tensors is not None for t in tensors]
        blocks = [b for bs in (*cache.key_blocks, *cache.value_blocks) for b in bs[cache.shared :]]
        for t in (*cache.keys, *cache.values, *states, *blocks):
            if t is not None:
                t.record_stream(torch.cuda.current_stream(self.device))
        entry.host_k, entry.host_v, entry.host_states = [], [], []
        entry.host_key_blocks, entry.host_value_blocks = [], []
        entry.pinned_bytes = 0


def _to_host(t: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
    """A pinned host copy of device tensor ``t``, queued on ``stream`` (which keeps ``t`` alive)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    t.record_stream(stream)
    return host


def _compact(cache: KVCache) -> bool:
    """Trim every buffer to its filled length; whether anything was trimmed."""
    trimmed = False
    for i in range(cache.num_layers):
        for bufs in (cache.keys, cache.values):
            t = bufs[i]
            if t is not None and t.shape[1] > cache.lengths[i]:
                bufs[i] = t[:, : cache.lengths[i]].clone()
                trimmed = True
    return trimmed
