"""The settings of one engine, validated in one place: :class:`qllm.Engine` takes them (as a
config or keyword arguments) and ``qllm serve``'s ``[engine]`` section is this struct."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Arguments of :class:`qllm.Engine` (docs/engine.md)."""

    model: str = "tiny"  # preset name or model directory (Engine also takes a loaded model)
    # Name, or module:Class, options after it as :key=value (Engine also takes a Policy). The
    # policy registry's default (qllm.policies.DEFAULT_POLICY; a test keeps the two equal).
    policy: str = "cohort"
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str | None = None  # torch device; None: cpu, or wherever a loaded model already is
    memory_budget: Annotated[int, Meta(ge=0)] | None = None  # bytes of request state before offloading
    max_batch: Annotated[int, Meta(ge=1)] = 32
    prefill_chunk: Annotated[int, Meta(ge=1)] = 128
    # A MoE layer as one grouped op, stopped between experts when a request arrives ("layer"), or
    # one op per expert ("expert", the research system's granularity): docs/architecture.md.
    moe_granularity: Literal["layer", "expert"] = "layer"
    # Keys and values in blocks of this many tokens from a shared pool; None: growable buffers.
    kv_block_size: Annotated[int, Meta(ge=1)] | None = None
    threads: Annotated[int, Meta(ge=1)] | None = None  # torch intra-op threads; None: torch's default
    compute: Literal["thread", "loop"] = "thread"  # where ops run: a worker thread, or the event loop
    batch_invariant: bool = True  # a request's output does not depend on its batch mates


def engine_config(
    config: EngineConfig | None = None, settings: Mapping[str, Any] | None = None
) -> EngineConfig:
    """``config`` (or the defaults) with ``settings`` applied, every value checked: ValueError
    naming the setting (an unknown name included)."""
    base = msgspec.structs.asdict(config) if config is not None else {}
    try:
        return msgspec.convert({**base, **(settings or {})}, EngineConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid engine setting: {exc}") from None
