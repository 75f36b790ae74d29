"""Where batched ops run: a dedicated worker thread (default) or the event-loop thread.

One compute call at a time per device. In ``thread`` mode the event loop stays free while an op
computes (torch releases the GIL inside kernels), so socket I/O keeps flowing; in ``loop`` mode
the op runs inline, which saves the thread hand-off but blocks the loop for the op's duration.
``qllm bench kernel`` measures both.

In ``thread`` mode the worker's OpenMP pool is the only one kept while the engine computes: the
event-loop thread drops its own before each hand-off and the worker drops its pool when the
engine goes idle (:mod:`qllm.kernel.openmp` says why).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from qllm.kernel.openmp import drop_pool

MODES = ("thread", "loop")
T = TypeVar("T")


class Compute:
    """Runs the engine's ops one at a time, on the worker thread or inline (``mode``)."""

    def __init__(self, mode: str = "thread"):
        if mode not in MODES:
            raise ValueError(f"compute mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qllm-compute")
            if mode == "thread"
            else None
        )

    async def __call__(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, computed where the mode says."""
        if self._pool is None:
            result = fn(*args)
            await asyncio.sleep(0)  # let the loop serve I/O between ops
            return result
        drop_pool()  # this thread's OpenMP helpers would make the worker's sleep between regions
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def idle(self) -> None:
        """Nothing to compute for now: the worker lets its OpenMP helpers go (after any call in
        flight), so that torch work elsewhere in the process has the machine to itself."""
        if self._pool is not None:
            self._pool.submit(drop_pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
