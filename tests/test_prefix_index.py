"""The prefix index under the tensor manager (qllm/kernel/runtime/prefix.py, docs/engine.md
"Prefix caching"), driven as the kernel drives it: lookup at admission, publication after each
full prefill chunk, release, eviction, pinning, and on CUDA offload of private blocks only.
"""

from __future__ import annotations

import pytest
import torch

from qllm.kernel.runtime.cache import KVCache
from qllm.kernel.runtime.prefix import reusable
from qllm.kernel.tensors import TensorManager

LAYERS, HEADS, DIM = 2, 2, 4
CPU = torch.device("cpu")


def manager(block: int = 2, chunk: int = 4, budget: int | None = None) -> TensorManager:
    return TensorManager("cpu", budget, block_size=block, prefix_chunk=chunk)


def prefill(tm: TensorManager, rid: str, prompt: list[int], *, ls: bool = False, chunk: int = 4) -> KVCache:
    """Admit ``rid`` and run its prefill as the kernel does: cached prefix, then chunk by chunk,
    each chunk's keys a function of its tokens and positions (so equal prefixes hold equal keys)."""
    cache = KVCache(LAYERS, HEADS, DIM, torch.float32, CPU, tm.pool)
    tm.register(rid, cache)
    done = tm.attach_prefix(rid, prompt, ls=ls)
    starts = range(done, len(prompt) - chunk, chunk)
    for start in [*starts, reusable(len(prompt), chunk)]:
        end = min(start + chunk, len(prompt))
        ids = torch.tensor(prompt[start:end], dtype=torch.float32)
        pos = torch.arange(start, end, dtype=torch.float32)
        for layer in range(LAYERS):
            k = (ids * 1000 + pos + layer).view(1, -1, 1).expand(HEADS, -1, DIM).contiguous()
            cache.append(layer, k, -k)
        tm.prefilled(rid, prompt, start, end, ls=ls)
    return cache


def probe(tm: TensorManager, prompt: list[int]) -> int:
    """Cached tokens a request with ``prompt`` would take now (it is admitted, then released)."""
    tm.register("probe", KVCache(LAYERS, HEADS, DIM, torch.float32, CPU, tm.pool))
    hit = tm.attach_prefix("probe", prompt, ls=False)
    tm.release("probe")
    return hit


def test_a_request_takes_the_longest_cached_prefix_before_its_last_chunk():
    tm = manager()
    first = prefill(tm, "a", list(range(1, 14)))  # chunks of 4 up to 12, then the last token
    assert tm.stats()["kv_blocks"]["blocks_cached"] == 3 * 2 * 2 * LAYERS  # 12 tokens: 3 spans

    second = prefill(tm, "b", [*range(1, 10), 99, 98])  # shares 9 tokens: 2 spans of 4
    # The same 12 tokens: it computes its last chunk (it needs the logits), then keeps the cached
    # copy of that chunk's keys and values, not a second one.
    third = prefill(tm, "c", list(range(1, 13)))
    fourth = prefill(tm, "d", [7, *range(2, 14)])  # differs at the first token

    stats = tm.prefix_stats()
    assert (stats["tokens_hit"], stats["hits"], stats["lookups"]) == (8 + 8, 2, 4)
    assert stats["tokens_looked_up"] == 13 + 11 + 12 + 13
    for cache in (second, third):
        for layer in range(LAYERS):  # what the cache reads is what the first request computed
            assert torch.equal(cache.kv(layer)[0][:, :8], first.kv(layer)[0][:, :8])
    assert second.shared == 4 and third.shared == fourth.shared == 6
    assert tm.stats()["kv_blocks"]["blocks_cached"] == 6 * 2 * 2 * LAYERS  # a's 3 spans and d's 3


def test_only_full_chunks_are_published_and_a_prefix_computed_twice_is_kept_once():
    tm = manager(block=2, chunk=4)
    prefill(tm, "a", [1, 2, 3])  # one partial chunk: nothing
    assert tm.prefix_stats()["entries"] == 0
    b = prefill(tm, "b", list(range(1, 10)))
    cached = tm.stats()["kv_blocks"]["blocks_cached"]
    in_use = tm.stats()["kv_blocks"]["blocks_in_use"]
    # Two requests computing the same chunks at once (neither found it cached when admitted).
    c = KVCache(LAYERS, HEADS, DIM, torch.float32, CPU, tm.pool)
    tm.register("c", c)
    for layer in range(LAYERS):
        c.append(layer, *b.kv(layer))  # the same values b computed
    tm.prefilled("c", list(range(1, 10)), 4, 8, ls=False)
    assert tm.stats()["kv_blocks"]["blocks_cached"] == cached  # no second copy
    assert c.shared == b.shared == 4
    assert tm.stats()["kv_blocks"]["blocks_in_use"] == in_use + c.blocks


