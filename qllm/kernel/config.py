"""The settings of one engine, validated in one place: :class:`qllm.Engine` takes them (as a
config or keyword arguments) and ``qllm serve``'s ``[engine]`` section is this struct."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta


class ClassSLO(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Service-level objectives of one priority class, in seconds (None: the default,
    :mod:`qllm.kernel.slo`). A request's own ``ttft_deadline`` and ``tpot_slo`` win."""

    ttft: Annotated[float, Meta(gt=0)] | None = None  # arrival to first token
    tpot: Annotated[float, Meta(gt=0)] | None = None  # time per output token after the first


TenantName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]*\Z")]


class TenantConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One tenant's share and quotas (docs/tenants.md)."""

    # Its share of a class's op time against the other backlogged tenants'.
    weight: Annotated[float, Meta(gt=0, le=1e6)] = 1.0
    max_live: Annotated[int, Meta(ge=1)] | None = None  # most requests waiting or running; None: no quota
    max_kv_bytes: Annotated[int, Meta(ge=1)] | None = None  # most resident KV bytes; None: no quota


class FairnessConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """How tenants share the engine (docs/tenants.md)."""

    default: TenantConfig = msgspec.field(
        default_factory=TenantConfig
    )  # weight and quotas of a tenant not configured by name
    # Tenants tracked at once; an idle one is forgotten first (least recently served), and a new
    # tenant's requests beyond it are served as the tenant "other".
    max_tenants: Annotated[int, Meta(ge=1, le=100_000)] = 64
    # Seconds of weighted op time a tenant may run ahead of the least-served backlogged tenant of
    # a class before its best-effort requests wait (the grain of the fair share).
    quantum: Annotated[float, Meta(gt=0, le=60)] = 0.05
    # A request over its tenant's quota waits (is not admitted) or is refused (TenantOverQuota).
    quota_action: Literal["wait", "reject"] = "wait"


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
    # Share the keys and values of cached prompt prefixes between requests (with kv_block_size,
    # where the model's state is per-token keys and values): docs/engine.md, "Prefix caching".
    prefix_cache: bool = True
    threads: Annotated[int, Meta(ge=1)] | None = None  # torch intra-op threads; None: torch's default
    compute: Literal["thread", "loop"] = "thread"  # where ops run: a worker thread, or the event loop
    batch_invariant: bool = True  # a request's output does not depend on its batch mates
    # Per-class SLOs (``[engine.slo.ls]`` in the config file, ``--slo ls:ttft=0.5,tpot=0.1``);
    # a class or figure left out gets its default from the single-request decode step.
    slo: dict[Literal["ls", "be"], ClassSLO] = msgspec.field(default_factory=dict)
    # Tenants by name: weight and quotas (``[engine.tenants.NAME]``, ``--tenant NAME=WEIGHT``).
    tenants: dict[TenantName, TenantConfig] = msgspec.field(default_factory=dict)
    fairness: FairnessConfig = msgspec.field(default_factory=FairnessConfig)  # ``[engine.fairness]``
    # Ranks (processes) the routed experts are split across; 1: one process. docs/scaling.md.
    expert_parallel: Annotated[int, Meta(ge=1, le=256)] = 1
    # How experts are dealt to ranks: contiguous runs, or expert e on rank e % ranks.
    expert_placement: Literal["contiguous", "round-robin"] = "contiguous"
    # Seconds a rank may take to answer rank 0 before expert parallel counts as failed.
    expert_timeout: Annotated[float, Meta(gt=0, le=86400)] = 30.0
    # Remote expert calls a MoE op posts ahead of the expert it computes.
    expert_window: Annotated[int, Meta(ge=1, le=256)] = 4


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


def parse_slo(text: str) -> dict[str, dict[str, float]]:
    """``ls:ttft=0.5,tpot=0.1;be:tpot=1`` -> ``{"ls": {"ttft": 0.5, "tpot": 0.1}, "be": {"tpot": 1.0}}``
    (seconds; the form of ``--slo``). ValueError saying what is wrong."""
    out: dict[str, dict[str, float]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        cls, sep, figures = part.partition(":")
        if not sep or cls.strip() not in ("ls", "be"):
            raise ValueError(f"--slo {part!r}: expected CLASS:FIGURE=SECONDS,... with CLASS ls or be")
        for item in filter(None, (f.strip() for f in figures.split(","))):
            name, eq, value = item.partition("=")
            if not eq or name.strip() not in ("ttft", "tpot"):
                raise ValueError(f"--slo {item!r}: expected ttft=SECONDS or tpot=SECONDS")
            try:
                out.setdefault(cls.strip(), {})[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--slo {item!r}: {value!r} is not a number of seconds") from None
    return out


def parse_tenant(text: str) -> tuple[str, dict[str, float | int]]:
    """``team-a=2:live=8:kv=1000000`` -> ``("team-a", {"weight": 2.0, "max_live": 8,
    "max_kv_bytes": 1000000})`` (the form of ``--tenant``). ValueError saying what is wrong."""
    name, eq, rest = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"--tenant {text!r}: expected NAME=WEIGHT[:live=N][:kv=BYTES]")
    weight, *quotas = rest.split(":")
    out: dict[str, float | int] = {}
    try:
        out["weight"] = float(weight)
    except ValueError:
        raise ValueError(f"--tenant {text!r}: the weight {weight!r} is not a number") from None
    for item in quotas:
        key, eq, value = item.partition("=")
        field = {"live": "max_live", "kv": "max_kv_bytes"}.get(key.strip())
        if not eq or field is None:
            raise ValueError(f"--tenant {text!r}: {item!r} is not live=N or kv=BYTES")
        try:
            out[field] = int(value)
        except ValueError:
            raise ValueError(f"--tenant {text!r}: {value!r} is not an integer") from None
    return name.strip(), out
