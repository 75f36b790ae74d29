"""CUDA checks of the executor and engine (run on a GPU machine; prints one JSON object).

- executor vs transformers on the device: prefill logits and 16 greedy decode steps (fp32);
- the engine on the device with mixed LS/BE requests under each policy and a tiny memory budget
  (so the tensor manager offloads and restores on its side stream): tokens equal isolated runs;
- batch invariance probed on cuBLAS for tiny and small-random (fresh, not from the cache): the
  padding per op kind, or that none was found (then tokens equal isolated runs is not required).
"""

from __future__ import annotations

import asyncio
import json
import sys

import torch


def executor_vs_transformers(model) -> dict:
    from qllm.kernel.program import generation_steps
    from qllm.kernel.runtime.ops import Token
    from qllm.spec import SamplingParams

    prompt = model.tokenizer.encode("The experts of this layer run on the GPU")
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        ref = model.hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[
            0, len(prompt) :
        ].tolist()
        ref_logits = model.hf(ids).logits[0, -1]
    steps = generation_steps(model, prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    tokens, result, first_logits = [], None, None
    try:
        while True:
            item = steps.send(result)
            if isinstance(item, Token):
                tokens.append(item.token_id)
                result = None
            else:
                result = model.run([item])[0]
                if first_logits is None and item.kind.name == "HEAD":
                    first_logits = result[0]
    except StopIteration:
        pass
    return {
        "prefill_max_abs_diff": float((first_logits - ref_logits).abs().max()),
        "greedy_tokens_equal_generate": tokens == ref,
    }


async def engine_runs(model) -> dict:
    from qllm.engine import Engine

    prompts = [f"request {i}: tell me about mixtures of experts" for i in range(8)]
    out = {}
    async with Engine(model=model, policy="fcfs") as engine:
        isolated = [(await engine.generate(p, max_tokens=12, ignore_eos=True)).token_ids for p in prompts]
    for policy in ("fcfs", "qllm", "priority-aging"):
        async with Engine(model=model, policy=policy, memory_budget=1) as engine:
            handles = [
                engine.submit(p, max_tokens=12, ignore_eos=True, priority="ls" if i % 4 == 0 else "be")
                for i, p in enumerate(prompts)
            ]
            results = [await h.result() for h in handles]
            memory = engine.stats()["memory"]
        out[policy] = {
            "tokens_equal_isolated": [r.token_ids for r in results] == isolated,
            "statuses": sorted({r.status for r in results}),
            "offloads": memory["offloads"],
            "restores": memory["restores"],
            "resident_bytes_after": memory["resident_bytes"],
        }
    return out


async def kernel_bench() -> dict:
    """LS latency under BE load on small-random (see qllm/bench/kernel.py), on the device."""
    import argparse

    from qllm.bench import kernel
    from qllm.models import load_model

    model = load_model("small-random", device="cuda")
    gen = torch.Generator().manual_seed(0)
    be = [torch.randint(3, 500, (64,), generator=gen).tolist() for _ in range(16)]
    ls = [torch.randint(3, 500, (32,), generator=gen).tolist() for _ in range(8)]
    args = argparse.Namespace(prefill_chunk=128, be_tokens=64, ls_tokens=8, ls_start=0.3, ls_interval=0.2)
    out = {}
    for policy in ("fcfs", "qllm", "priority-aging"):
        try:
            out[policy] = await kernel._mixed(model, policy, be, ls, args)
        except Exception as exc:  # report and go on: this is a measurement, not a test
            out[policy] = {"error": repr(exc)}
    return out


def invariance_probe(name: str) -> dict:
    from qllm.models import invariance, load_model

    model = load_model(name, device="cuda", batch_invariant=False)
    model.batch_invariant = True
    return model.calibrate(invariance.ProbeCache(persist=False)).summary()


def main() -> int:
    from qllm.models import load_model

    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["batch_invariance"] = {name: invariance_probe(name) for name in ("tiny", "small-random")}
    model = load_model("tiny", device="cuda")
    report["executor"] = executor_vs_transformers(model)
    report["engine"] = asyncio.run(engine_runs(model))
    if "--bench" in sys.argv:
        report["kernel_bench_small_random"] = asyncio.run(kernel_bench())
    print(json.dumps(report))
    engine = report["engine"]
    ok = (
        report["executor"]["prefill_max_abs_diff"] < 1e-4
        and all(
            (v["tokens_equal_isolated"] or not report["batch_invariance"]["tiny"]["verified"])
            and v["resident_bytes_after"] == 0
            for v in engine.values()
        )
        # fcfs runs every request in every iteration: nothing is suspended, so nothing to offload
        and all(engine[p]["offloads"] > 0 and engine[p]["restores"] > 0 for p in ("qllm", "priority-aging"))
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