def test_a_hash_collision_is_a_miss_and_stops_publishing(monkeypatch):
    from qllm.kernel.runtime import prefix

    monkeypatch.setattr(prefix, "hash", lambda _: 7, raising=False)  # every span collides
    tm = manager(block=2, chunk=4)
    first = prefill(tm, "a", list(range(1, 14)))
    assert tm.prefix_stats()["entries"] == 1 and first.shared == 2  # its second span collided
    assert probe(tm, [99, *range(2, 14)]) == 0  # same hash, other tokens: compared, a miss
    assert probe(tm, list(range(1, 14))) == 4
    tm.release("a")
    assert tm.stats()["kv_blocks"]["blocks_in_use"] == 0


def test_shared_blocks_count_once_and_nothing_is_held_after_release():
    tm = manager(block=2, chunk=4)
    prompt = list(range(1, 11))
    a = prefill(tm, "a", prompt)
    b = prefill(tm, "b", prompt)
    c = prefill(tm, "c", prompt)
    shared = tm.prefix.referenced_bytes
    assert shared > 0 and a.shared == b.shared == c.shared == 4
    assert tm.resident_bytes == shared + a.nbytes + b.nbytes + c.nbytes
    for rid in "abc":
        tm.release(rid)
    stats = tm.stats()["kv_blocks"]
    assert tm.resident_bytes == 0 and tm.prefix.referenced_bytes == 0
    assert stats["blocks_in_use"] == 0 and stats["bytes_cached"] == tm.prefix.cached_bytes == shared
    assert stats["blocks_cached"] + stats["blocks_free"] == stats["blocks_allocated"]


def test_eviction_frees_be_prefixes_tail_first_then_ls_ones_and_never_pinned_or_held_ones():
    tm = manager(block=2, chunk=4)
    prefill(tm, "ls", [50, 51, 52, 53, 54], ls=True)  # 1 span (4 tokens), an LS request's
    prefill(tm, "be", [*range(1, 13), 0])  # 3 spans, BE only
    prefill(tm, "pinned", [60, 61, 62, 63, 64])
    assert tm.prefix.pin([60, 61, 62, 63]) == 4
    prefill(tm, "held", [70, 71, 72, 73, 74])  # still running
    for rid in ("ls", "be", "pinned"):
        tm.release(rid)
    span = tm.prefix.cached_bytes // 6
    assert tm.prefix.idle_bytes == 5 * span

    assert tm.prefix.evict(1, ls=False) == span  # one span: the BE prefix's tail
    assert probe(tm, [*range(1, 13), 0]) == 8
    assert tm.prefix.evict(10 * span, ls=False) == 2 * span  # the rest of it; the LS prefix stays
    assert tm.prefix_stats()["evictions"] == 3
    assert tm.prefix.evict(10 * span, ls=True) == span  # now the LS one; pinned and held stay
    assert tm.prefix_stats()["entries"] == 2
    assert probe(tm, [60, 61, 62, 63, 64, 65]) == 4
    assert probe(tm, [70, 71, 72, 73, 74]) == 4


def test_a_budget_frees_be_prefixes_before_ls_ones():
    tm = manager(block=2, chunk=4, budget=1 << 30)
    prefill(tm, "ls", [50, 51, 52, 53, 54], ls=True)
    prefill(tm, "be", [40, 41, 42, 43, 44])
    tm.release("ls")
    tm.release("be")
    span = tm.prefix.cached_bytes // 2
    tm.budget_bytes = span  # room for one
    tm.enforce(set())
    assert probe(tm, [50, 51, 52, 53, 54]) == 4  # the LS prefix stayed
    assert probe(tm, [40, 41, 42, 43, 44]) == 0
    assert tm.stats()["kv_blocks"]["blocks_free"] == 0  # evicted blocks freed, not kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_moves_only_private_blocks_and_shared_ones_stay_for_others():
    tm = TensorManager("cuda", 0, block_size=2, prefix_chunk=4)
    prompt = list(range(1, 11))

    def admit(rid: str) -> KVCache:
        cache = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cuda"), tm.pool)
        tm.register(rid, cache)
        done = tm.attach_prefix(rid, prompt, ls=False)
        for start in range(done, 12, 4):
            end = min(start + 4, len(prompt))
            for layer in range(LAYERS):
                k = torch.full((HEADS, end - start, DIM), float(start + layer), device="cuda")
                cache.append(layer, k, -k)
            tm.prefilled(rid, prompt, start, end, ls=False)
        return cache

    a, b = admit("a"), admit("b")
    want = [t.cpu().clone() for layer in range(LAYERS) for t in a.kv(layer)]
    shared = tm.prefix.referenced_bytes
    private = a.nbytes
    assert a.shared == b.shared == 4 and shared > 0

    tm.enforce({"b"})  # a is not running: only its private blocks leave the device

    assert tm.is_offloaded("a") and a.shared == 4 and a.blocks == 0
    assert tm.offloaded_bytes == private and tm.prefix.referenced_bytes == shared
    tm.before_run(["a"])
    got = [t.cpu() for layer in range(LAYERS) for t in a.kv(layer)]
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    tm.release("a")
    tm.release("b")
    assert tm.resident_bytes == 0 and tm.stats()["kv_blocks"]["blocks_in_use"] == 0
