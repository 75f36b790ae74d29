"""The external peer: transformers' own continuous batching, fed the same arrivals on the same model.

``model.init_continuous_batching()`` returns a ``ContinuousBatchingManager`` whose background
thread runs iteration-level continuous batching with a FIFO scheduler (requests already decoding
first, then waiting prompts, within a token budget per iteration): the scheduler class of TGI, the
paper's baseline. A feeder adds requests at their arrival times; a result handler per request
(called on our event loop) resolves its future when it finishes, with the per-token timestamps the
manager records. It shares the weights of the qllm model (it only swaps the attention
implementation of the Hugging Face modules, which qllm's executor does not use) and is never run
at the same time as a qllm engine.

Configuration, so that both do comparable work: at most ``max_batch`` requests per iteration,
``max_batch + prefill_chunk`` tokens per iteration (a full decode batch plus one prefill chunk),
greedy decoding, EOS disabled (every request generates exactly its ``output_len`` tokens), prefix
sharing off, and a paged KV cache sized for ``max_batch`` requests of the longest length.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qllm.bench.stats import Record
from qllm.bench.systems import OnDone, replay
from qllm.bench.trace import Item

if TYPE_CHECKING:
    from transformers.generation.continuous_batching.requests import GenerationOutput

    from qllm.models import MoEModel

PAGE_SIZE = 32


class TransformersCB:
    """transformers ``ContinuousBatchingManager`` as a system (see the module doc)."""

    kind = "peer"
    policy = None
    name = "transformers-cb"

    def __init__(self, model: MoEModel, *, max_batch: int, prefill_chunk: int, max_len: int):
        import transformers
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        self.version = transformers.__version__
        pages = math.ceil(max_len / PAGE_SIZE)
        self.config = {
            "max_requests_per_batch": max_batch,
            "max_batch_tokens": max_batch + prefill_chunk,
            "page_size": PAGE_SIZE,
            "num_blocks": math.ceil(1.25 * max_batch * pages) + 1,  # room above the FIFO safety margin
            "allow_block_sharing": False,
            "scheduler_type": "fifo",
            "seed": 0,
        }
        generation = GenerationConfig(
            do_sample=False, eos_token_id=-1, pad_token_id=model.hf.config.pad_token_id
        )
        self.manager = model.hf.init_continuous_batching(
            generation_config=generation, continuous_batching_config=ContinuousBatchingConfig(**self.config)
        )
        self.manager.start()
        self._ids = itertools.count()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "policy": None,
            "transformers": self.version,
            "config": self.config,
        }

    async def run(
        self,
        items: Sequence[Item],
        *,
        slo_s: float | None = None,
        timeout: float | None = None,
        on_done: OnDone = None,
    ) -> list[Record]:
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[GenerationOutput | None]] = {}

        async def submit(item: Item, t0: float):
            if not self.manager.is_running():
                raise RuntimeError("transformers continuous batching stopped (see its log)")
            rid = f"bench-{next(self._ids)}"
            future = futures[rid] = loop.create_future()

            def deliver(output: GenerationOutput) -> None:
                if output.is_finished() and not future.done():
                    future.set_result(output)

            self.manager.register_result_handler(rid, deliver)
            arrival = time.perf_counter()
            self.manager.add_request(
                list(item.prompt),
                request_id=rid,
                max_new_tokens=item.output_len,
                record_timestamps=True,
                eos_token_id=-1,
            )
            return rid, _record(future, item, arrival, t0)

        def cancel(rid: str) -> None:
            self.manager.cancel_request(rid)
            if not futures[rid].done():
                futures[rid].set_result(None)

        _, records = await replay(items, time.perf_counter, submit, cancel, timeout, on_done)
        return records

    async def close(self) -> None:
        await asyncio.to_thread(self.manager.stop, block=True, timeout=30)
        self.manager.destroy()


async def _record(
    future: asyncio.Future[GenerationOutput | None], item: Item, arrival: float, t0: float
) -> Record:
    out = await future
    ok = out is not None and out.error is None and len(out.generated_tokens) == item.output_len
    stamps = (out.timestamps or []) if out is not None else []
    started = out.lifespan[0] if out is not None and out.lifespan[0] > 0 else None
    return Record(
        cls=item.cls,
        arrival=arrival - t0,
        first_scheduled=None if started is None else started - t0,
        first_token=stamps[0] - t0 if stamps else None,
        finished=out.lifespan[1] - t0 if ok else None,
        prompt_tokens=item.prompt_len,
        output_tokens=len(out.generated_tokens) if out is not None else 0,
        inter_token_s=(stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None,
    )
