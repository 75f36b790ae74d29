"""An attention op gives each request what it gives that request alone, over random compositions.

Each composition draws 1-40 requests, each with its own cache of 0-300 past tokens and either one
new row (a decode step) or a prefill chunk of several rows, and runs them as one attention op of
a random layer. Every request's output rows, and the keys and values its cache holds afterwards,
must equal bit for bit those of the same request run alone through the same op; at 1 and 2
threads. The families cover grouped-query decode at the small-random preset's head shapes, sliding
windows with sinks (gpt_oss, MiMo-V2-Flash), chunked attention (Llama 4) and latent attention
(DeepSeek-V3).
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_families import CASES_BY_NAME, Case, torch_threads

from qllm.kernel.runtime.cache import KVCache
from qllm.kernel.runtime.ops import Op, OpKind
from qllm.models import load_model
from qllm.models.base import MoEModel

# small-random's attention (16 query heads of 64 over 4 KV heads) in a one-layer model.
WIDE = Case(
    "mixtral-wide",
    "mixtral",
    dict(
        hidden_size=1024,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_hidden_layers=1,
        intermediate_size=32,
        num_local_experts=2,
        num_experts_per_tok=1,
    ),
)
CASES = [WIDE, *(CASES_BY_NAME[name] for name in ("gpt_oss", "mimo_v2_flash", "llama4_text", "deepseek_v3"))]
COMPOSITIONS = 12


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.name)
def executor(request) -> MoEModel:
    return load_model((request.param.build(), None))


def buffer_shapes(model: MoEModel, layer: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, width) of the keys and of the values that ``layer`` caches."""
    cache = model.new_cache()
    x = torch.zeros(1, model.config.hidden_size, dtype=model.dtype)
    model.run([Op(OpKind.ATTENTION, layer, x, cache=cache, positions=torch.zeros(1, dtype=torch.long))])
    k, v = cache.keys[layer], cache.values[layer]
    return (k.shape[0], k.shape[2]), (v.shape[0], v.shape[2])


def cache_with(model: MoEModel, layer: int, keys: torch.Tensor, values: torch.Tensor) -> KVCache:
    cache = model.new_cache()
    if keys.shape[1]:
        cache.append(layer, keys, values)
    return cache


def composition(model: MoEModel, rng: random.Random, gen: torch.Generator) -> tuple[int, list[dict]]:
    """A layer and the requests of one attention op: past keys/values, new rows and positions."""
    layer = rng.randrange(model.num_layers)
    (hk, dk), (hv, dv) = buffer_shapes(model, layer)
    requests = []
    for _ in range(rng.randint(1, 40)):
        past = rng.choice([0, rng.randint(1, 16), rng.randint(1, 300)])
        rows = 1 if past and rng.random() < 0.6 else rng.randint(2, 12)
        requests.append(
            dict(
                keys=torch.randn(hk, past, dk, generator=gen, dtype=model.dtype),
                values=torch.randn(hv, past, dv, generator=gen, dtype=model.dtype),
                x=torch.randn(rows, model.config.hidden_size, generator=gen, dtype=model.dtype),
                positions=torch.arange(past, past + rows),
            )
        )
    return layer, requests


def run(model: MoEModel, layer: int, requests: list[dict]) -> list[tuple[torch.Tensor, KVCache]]:
    """The requests as one attention op, each on a fresh copy of its cache: (output, cache) each."""
    caches = [cache_with(model, layer, r["keys"], r["values"]) for r in requests]
    ops = [
        Op(OpKind.ATTENTION, layer, r["x"], cache=cache, positions=r["positions"])
        for r, cache in zip(requests, caches)
    ]
    return list(zip(model.run(ops), caches))


@pytest.mark.parametrize("threads", [1, 2], ids=lambda n: f"{n}threads")
def test_each_request_gets_its_solo_attention(executor, threads):
    rng = random.Random(threads)
    gen = torch.Generator().manual_seed(threads)
    shapes = set()
    with torch_threads(threads):
        for _ in range(COMPOSITIONS):
            layer, requests = composition(executor, rng, gen)
            together = run(executor, layer, requests)
            for request, (out, cache) in zip(requests, together):
                (solo, solo_cache), *_ = run(executor, layer, [request])
                assert torch.equal(out, solo), (
                    f"layer {layer}: {len(requests)} requests, {request['x'].shape[0]} rows"
                )
                filled = cache.length(layer)
                assert filled == solo_cache.length(layer)
                assert torch.equal(cache.keys[layer][:, :filled], solo_cache.keys[layer][:, :filled])
                assert torch.equal(cache.values[layer][:, :filled], solo_cache.values[layer][:, :filled])
                shapes.add((request["x"].shape[0] == 1, request["keys"].shape[1] > 0))
    # Decode steps, prefill chunks after a past and first chunks all met other requests.
    assert shapes == {(True, True), (False, True), (False, False)}
