"""Tensor manager: resident-memory accounting, the budget, offload/restore (compaction on CPU).

What the design promises (qllm/kernel/tensors.py): after each op, resident request state is within
the budget, or every request outside the running set is already offloaded (CUDA) or compacted to
its filled length (CPU), so what is left over is the running set's own state; and moving state
never changes a request's output.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import greedy
from kernel_helpers import mixed_load as helpers_mixed_load

from qllm.kernel.runtime.cache import KVCache
from qllm.kernel.tensors import TensorManager
from qllm.kernel.view import MemoryView
from qllm.models import load_model
from qllm.policies import load_policy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS, HEADS, DIM = 2, 2, 8
TOKEN_BYTES = 2 * LAYERS * HEADS * DIM * 4  # keys and values of one token, fp32


def filled_cache(tokens: int, device: str = "cpu", seed: int = 0) -> KVCache:
    cache = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device(device))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tokens):  # one token at a time, as decoding grows it: capacity doubles
        for layer in range(LAYERS):
            k = torch.randn(HEADS, 1, DIM, generator=gen).to(device)
            cache.append(layer, k, -k)
    return cache


def contents(cache: KVCache) -> list[torch.Tensor]:
    layers = range(cache.num_layers)
    return [t[:, : cache.lengths[i]].cpu().clone() for i in layers for t in (cache.keys[i], cache.values[i])]


def filled_bytes(cache: KVCache) -> int:
    """Bytes of the tokens a cache holds (its buffers' capacity may be larger)."""
    itemsize = torch.empty((), dtype=cache.dtype).element_size()
    return sum(cache.lengths) * 2 * cache.kv_heads * cache.head_dim * itemsize


def test_accounting_follows_register_and_release():
    tm = TensorManager("cpu", None)
    a, b = filled_cache(10), filled_cache(20)
    tm.register("a", a)
    tm.register("b", b)
    assert tm.resident_bytes == a.nbytes + b.nbytes > 0
    stats = tm.stats()
    assert (stats["requests"], stats["budget_bytes"], stats["offloaded_bytes"]) == (2, None, 0)
    tm.enforce(set())  # no budget: nothing moves
    assert tm.offloads == 0 and tm.resident_bytes == a.nbytes + b.nbytes
    tm.release("a")
    assert tm.resident_bytes == b.nbytes and tm.stats()["requests"] == 1
    assert a.nbytes == 0  # released buffers are dropped
    tm.release("a")  # releasing twice is harmless
    tm.release("b")
    assert tm.resident_bytes == 0 and tm.stats()["requests"] == 0


def test_policy_memory_view_reads_the_tensor_manager_when_asked():
    tm = TensorManager("cpu", 1 << 20)
    view = MemoryView.of(tm)
    assert (view.budget_bytes, view.resident_bytes, view.offloaded_bytes) == (1 << 20, 0, 0)
    a = filled_cache(10)
    tm.register("a", a)  # after the view was made: a policy holding it sees the current figure
    assert view.resident_bytes == tm.resident_bytes == a.nbytes > 0
    tm.release("a")
    assert view.resident_bytes == 0
    fixed = MemoryView(None, 5, 7)  # from numbers (tests, plugins): a snapshot
    assert (fixed.budget_bytes, fixed.resident_bytes, fixed.offloaded_bytes) == (None, 5, 7)
    assert "resident_bytes=5" in repr(fixed)


def hybrid_cache(tokens: int, device: str = "cpu", seed: int = 0) -> KVCache:
    """A cache whose layer 0 is linear attention (a convolution window and a recurrent state,
    fixed size) and layer 1 full attention (keys and values)."""
    cache = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device(device))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tokens):
        conv, recurrent = torch.randn(12, 4, generator=gen), torch.randn(HEADS, DIM, DIM, generator=gen)
        cache.update_state(0, [conv.to(device), recurrent.to(device)], 1)
        k = torch.randn(HEADS, 1, DIM, generator=gen).to(device)
        cache.append(1, k, -k)
    return cache


STATE_BYTES = (12 * 4 + HEADS * DIM * DIM) * 4


def test_recurrent_state_is_counted_kept_by_compaction_and_released():
    cache = hybrid_cache(5)
    assert cache.length() == cache.length(1) == 5
    tm = TensorManager("cpu", 1)
    tm.register("a", cache)
    assert tm.resident_bytes == STATE_BYTES + cache.keys[1].numel() * 4 * 2
    state = [t.clone() for t in cache.state(0)]

    tm.enforce(set())  # CPU: compaction trims the KV buffers; the fixed-size state stays as it is

    assert all(torch.equal(x, y) for x, y in zip(cache.state(0), state))
    assert tm.resident_bytes == STATE_BYTES + 5 * HEADS * DIM * 4 * 2
    tm.release("a")
    assert cache.state(0) is None and cache.nbytes == 0


