"""The prefix index: keys and values of prompt prefixes, computed once and shared by the requests
whose prompts start with them (docs/engine.md, "Prefix caching").

The index holds *spans* of ``span`` tokens, ``lcm(block size, prefill chunk)``: a span is whole
blocks of the :class:`~qllm.kernel.runtime.cache.BlockPool` and whole prefill chunks. An entry is
one span of one prefix: every layer's key and value blocks for those tokens, identified by a
chained hash (its parent's key and its own tokens) and checked token by token on a hit. A request
takes the longest run of entries its prompt starts with, up to the last chunk boundary before its
last prompt token (:func:`reusable`), so that it computes every remaining chunk exactly as it would
alone: the same tokens at the same positions over the same keys, op for op.

Only spans that full prefill chunks computed are published, after the pass that computed them
finished every layer. Shared blocks are never written again (a request appends after them), so
an entry is read by any number of requests at once. Entries nobody references stay until memory is
needed; :meth:`PrefixIndex.evict` frees them least recently used first, the tail of a prefix before
its head, entries only best-effort requests used before those an LS request used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qllm.kernel.runtime.cache import BlockPool, KVCache


def reusable(prompt_tokens: int, chunk: int) -> int:
    """Most leading tokens of a prompt of ``prompt_tokens`` that a request may take from the index:
    the chunk boundary before its last token (whose logits it needs, so it computes that chunk)."""
    return (prompt_tokens - 1) // chunk * chunk


@dataclass(eq=False)
class PrefixEntry:
    """One span of a cached prefix: every layer's key and value blocks for its tokens."""

    key: int  # hash((parent's key, tokens)); 0 is the root's
    parent: PrefixEntry | None
    tokens: tuple[int, ...]
    key_blocks: list[list[torch.Tensor]]  # per layer
    value_blocks: list[list[torch.Tensor]]
    nbytes: int
    refs: int = 0  # requests holding it
    children: int = 0  # entries that extend it
    last_used: int = 0
    ls: bool = False  # an LS request used it
    pinned: bool = False

    @property
    def blocks(self) -> list[torch.Tensor]:
        return [b for bs in (*self.key_blocks, *self.value_blocks) for b in bs]


@dataclass
class PrefixStats:
    """What the index did: prompt tokens looked up and found, spans published and evicted."""

    lookups: int = 0  # admitted requests looked up
    hits: int = 0  # of them, those that took at least one span
    tokens_looked_up: int = 0  # their prompt tokens
    tokens_hit: int = 0  # prompt tokens taken from the index instead of computed
    published: int = 0  # spans added
    evictions: int = 0  # spans evicted
    evicted_bytes: int = 0


@dataclass(eq=False)
class Chain:
    """The entries one request holds, in prefix order, and whether it may publish further spans
    (not after a hash collision: its next span would have no parent in the index)."""

    entries: list[PrefixEntry] = field(default_factory=list)
    publishing: bool = True


