"""Where batched ops run: a dedicated worker thread (default) or the event-loop thread.

One compute call at a time per device. In ``thread`` mode the event loop stays free while an op
computes (torch releases the GIL inside kernels), so socket I/O keeps flowing; in ``loop`` mode
the op runs inline, which saves the thread hand-off but blocks the loop for the op's duration.
``qllm bench kernel`` measures both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

MODES = ("thread", "loop")


class Compute:
    def __init__(self, mode: str = "thread"):
        if mode not in MODES:
            raise ValueError(f"compute mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qllm-compute")
            if mode == "thread"
            else None
        )

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._pool is None:
            result = fn(*args)
            await asyncio.sleep(0)  # let the loop serve I/O between ops
            return result
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
