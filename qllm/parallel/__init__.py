"""Expert parallel: a model's routed experts split across processes (ranks) on torch.distributed.

Rank 0 is the leader: it holds attention, routers, shared experts, dense layers, the head, every
request's KV and state, and runs the kernel. Each other rank (a worker) holds only its share of
the routed experts and answers rank 0's requests to compute one expert on given rows. Only rank 0
starts an exchange, and every message gets exactly one reply (an error reply included), so no
rank ever waits on another in a cycle.

- :mod:`qllm.parallel.placement`: which rank holds which expert.
- :mod:`qllm.parallel.shard`: a model keeps only its rank's experts' weights.
- :mod:`qllm.parallel.wire`: the message headers.
- :mod:`qllm.parallel.group`: rank 0's side: start the ranks, post and wait for remote experts.
- :mod:`qllm.parallel.worker`: a worker rank's loop.

docs/scaling.md is the user's page. This module imports nothing: ``qllm serve`` asks
:func:`torchrun_env` before torch is loaded.
"""

from __future__ import annotations

import os


def torchrun_env() -> tuple[int, int] | None:
    """``(rank, world size)`` when started by torchrun (or any ``env://`` launcher), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None