def test_cpu_over_budget_compacts_the_coldest_suspended_caches_only():
    a, b, c = filled_cache(17, seed=1), filled_cache(17, seed=2), filled_cache(17, seed=3)
    # 17 tokens sit in buffers of capacity 32: compaction frees 15 tokens' worth of each.
    assert a.nbytes == 32 * TOKEN_BYTES and filled_bytes(a) == 17 * TOKEN_BYTES
    before = {name: contents(cache) for name, cache in (("a", a), ("b", b), ("c", c))}
    budget = 2 * 32 * TOKEN_BYTES + 17 * TOKEN_BYTES  # fits once the coldest is compacted
    tm = TensorManager("cpu", budget)
    for name, cache in (("a", a), ("b", b), ("c", c)):
        tm.register(name, cache)
    tm.before_run(["b"])  # b and then c are used more recently than a
    tm.before_run(["c"])

    tm.enforce({"c"})

    assert tm.resident_bytes <= budget
    assert a.nbytes == filled_bytes(a) and b.nbytes == 32 * TOKEN_BYTES  # only the coldest moved
    assert (tm.offloads, tm.restores, tm.over_budget_events) == (1, 0, 0)
    for name, cache in (("a", a), ("b", b), ("c", c)):
        assert all(torch.equal(x, y) for x, y in zip(contents(cache), before[name]))
    # A compacted cache keeps growing correctly.
    k = torch.ones(HEADS, 1, DIM)
    keys, _ = a.append(0, k, k)
    assert keys.shape[1] == 18 and torch.equal(keys[:, :17], before["a"][0]) and torch.equal(keys[:, 17:], k)


def test_cpu_budget_too_small_compacts_all_but_the_running_set_and_counts_it():
    a, b, c = filled_cache(17), filled_cache(17), filled_cache(17)
    tm = TensorManager("cpu", 1)
    for name, cache in (("a", a), ("b", b), ("c", c)):
        tm.register(name, cache)

    tm.enforce({"c"})

    assert a.nbytes == filled_bytes(a) and b.nbytes == filled_bytes(b) and c.nbytes == 32 * TOKEN_BYTES
    assert tm.resident_bytes == a.nbytes + b.nbytes + c.nbytes
    assert (tm.offloads, tm.over_budget_events) == (2, 1)
    tm.enforce({"c"})  # nothing left to compact: no new offloads; still the same over-budget spell
    assert (tm.offloads, tm.over_budget_events) == (2, 1)
    tm.budget_bytes = 1 << 30
    tm.enforce({"c"})  # back within budget ...
    tm.budget_bytes = 1
    tm.enforce({"c"})  # ... and over it again: a second event
    assert tm.over_budget_events == 2


# ---------------------------------------------------------------- on a live engine
BE_PROMPTS = [list(range(100, 130)), list(range(200, 226))]
LS_PROMPT = [7, 8, 9, 10, 11]


def check_enforce(tm: TensorManager, log: list) -> None:
    """Wrap ``tm.enforce`` to check the budget promise after every op."""
    enforce = tm.enforce

    def checked(running_ids: set[str]) -> None:
        enforce(running_ids)
        others = [e for rid, e in tm._entries.items() if rid not in running_ids]
        compact = all(e.offloaded or e.cache.nbytes <= filled_bytes(e.cache) for e in others)
        log.append((tm.resident_bytes, compact, tm.offloaded_bytes))
        assert tm.resident_bytes <= tm.budget_bytes or compact

    tm.enforce = checked


async def mixed_load(model, budget: int | None):
    """Two long BE requests, LS requests arriving at fixed ops (so both runs schedule alike)."""
    log: list = []

    def watch(engine) -> None:
        if budget is not None:
            check_enforce(engine._tensors, log)

    results, stats = await helpers_mixed_load(
        model, load_policy("qllm"), BE_PROMPTS, LS_PROMPT, on_start=watch, memory_budget=budget
    )
    return results, stats, log


async def test_cpu_budget_keeps_outputs_and_moves_counters(tiny):
    unlimited, free_stats, _ = await mixed_load(tiny, None)
    budget = 40 * 1024  # about two requests' buffers of the tiny model
    limited, stats, log = await mixed_load(tiny, budget)

    assert [r.token_ids for r in limited] == [r.token_ids for r in unlimited]
    assert all(r.status == "length" for r in limited)
    for r, prompt in zip(limited[:2], BE_PROMPTS):
        assert r.token_ids == greedy(tiny, prompt, 10, 8)
    assert sum(r.preemptions for r in limited) > 0  # BE was suspended: there was something to move
    memory = stats["memory"]
    assert memory["budget_bytes"] == budget and memory["offloads"] > 0
    assert memory["restores"] == 0  # on CPU compaction has nothing to bring back
    assert free_stats["memory"]["offloads"] == 0 and free_stats["memory"]["budget_bytes"] is None
    # Both sides of the promise occurred: within budget, and over it with only the running set loose.
    assert any(resident <= budget for resident, _, _ in log)
    assert any(resident > budget for resident, _, _ in log)
    assert (memory["resident_bytes"], memory["requests"]) == (0, 0)