class PrefixIndex:
    """Cached prefixes over one block pool (see the module doc)."""

    def __init__(self, pool: BlockPool, chunk: int):
        if chunk < 1:
            raise ValueError("prefill chunk must be >= 1 token")
        self.pool = pool
        self.chunk = chunk
        self.span = math.lcm(pool.block_size, chunk)
        self.blocks_per_span = self.span // pool.block_size
        self._entries: dict[int, PrefixEntry] = {}
        self._pins: list[tuple[int, ...]] = []
        self._clock = 0
        self.cached_bytes = 0  # every entry's blocks
        self.referenced_bytes = 0  # those of entries some request holds (each counted once)
        self.stats = PrefixStats()

    # ---------------------------------------------------------------- requests
    def attach(self, cache: KVCache, prompt: Sequence[int], *, ls: bool) -> Chain:
        """Give an empty ``cache`` the longest cached prefix of ``prompt`` it may reuse; the entries
        it now holds (the cache's first ``len(entries) * span`` tokens)."""
        chain = Chain(self._lookup(prompt, reusable(len(prompt), self.chunk) // self.span))
        tick = self._tick()
        for entry in chain.entries:
            self._hold(entry, tick, ls)
        if chain.entries:
            layers = range(cache.num_layers)
            cache.adopt(
                [[b for e in chain.entries for b in e.key_blocks[i]] for i in layers],
                [[b for e in chain.entries for b in e.value_blocks[i]] for i in layers],
            )
        stats = self.stats
        stats.lookups += 1
        stats.hits += bool(chain.entries)
        stats.tokens_looked_up += len(prompt)
        stats.tokens_hit += self.tokens(chain)
        return chain

    def tokens(self, chain: Chain) -> int:
        """Prompt tokens ``chain`` covers."""
        return len(chain.entries) * self.span

    def publish(
        self, chain: Chain, cache: KVCache, prompt: Sequence[int], computed: int, *, ls: bool
    ) -> None:
        """Add the spans of ``prompt`` up to ``computed`` that ``cache`` holds, after ``chain``:
        full prefill chunks whose pass finished every layer. A span already cached (another request
        computed the same prefix) replaces the cache's copy, bit for bit the same."""
        per = self.blocks_per_span
        while chain.publishing and (len(chain.entries) + 1) * self.span <= computed:
            i = len(chain.entries)
            parent = chain.entries[-1] if chain.entries else None
            tokens = tuple(prompt[i * self.span : (i + 1) * self.span])
            key = hash((0 if parent is None else parent.key, tokens))
            entry = self._entries.get(key)
            if entry is None:
                keys, values = cache.share(i * per, per)
                entry = PrefixEntry(key, parent, tokens, keys, values, 0)
                entry.nbytes = sum(b.nbytes for b in entry.blocks)
                head = tuple(prompt[: (i + 1) * self.span])
                entry.pinned = any(pin[: len(head)] == head for pin in self._pins)
                self.pool.cache(entry.blocks)
                self.cached_bytes += entry.nbytes
                self._entries[key] = entry
                if parent is not None:
                    parent.children += 1
                self.stats.published += 1
            elif entry.parent is parent and entry.tokens == tokens:
                self.pool.give(cache.replace(i * per, entry.key_blocks, entry.value_blocks))
            else:  # a hash collision: this request's prefix stays its own from here on
                chain.publishing = False
                return
            self._hold(entry, self._tick(), ls)
            chain.entries.append(entry)

    def release(self, chain: Chain) -> None:
        """A request lets go of its entries (they stay cached, unreferenced ones evictable)."""
        for entry in chain.entries:
            entry.refs -= 1
            if not entry.refs:
                self.referenced_bytes -= entry.nbytes
        chain.entries = []

    def _hold(self, entry: PrefixEntry, tick: int, ls: bool) -> None:
        if not entry.refs:
            self.referenced_bytes += entry.nbytes
        entry.refs += 1
        entry.last_used = tick
        entry.ls |= ls

    # ---------------------------------------------------------------- memory
    @property
    def idle_bytes(self) -> int:
        """Bytes of entries no request holds."""
        return self.cached_bytes - self.referenced_bytes

    def evict(self, nbytes: int, *, ls: bool) -> int:
        """Evict unreferenced, unpinned entries until ``nbytes`` are freed (their blocks go back
        to the pool): least recently used first, a prefix's tail before its head, and with ``ls``
        False only entries no LS request used. Returns the bytes freed."""
        freed = 0
        while freed < nbytes:
            leaves = [
                e
                for e in self._entries.values()
                if not e.refs and not e.children and not e.pinned and (ls or not e.ls)
            ]
            if not leaves:
                break
            victim = min(leaves, key=lambda e: e.last_used)
            del self._entries[victim.key]
            self.cached_bytes -= victim.nbytes
            if victim.parent is not None:
                victim.parent.children -= 1
            self.pool.uncache(victim.blocks)
            freed += victim.nbytes
            self.stats.evictions += 1
            self.stats.evicted_bytes += victim.nbytes
        return freed

    def pin(self, prompt: Sequence[int]) -> int:
        """Keep the cached spans of ``prompt``'s prefix, and those published later, from ever
        being evicted; returns the tokens that can be pinned (whole spans)."""
        pinned = len(prompt) // self.span * self.span
        if pinned == 0:
            return 0
        tokens = tuple(prompt[:pinned])
        if tokens not in self._pins:
            self._pins.append(tokens)
        for entry in self._lookup(tokens, pinned // self.span):
            entry.pinned = True
        return pinned

    # ---------------------------------------------------------------- lookup
    def _lookup(self, prompt: Sequence[int], spans: int) -> list[PrefixEntry]:
        found: list[PrefixEntry] = []
        parent: PrefixEntry | None = None
        for i in range(spans):
            tokens = tuple(prompt[i * self.span : (i + 1) * self.span])
            entry = self._entries.get(hash((0 if parent is None else parent.key, tokens)))
            if entry is None or entry.parent is not parent or entry.tokens != tokens:
                break
            found.append(entry)
            parent = entry
        return found

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def snapshot(self) -> dict[str, Any]:
        entries = self._entries.values()
        s = self.stats
        return {
            "enabled": True,
            "span_tokens": self.span,
            "entries": len(self._entries),
            "pinned_entries": sum(e.pinned for e in entries),
            "cached_bytes": self.cached_bytes,
            "referenced_bytes": self.referenced_bytes,
            "lookups": s.lookups,
            "hits": s.hits,
            "tokens_looked_up": s.tokens_looked_up,
            "tokens_hit": s.tokens_hit,
            "published": s.published,
            "evictions": s.evictions,
            "evicted_bytes": s.evicted_bytes,
        }
