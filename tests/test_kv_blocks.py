"""Keys and values in blocks from a shared pool (``Engine(kv_block_size=N)``, qllm/kernel/runtime/cache.py).

What a user relies on: the layout never changes a token (the preemption property tests in
tests/test_kernel_exactness.py also draw it); a request holds at most one partly filled block per
layer; blocks go back to the pool when a request ends and the next request reuses them, so a
server's KV memory stops growing once its load is steady; the tensor manager counts blocks, keeps
the pool's spare blocks within the budget, and moves blocks to the host and back on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import CASES

import qllm
from qllm.kernel.runtime.cache import BlockPool, KVCache, append_all
from qllm.kernel.tensors import TensorManager
from qllm.models import load_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS, HEADS, DIM = 2, 2, 8


def grow(caches: list[KVCache], lengths: list[int], seed: int = 0) -> None:
    """Append the same random chunks of keys (and their negations as values) to every cache."""
    gen = torch.Generator().manual_seed(seed)
    for n in lengths:
        for layer in range(LAYERS):
            k = torch.randn(HEADS, n, DIM, generator=gen)
            for cache in caches:
                cache.append(layer, k.to(cache.device), -k.to(cache.device))


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_blocks_hold_what_buffers_hold_chunk_by_chunk(block_size):
    pool = BlockPool(block_size, torch.float32, "cpu")
    buffers = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"))
    blocks = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), pool)
    gen = torch.Generator().manual_seed(1)
    for n in [5, 1, 1, 17, 2, 1, 40, 1]:  # prefill chunks and decode steps, across block boundaries
        for layer in range(LAYERS):
            k, v = torch.randn(HEADS, n, DIM, generator=gen), torch.randn(HEADS, n, DIM + 3, generator=gen)
            want = buffers.append(layer, k, v)
            got = blocks.append(layer, k, v)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
            assert got[0].shape == (HEADS, buffers.length(layer), DIM)
            assert got[1].shape == (HEADS, buffers.length(layer), DIM + 3)  # values may be wider
    length = buffers.length()
    per_layer = -(-length // block_size)  # blocks: the tokens rounded up to a block, no more
    assert blocks.blocks == 2 * LAYERS * per_layer == pool.in_use
    assert blocks.nbytes == pool.bytes_in_use == LAYERS * per_layer * block_size * HEADS * (2 * DIM + 3) * 4
    assert blocks.nbytes < buffers.nbytes  # buffers doubled past the 68 tokens, to 128


def test_append_all_fills_blocks_and_buffers_alike():
    pool = BlockPool(4, torch.float32, "cpu")
    caches = [KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), p) for p in (None, pool, pool)]
    grow(caches, [3, 6])
    k = torch.randn(HEADS, 3, DIM)
    filled = append_all(caches, 1, [k, k[:, :1], k], [-k, -k[:, :1], -k])
    assert torch.equal(filled[0][0], filled[2][0]) and torch.equal(filled[0][1], filled[2][1])
    assert filled[1][0].shape == (HEADS, 10, DIM) and torch.equal(filled[1][0][:, -1], k[:, 0])


def test_a_request_that_ends_gives_its_blocks_to_the_next():
    pool = BlockPool(8, torch.float32, "cpu")
    first = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), pool)
    grow([first], [20])
    held = first.blocks
    assert pool.in_use == held == 2 * LAYERS * 3 and pool.free == 0
    first.clear()
    assert (pool.in_use, pool.free, first.blocks, first.nbytes) == (0, held, 0, 0)
    second = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), pool)
    grow([second], [9])
    assert pool.allocated == held  # nothing new was made: the second request reused blocks
    assert (pool.in_use, pool.free) == (2 * LAYERS * 2, held - 2 * LAYERS * 2)
    assert pool.trim() == (held - 2 * LAYERS * 2) * 8 * HEADS * DIM * 4  # the spare blocks' bytes
    assert pool.free == 0 and pool.free_bytes == 0


def test_tensor_manager_counts_blocks_and_frees_spare_ones_over_the_budget():
    tm = TensorManager("cpu", None, block_size=4)
    a = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), tm.pool)
    b = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), tm.pool)
    tm.register("a", a)
    tm.register("b", b)
    grow([a, b], [6])
    block_bytes = 4 * HEADS * DIM * 4
    assert tm.resident_bytes == a.nbytes + b.nbytes == 2 * (2 * LAYERS * 2) * block_bytes
    assert tm.stats()["kv_blocks"]["blocks_in_use"] == 16

    tm.release("a")  # its blocks stay in the pool for the next request: resident counts b only
    assert tm.resident_bytes == b.nbytes and tm.stats()["kv_blocks"]["blocks_free"] == 8
    tm.enforce({"b"})  # no budget: the spare blocks stay
    assert tm.pool.free == 8
    tm.budget_bytes = b.nbytes + block_bytes  # b fits, b and the spare blocks do not
    tm.enforce({"b"})
    assert tm.pool.free == 0 and tm.resident_bytes == b.nbytes and tm.offloads == 0
    tm.release("b")
    assert tm.stats()["kv_blocks"]["blocks_in_use"] == 0


async def test_engine_outputs_are_the_same_with_blocks_and_the_pool_is_reused(tiny):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 2, 40], list(range(20, 45))]

    async def serve(block_size: int | None):
        async with qllm.Engine(model=tiny, policy="cohort", kv_block_size=block_size, prefill_chunk=4) as e:
            first = [
                await h.result()
                for h in [e.submit(p, max_tokens=9, ignore_eos=True, priority="be") for p in prompts]
                + [e.submit(prompts[0], max_tokens=5, ignore_eos=True, priority="ls")]
            ]
            allocated = e.stats()["memory"]["kv_blocks"] if block_size else None
            again = [await e.generate(p, max_tokens=9, ignore_eos=True) for p in prompts]
            return first, again, allocated, e.stats()["memory"]

    buffers, _, _, _ = await serve(None)
    blocks, again, allocated, memory = await serve(5)
    assert [r.token_ids for r in blocks] == [r.token_ids for r in buffers]
    assert [r.token_ids for r in again] == [r.token_ids for r in buffers[:3]]
    pool = memory["kv_blocks"]
    assert pool["block_size"] == 5 and pool["blocks_in_use"] == 0 and memory["resident_bytes"] == 0
    # The second round, one request at a time, ran on blocks the first round left: none were made.
    # Each is free, or holds a prefix the prefix cache keeps (the third prompt's first 20 tokens).
    assert (
        pool["blocks_allocated"]
        == allocated["blocks_allocated"]
        == pool["blocks_free"] + pool["blocks_cached"]
    )
    assert pool["blocks_cached"] == 2 * tiny.num_layers * 4 and pool["blocks_free"] > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_every_family_decodes_the_same_on_blocks_under_preemption_and_offload(case):
    """Each family's cache (per-head keys and values, latents of another width, per-layer head
    counts, recurrent state) on blocks of 3: an LS request arrives while best-effort requests
    decode, a tight budget moves state, and every request still gets the tokens it gets with
    buffers."""
    model = load_model((case.build(), None))

    async def serve(block_size: int | None):
        async with qllm.Engine(
            model=model, policy="cohort", kv_block_size=block_size, prefill_chunk=3, memory_budget=2048
        ) as engine:
            be = [
                engine.submit(p, max_tokens=4, ignore_eos=True, priority="be")
                for p in ([5, 6, 7, 8, 9, 10, 11], list(range(100, 120)))
            ]
            async for _ in be[0]:  # its first token: the best-effort requests are decoding
                break
            ls = engine.submit([40, 41], max_tokens=4, ignore_eos=True, priority="ls")
            return [(await h.result()).token_ids for h in (*be, ls)], engine.stats()["memory"]

    buffers, _ = await serve(None)
    blocks, memory = await serve(3)
    assert blocks == buffers
    assert memory["kv_blocks"]["blocks_in_use"] == 0 and memory["kv_blocks"]["blocks_allocated"] > 0


def test_block_size_must_be_positive(tiny):
    with pytest.raises(ValueError, match="kv_block_size"):
        qllm.Engine(model=tiny, kv_block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(0, torch.float32, "cpu")


@cuda
def test_cuda_blocks_offload_to_the_host_and_come_back():
    tm = TensorManager("cuda", 0, block_size=4)
    a = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cuda"), tm.pool)
    b = KVCache(LAYERS, HEADS, DIM, torch.float32, torch.device("cuda"), tm.pool)
    tm.register("a", a)
    tm.register("b", b)
    grow([a, b], [7, 1, 5])
    want = [t.cpu().clone() for layer in range(LAYERS) for t in a.kv(layer)]
    held = a.blocks

    tm.enforce({"b"})  # a is not running: its blocks go to pinned host memory

    assert tm.is_offloaded("a") and a.blocks == 0 and a.length() == 13
    assert tm.offloaded_bytes == held * 4 * HEADS * DIM * 4
    assert tm.stats()["kv_blocks"]["blocks_in_use"] == b.blocks
    tm.before_run(["a"])
    assert not tm.is_offloaded("a") and a.blocks == held
    got = [t.cpu() for layer in range(LAYERS) for t in a.kv(layer)]
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    tm.release("a")
    tm.release("b")
    assert tm.resident_bytes == 0 and tm.offloaded_bytes == 0
    assert tm.stats()["kv_blocks"]["blocks_in_use"] == 0
