"""The wire protocol between ``qllm serve`` and its clients (specified in docs/protocol.md).

A connection carries frames both ways: a 4-byte big-endian unsigned length, then that many bytes
of MessagePack encoding one message. Every message is a map whose ``type`` field names it; the
types below form one tagged union per direction, decoded strictly (a frame that does not decode to
one of them is a typed error, never an arbitrary object). New fields always get defaults and
unknown fields are ignored, so old peers keep working.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from qllm.errors import InvalidRequest, QllmError
from qllm.spec import RequestSpec, build_spec, flat, request_fields

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 20  # default limit on one frame's payload, both directions
MAX_MESSAGE_CHARS = 1024  # error messages are cut to this, so an echoed value cannot inflate a frame

RequestId = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Priority = Literal["ls", "be"]  # a result's class, as RequestSpec.priority names it
Status = Literal["stopped", "length", "aborted", "error"]


class Message(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of every wire message; the ``type`` field carries the tag."""


# Client to server ------------------------------------------------------------------------------


class Hello(Message, tag="hello"):
    """First frame of a connection: the protocol version the client speaks."""

    protocol: int = PROTOCOL_VERSION
    client: str = ""


Prompt = str | list[Annotated[int, Meta(ge=0)]]


class GenerateHead(Message, tag="generate"):
    """What the typed decoder reads of a generate frame; :func:`decode_client` reads the request
    spec's fields from the same map."""

    id: RequestId
    prompt: Prompt
    stream: bool = False
    chat: bool = False


class Generate(GenerateHead, tag="generate"):
    """Generate text for a prompt (text or token ids). Replies: chunks if ``stream``, then a final.

    On the wire the fields of ``spec`` (:class:`qllm.spec.RequestSpec` and its sampling params,
    ``max_tokens=``, ``priority=``, ...) sit flat in the same map, beside ``id`` and ``prompt``;
    the server-set ``client`` never travels."""

    spec: RequestSpec = msgspec.field(default_factory=RequestSpec)

    @classmethod
    def build(cls, **fields: Any) -> Generate:
        """A generate from its flat form, as on the wire: ``id``, ``prompt``, ``stream``, ``chat``
        and the spec's fields (built by :func:`qllm.spec.build_spec`)."""
        head = {name: fields.pop(name) for name in GenerateHead.__struct_fields__ if name in fields}
        return cls(**head, spec=build_spec(fields))


class Cancel(Message, tag="cancel"):
    """Cancel a live request of this connection; it still ends with its final frame (``aborted``)."""

    id: RequestId


class Stats(Message, tag="stats"):
    """Ask for the engine's statistics and metrics."""

    id: RequestId


class Health(Message, tag="health"):
    """Ask whether the server is serving."""

    id: RequestId


ClientMessage = Hello | Generate | Cancel | Stats | Health


# Server to client ------------------------------------------------------------------------------


class Welcome(Message, tag="welcome"):
    """Reply to :class:`Hello`: the server's version and the limits it enforces."""

    protocol: int = PROTOCOL_VERSION
    server: str = ""
    model: str = ""
    policy: str = ""
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_prompt_tokens: int = 0
    max_tokens: int = 0


class Chunk(Message, tag="chunk"):
    """New tokens of a streaming request; ``index`` is the position of the first of them."""

    id: RequestId
    index: int
    token_ids: list[int]
    text: str = ""


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(msgspec.Struct, kw_only=True):
    """Seconds measured by the server from the request's arrival; None where it never got there."""

    queue: float | None = None  # arrival to first scheduled op
    ttft: float | None = None  # arrival to first token
    turnaround: float = 0.0  # arrival to finish


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters, saying how much was cut."""
    if len(message) <= limit:
        return message
    return f"{message[: limit - 40]}... ({len(message) - limit + 40} more characters)"


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: str
    message: str = ""

    def __post_init__(self) -> None:
        self.message = bounded(self.message)


class Final(Message, tag="final"):
    """Last frame of an accepted request: status, every generated token, usage and timings."""

    id: RequestId
    status: Status
    token_ids: list[int] = []
    text: str = ""
    priority: Priority = "be"
    usage: Usage = msgspec.field(default_factory=Usage)
    timings: Timings = msgspec.field(default_factory=Timings)
    preemptions: int = 0
    error: ErrorInfo | None = None  # why it failed or was aborted by the server, if it was


class Error(Message, tag="error", kw_only=True):
    """A typed error. With an ``id`` it is that request's last frame (it was not accepted, or the
    frame could not be read); without one it concerns the connection."""

    id: RequestId | None = None
    code: str
    message: str = ""

    def __post_init__(self) -> None:
        self.message = bounded(self.message)


class StatsReply(Message, tag="stats_reply"):
    id: RequestId
    stats: dict[str, Any]


class HealthReply(Message, tag="health_reply"):
    id: RequestId
    status: Literal["ok", "draining", "unhealthy"] = "ok"  # unhealthy: expert parallel failed
    model: str = ""
    policy: str = ""
    live: int = 0
    progress: int = 0
    uptime: float = 0.0


ServerMessage = Welcome | Chunk | Final | Error | StatsReply | HealthReply


# Errors ----------------------------------------------------------------------------------------


class ProtocolError(QllmError):
    """A peer broke the protocol: a frame that does not decode, the wrong first message, ..."""

    code = "bad_frame"

    def __init__(self, message: str, *, code: str | None = None, request_id: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.request_id = request_id


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class UnsupportedProtocol(ProtocolError):
    code = "unsupported_protocol"


# Codes the server sends (besides those of qllm.errors); docs/protocol.md lists each.
BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
PROTOCOL_ERROR = "protocol_error"
UNSUPPORTED_PROTOCOL = "unsupported_protocol"
PROMPT_TOO_LONG = "prompt_too_long"
MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
DUPLICATE_ID = "duplicate_id"
TOO_MANY_REQUESTS = "too_many_requests"
FORBIDDEN = "forbidden"
SHUTDOWN = "shutdown"
TIMEOUT = "timeout"
TOO_MANY_CONNECTIONS = "too_many_connections"


# Framing and coding ----------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(Hello | GenerateHead | Cancel | Stats | Health)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)
_fields_decoder = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])


def _wire_form(message: Message) -> Message | dict[str, Any]:
    """What goes on the wire: a generate's spec fields flat in its map, in a fixed order."""
    if not isinstance(message, Generate):
        return message
    head = {"type": "generate", "id": message.id, "prompt": message.prompt}
    return {**head, **flat(message.spec), "stream": message.stream, "chat": message.chat}