@cuda
def test_cuda_offload_and_restore_roundtrip():
    a, b = filled_cache(40, "cuda", seed=1), filled_cache(25, "cuda", seed=2)
    before = contents(a)
    tm = TensorManager("cuda", 0)
    tm.register("a", a)
    tm.register("b", b)
    allocated = torch.cuda.memory_allocated()

    tm.enforce({"b"})  # a is not running: it goes to pinned host memory

    assert tm.is_offloaded("a") and not tm.is_offloaded("b")
    assert tm.resident_bytes == b.nbytes and tm.offloaded_bytes == 40 * TOKEN_BYTES
    assert all(t is None for t in a.keys)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() < allocated
    assert tm.stats()["offloaded_requests"] == 1 and tm.offloads == 1 and tm.over_budget_events == 1

    tm.before_run(["a"])  # back on the device; compute on the current stream must see the data
    sums = [t[:, : a.lengths[i]].sum() for i in range(LAYERS) for t in (a.keys[i], a.values[i])]
    assert not tm.is_offloaded("a") and tm.restores == 1 and tm.offloaded_bytes == 0
    assert a.keys[0].device.type == "cuda"
    assert [float(s) for s in sums] == [float(t.sum()) for t in before]
    assert all(torch.equal(x, y) for x, y in zip(contents(a), before))
    tm.release("a")
    tm.release("b")
    assert tm.resident_bytes == 0 and tm.offloaded_bytes == 0


@cuda
def test_cuda_offload_and_restore_roundtrip_of_recurrent_state():
    a, b = hybrid_cache(6, "cuda", seed=1), hybrid_cache(3, "cuda", seed=2)

    def kv(cache: KVCache) -> list[torch.Tensor]:  # the full-attention layer's filled keys and values
        return [t[:, : cache.lengths[1]].cpu().clone() for t in (cache.keys[1], cache.values[1])]

    state, filled = [t.cpu().clone() for t in a.state(0)], kv(a)
    tm = TensorManager("cuda", 0)
    tm.register("a", a)
    tm.register("b", b)

    tm.enforce({"b"})

    assert tm.is_offloaded("a") and a.state(0) is None and a.keys[1] is None
    assert tm.offloaded_bytes == STATE_BYTES + 6 * HEADS * DIM * 4 * 2
    tm.before_run(["a"])
    assert a.state(0)[1].device.type == "cuda" and a.length() == 6
    assert all(torch.equal(x.cpu(), y) for x, y in zip(a.state(0), state))
    assert all(torch.equal(x, y) for x, y in zip(kv(a), filled))
    tm.release("a")
    tm.release("b")
    assert tm.resident_bytes == 0 and tm.offloaded_bytes == 0


@cuda
def test_cuda_prefetch_restores_within_the_budget_and_orders_with_compute():
    a, b = filled_cache(40, "cuda", seed=3), filled_cache(40, "cuda", seed=4)
    want_a, want_b = contents(a), contents(b)
    tm = TensorManager("cuda", 0)
    tm.register("a", a)
    tm.register("b", b)
    tm.enforce(set())  # budget 0: both go to pinned host memory
    assert tm.is_offloaded("a") and tm.is_offloaded("b")

    tm.budget_bytes = 40 * TOKEN_BYTES  # room for one of them
    tm.prefetch(["b", "a"])  # the policy's order: b first; a does not fit any more
    assert not tm.is_offloaded("b") and tm.is_offloaded("a") and tm.prefetches == 1
    tm.before_run(["b"])  # waits on b's copy event before compute reads it
    assert all(torch.equal(x, y) for x, y in zip(contents(b), want_b))

    tm.budget_bytes = None
    tm.prefetch(["a"])
    tm.before_run(["a"])
    assert tm.prefetches == 2 and all(torch.equal(x, y) for x, y in zip(contents(a), want_a))


@cuda
async def test_cuda_engine_offloads_and_restores_with_unchanged_outputs():
    model = load_model("tiny", device="cuda")  # one copy on the device for both runs
    unlimited, free_stats, _ = await mixed_load(model, None)
    limited, stats, log = await mixed_load(model, 0)

    assert [r.token_ids for r in limited] == [r.token_ids for r in unlimited]
    assert all(r.status == "length" for r in limited)
    memory = stats["memory"]
    assert memory["device"].startswith("cuda")
    assert memory["offloads"] > 0 and memory["restores"] > 0
    assert max(offloaded for _, _, offloaded in log) > 0
    assert (memory["resident_bytes"], memory["offloaded_bytes"], memory["requests"]) == (0, 0, 0)
    assert free_stats["memory"]["offloads"] == 0
