"""What one request asks for: how it samples (:class:`SamplingParams`) and how the kernel treats it
(:class:`RequestSpec`).

Each field is declared once, here: its type, default, constraints (``msgspec.Meta``, checked when
msgspec decodes or converts) and description. Every front end builds a spec from the request's
*flat* form, a mapping of field names to values (``max_tokens=64, priority="ls"``), through
:func:`build_spec`, and learns which fields exist from :func:`request_fields`; both look the spec
type up through :func:`spec_type` when they are called. So a field added to either struct reaches
``Engine.submit``, the native protocol, :mod:`qllm.client`, the OpenAI-compatible HTTP API and
``qllm generate`` with no other edit.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
import msgspec.inspect
from msgspec import Meta

from qllm.errors import InvalidRequest

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOPS = 16  # stop strings per request (OpenAI's API allows 4)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_TENANT_CHARS = 64  # a tenant's name: it becomes a stats key and a metric label
TENANT_PATTERN = r"^[\x21-\x7e]*\Z"  # printable ASCII, no spaces


class PriorityClass(enum.StrEnum):
    LS = "ls"  # latency-sensitive
    BE = "be"  # best-effort


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How one request picks tokens and when it stops. ``temperature == 0`` means greedy.

    Build it from untrusted values with :func:`build_spec` (or ``msgspec.convert``), which checks
    every constraint; the constructor runs only :meth:`__post_init__`'s checks."""

    max_tokens: Annotated[int, Meta(ge=1, description="most tokens to generate")] = 64
    temperature: Annotated[
        float,
        Meta(ge=0, description="sampling temperature (finite); 0 = greedy"),
    ] = 0.0
    top_k: Annotated[int, Meta(ge=0, description="sample from the k most likely tokens (0 = off)")] = 0
    top_p: Annotated[float, Meta(gt=0, le=1, description="nucleus sampling mass in (0, 1]; 1 = off")] = 1.0
    seed: Annotated[int | None, Meta(description="seed of the request's sampler (reproducible sampling)")] = (
        None
    )
    stop: Annotated[
        tuple[Annotated[str, Meta(max_length=MAX_STOP_CHARS)], ...],
        Meta(
            max_length=MAX_STOPS,
            description=f"stop string; the output is cut before the earliest (at most {MAX_STOPS}, "
            f"{MAX_STOP_CHARS} characters each)",
        ),
    ] = ()
    ignore_eos: Annotated[bool, Meta(description="keep generating past end-of-sequence tokens")] = False

    def __post_init__(self) -> None:
        # What Meta cannot say. msgspec turns these ValueErrors into ValidationErrors when it decodes.
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        # The constructor skips Meta: bound what each token's stop-string search costs here too.
        if len(self.stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(
                f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RequestSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How the kernel treats one request (its class, rank, deadline, who sent it) and how it
    samples (``sampling``). In the flat form the sampling fields sit beside the others."""

    priority: Annotated[
        PriorityClass, Meta(description="class: ls (latency-sensitive) or be (best-effort)")
    ] = PriorityClass.BE
    rank: Annotated[
        int, Meta(ge=INT64_MIN, le=INT64_MAX, description="priority within the class; lower runs first")
    ] = 0
    ttft_deadline: Annotated[
        Annotated[float, Meta(gt=0)] | None,
        Meta(description="seconds after arrival by which the first token is wanted (policies may use it)"),
    ] = None
    tpot_slo: Annotated[
        Annotated[float, Meta(gt=0)] | None,
        Meta(
            description="seconds per output token after the first that the client wants (policies may use it)"
        ),
    ] = None
    tenant: Annotated[
        str,
        Meta(
            max_length=MAX_TENANT_CHARS,
            pattern=TENANT_PATTERN,
            description=f"who the request is served for: tenants share the engine by weight (printable "
            f"ASCII without spaces, at most {MAX_TENANT_CHARS} characters; empty: the sender's default, "
            "docs/tenants.md)",
        ),
    ] = ""
    # Set by whoever accepts the request (the server names the connection), never by the request
    # itself: policies share a class's compute fairly between clients.
    client: Annotated[str, Meta(description="who sent the request")] = ""
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)


SERVER_SET = frozenset({"client"})
"""Fields a server sets itself and never takes from a request (:func:`request_fields` omits them)."""


def spec_type() -> type[RequestSpec]:
    """The spec type every front end builds, looked up when they are called (tests substitute a
    subclass with more fields here)."""
    return RequestSpec


def sampling_type(spec_cls: type[RequestSpec]) -> type[SamplingParams]:
    """The sampling struct a spec type holds (its ``sampling`` field's type)."""
    return _layout(spec_cls)[0]


@functools.cache
def _layout(
    spec_cls: type[RequestSpec],
) -> tuple[type[SamplingParams], tuple[msgspec.inspect.Field, ...], tuple[msgspec.inspect.Field, ...]]:
    """(sampling type, its fields, the spec's own fields but ``sampling``), in declaration order."""
    own = msgspec.inspect.type_info(spec_cls).fields
    (sampling,) = [f for f in own if f.name == "sampling"]
    sampling_cls = sampling.type.cls
    inner = msgspec.inspect.type_info(sampling_cls).fields
    return sampling_cls, inner, tuple(f for f in own if f.name != "sampling")


def all_fields(spec_cls: type[RequestSpec] | None = None) -> tuple[msgspec.inspect.Field, ...]:
    """Every field of the flat form: the sampling fields, then the spec's own."""
    _, inner, own = _layout(spec_cls or spec_type())
    return inner + own


def request_fields(spec_cls: type[RequestSpec] | None = None) -> tuple[msgspec.inspect.Field, ...]:
    """The fields a request may give, in the flat form's order (the server-set ones left out)."""
    return tuple(f for f in all_fields(spec_cls) if f.name not in SERVER_SET)


def build_spec(fields: Mapping[str, Any], spec_cls: type[RequestSpec] | None = None) -> RequestSpec:
    """A spec from its flat form (omitted fields take their defaults).

    A name that is no field is a TypeError, as an unexpected keyword argument is. A bad value is an
    :class:`~qllm.errors.InvalidRequest` whose message names the field. ``stop`` may be one string."""
    spec_cls = spec_cls or spec_type()
    sampling_cls, inner, own = _layout(spec_cls)
    unknown = fields.keys() - {f.name for f in inner} - {f.name for f in own}
    if unknown:
        names = ", ".join(f.name for f in inner + own)
        raise TypeError(f"unknown request field {sorted(unknown)[0]!r} (the fields are {names})")
    sampling = {f.name: fields[f.name] for f in inner if f.name in fields}
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    try:
        params = msgspec.convert(sampling, sampling_cls)
        # The spec's own fields, with the checked params in place (convert takes a struct as is).
        return msgspec.convert(
            {**{f.name: fields[f.name] for f in own if f.name in fields}, "sampling": params}, spec_cls
        )
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc)) from None


def flat(spec: RequestSpec, *, server_set: bool = False) -> dict[str, Any]:
    """The flat form of ``spec``, in field order (the server-set fields only with ``server_set``)."""
    fields = msgspec.structs.asdict(spec.sampling)
    for name, value in msgspec.structs.asdict(spec).items():
        if name != "sampling" and (server_set or name not in SERVER_SET):
            fields[name] = value
    return fields


def checked(spec: RequestSpec) -> RequestSpec:
    """``spec`` with every constraint checked (a spec constructed directly skips msgspec's);
    InvalidRequest as :func:`build_spec` raises it."""
    return build_spec(flat(spec, server_set=True), type(spec))