def encode_frame(message: Message) -> bytes:
    """One frame: the 4-byte big-endian payload length, then the MessagePack payload."""
    buf = bytearray(HEADER.size)
    _encoder.encode_into(_wire_form(message), buf, HEADER.size)
    HEADER.pack_into(buf, 0, len(buf) - HEADER.size)
    return bytes(buf)


class _IdProbe(msgspec.Struct):
    id: RequestId | None = None


_probe_decoder = msgspec.msgpack.Decoder(_IdProbe)
# What decoding hostile bytes can raise besides msgspec's own errors: invalid UTF-8 in a string,
# nesting deeper than the decoder's recursion limit.
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _request_id_of(payload: bytes) -> int | None:
    """The ``id`` of a frame that failed typed decoding, if it is a map with a valid id."""
    try:
        return _probe_decoder.decode(payload).id
    except _UNDECODABLE:
        return None


def _decode(decoder: msgspec.msgpack.Decoder, payload: bytes) -> Any:
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        # Wrong types, missing fields, unknown tags and out-of-range values all land here; the
        # message names the field (for example "Expected `int` >= 1 - at `$.max_tokens`").
        # With a recoverable id the error belongs to that request (invalid_request), otherwise to
        # the connection (bad_frame).
        rid = _request_id_of(payload)
        code = "invalid_request" if rid is not None else BAD_FRAME
        raise ProtocolError(f"invalid message: {exc}", code=code, request_id=rid) from None
    except _UNDECODABLE as exc:
        raise ProtocolError(f"frame is not valid MessagePack: {exc}") from None


def decode_client(payload: bytes) -> ClientMessage:
    """Decode one client frame's payload; raises :class:`ProtocolError` (``bad_frame`` or
    ``invalid_request`` with the frame's ``id``)."""
    message = _decode(_client_decoder, payload)
    if not isinstance(message, GenerateHead):
        return message
    spec = _read_spec(payload, message.id)
    return Generate(id=message.id, prompt=message.prompt, stream=message.stream, chat=message.chat, spec=spec)


def _read_spec(payload: bytes, rid: int) -> RequestSpec:
    """The request spec of a generate frame: the spec's fields in its map (unknown keys are
    ignored, as in every message; server-set fields are never read from the wire)."""
    try:
        names = {f.name for f in request_fields()}
        raw = _fields_decoder.decode(payload)  # values stay undecoded bytes: the prompt is not read again
        return build_spec({k: msgspec.msgpack.decode(v) for k, v in raw.items() if k in names})
    except (InvalidRequest, msgspec.ValidationError, *_UNDECODABLE) as exc:
        raise ProtocolError(f"invalid message: {exc}", code="invalid_request", request_id=rid) from None


def decode_server(payload: bytes) -> ServerMessage:
    """Decode one server frame's payload; raises :class:`ProtocolError`."""
    return _decode(_server_decoder, payload)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes | None:
    """Read one frame's payload; None at a clean end of stream (between frames).

    Raises :class:`FrameTooLarge` when the header announces more than ``max_bytes`` (the payload
    is not read, so the connection cannot continue) and ``asyncio.IncompleteReadError`` when the
    stream ends inside a frame.
    """
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    (size,) = HEADER.unpack(header)
    if size > max_bytes:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {max_bytes} bytes")
    return await reader.readexactly(size)
