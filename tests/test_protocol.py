"""Wire protocol: frame layout, typed decoding, and that no input makes the decoder misbehave."""

from __future__ import annotations

import asyncio
import json
import random
import re
import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qllm import protocol as p


def payload(frame: bytes) -> bytes:
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    return frame[4:]


def test_frame_is_big_endian_length_then_msgpack_map():
    frame = p.encode_frame(p.Hello(client="x"))
    assert frame[:4] == len(frame[4:]).to_bytes(4, "big")
    assert msgspec.msgpack.decode(frame[4:]) == {
        "type": "hello",
        "protocol": p.PROTOCOL_VERSION,
        "client": "x",
    }


def documented_frames() -> list[tuple[str, bytes, object]]:
    """(direction, frame bytes, JSON) of each complete frame in docs/protocol.md's example."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    example = text.split("## Example exchange", 1)[1].split("```", 2)[1]
    frames = []
    for block in re.split(r"\n\s*\n", example):
        match = re.match(r"\s*([CS]): ([0-9a-f ]+)\|(.*?)\n\s*(\{.*)", block, re.S)
        if not match or "..." in match.group(3):
            continue
        direction, header, body, json_text = match.groups()
        data = bytes.fromhex(header + "".join(body.split()))
        shown, _ = json.JSONDecoder().raw_decode(
            re.sub(r"\s*\n\s*", "", json_text)
        )  # text after it: a comment
        frames.append((direction, data, shown))
    return frames


def test_the_documented_example_frames_decode_as_shown():
    frames = documented_frames()
    assert len(frames) >= 6
    for direction, data, shown in frames:
        assert data[:4] == len(data[4:]).to_bytes(4, "big")
        assert msgspec.msgpack.decode(data[4:]) == shown
        decode = p.decode_client if direction == "C" else p.decode_server
        message = decode(data[4:])
        if direction == "S":  # the server sends every field: the doc shows what we encode
            assert p.encode_frame(message) == data


CLIENT_MESSAGES = [
    p.Hello(),
    p.Generate.build(
        id=1, prompt="Hello", priority="ls", rank=-2, ttft_deadline=0.5, stream=True, stop=["\n"]
    ),
    p.Generate.build(
        id=2**63 - 1, prompt=[1, 2, 3], max_tokens=1, temperature=0.7, top_k=5, top_p=0.9, seed=7
    ),
    p.Cancel(id=3),
    p.Stats(id=4),
    p.Health(id=5),
]
SERVER_MESSAGES = [
    p.Welcome(model="tiny", policy="qllm", max_prompt_tokens=10, max_tokens=20),
    p.Chunk(id=1, index=0, token_ids=[5], text="a"),
    p.Final(
        id=1,
        status="length",
        token_ids=[5, 6],
        text="ab",
        priority="ls",
        usage=p.Usage(prompt_tokens=3, completion_tokens=2),
        timings=p.Timings(queue=0.001, ttft=0.01, turnaround=0.02),
        preemptions=1,
    ),
    p.Final(id=2, status="aborted", error=p.ErrorInfo(code="shutdown", message="bye")),
    p.Error(id=None, code="bad_frame", message="nope"),
    p.Error(id=9, code="prompt_too_long"),
    p.StatsReply(id=3, stats={"a": {"b": [1, 2.5, None]}}),
    p.HealthReply(id=4, status="draining", live=2),
]


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message):
    assert p.decode_client(payload(p.encode_frame(message))) == message


@pytest.mark.parametrize("message", SERVER_MESSAGES, ids=lambda m: type(m).__name__)
def test_server_messages_round_trip(message):
    assert p.decode_server(payload(p.encode_frame(message))) == message


def test_omitted_fields_take_their_defaults_and_unknown_fields_are_ignored():
    raw = msgspec.msgpack.encode({"type": "generate", "id": 1, "prompt": "x", "from_the_future": [1]})
    message = p.decode_client(raw)
    assert message == p.Generate(id=1, prompt="x")
    assert (message.spec.sampling.max_tokens, message.spec.priority, message.stream) == (64, "be", False)


@pytest.mark.parametrize(
    ("raw", "code", "request_id"),
    [
        (b"\xc1", "bad_frame", None),  # not MessagePack
        (msgspec.msgpack.encode([1, 2]), "bad_frame", None),  # not a map
        (msgspec.msgpack.encode({"type": "launch_missiles", "id": 1}), "invalid_request", 1),  # unknown tag
        (msgspec.msgpack.encode({"id": 1, "prompt": "x"}), "invalid_request", 1),  # no tag
        (msgspec.msgpack.encode({"type": "generate", "id": 7, "prompt": 3}), "invalid_request", 7),
        (
            msgspec.msgpack.encode({"type": "generate", "id": 7, "prompt": "x", "max_tokens": 0}),
            "invalid_request",
            7,
        ),
        (
            msgspec.msgpack.encode({"type": "generate", "id": 7, "prompt": "x", "priority": "vip"}),
            "invalid_request",
            7,
        ),
        (msgspec.msgpack.encode({"type": "generate", "id": -1, "prompt": "x"}), "bad_frame", None),
        (msgspec.msgpack.encode({"type": "cancel"}), "bad_frame", None),
        (b"\x91" * 100_000 + b"\x01", "bad_frame", None),  # nested deeper than any message
        (b"\x82\xa2id\x05\xa4type" + b"\x91" * 100_000 + b"\x01", "bad_frame", None),
        (b"\x82\xa2id\x05\xa4type\xa2\xff\xfe", "bad_frame", None),  # invalid UTF-8 tag
        (b"\x83\xa4type\xa8generate\xa2id\x05\xa6prompt\xa2\xff\xfe", "bad_frame", None),
    ],
)
def test_bad_payloads_are_typed_errors(raw, code, request_id):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_client(raw)
    assert info.value.code == code
    assert info.value.request_id == request_id
    assert str(info.value)


def test_validation_error_names_the_field():
    raw = msgspec.msgpack.encode({"type": "generate", "id": 7, "prompt": "x", "top_p": 2.0})
    with pytest.raises(p.ProtocolError, match=r"top_p"):
        p.decode_client(raw)


def test_no_pickle_or_arbitrary_objects():
    # msgpack extension types (how other codecs smuggle objects) are refused.
    raw = msgspec.msgpack.encode({"type": "stats", "id": msgspec.msgpack.Ext(1, b"\x80\x04")})
    with pytest.raises(p.ProtocolError):
        p.decode_client(raw)


# Fuzzing: the decoder's only outcomes are a message or a ProtocolError. ------------------------

_json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_field = st.sampled_from(
    ["type", "id", "prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "priority", "rank",
     "ttft_deadline", "stream", "protocol", "client"]
)  # fmt: skip
_tag = st.sampled_from(["hello", "generate", "cancel", "stats", "health", "final", "chunk", "", "x" * 300])
_almost_messages = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    _tag,
    st.dictionaries(_field, _json_like, max_size=5),
)


def _check_decode(raw: bytes) -> None:
    try:
        message = p.decode_client(raw)
    except p.ProtocolError as exc:
        assert exc.code in ("bad_frame", "invalid_request")
        assert (exc.request_id is None) == (exc.code == "bad_frame")
    else:
        assert isinstance(message, p.Hello | p.Generate | p.Cancel | p.Stats | p.Health)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(raw):
    _check_decode(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_almost_messages)
def test_fuzz_structured_messages(obj):
    _check_decode(msgspec.msgpack.encode(obj))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(CLIENT_MESSAGES), st.data())
def test_fuzz_truncated_and_corrupted_valid_frames(message, data):
    raw = bytearray(payload(p.encode_frame(message)))
    cut = data.draw(st.integers(0, len(raw)))
    _check_decode(bytes(raw[:cut]))
    if raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
        _check_decode(bytes(raw))


def test_fuzz_mutated_frames_seeded():
    # Thousands of cheap cases beside hypothesis's: byte flips, insertions, cuts and splices of
    # valid frames, from a fixed seed.
    rng = random.Random(1234)
    valid = [payload(p.encode_frame(m)) for m in CLIENT_MESSAGES]
    for _ in range(5000):
        raw = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            at = rng.randrange(len(raw) + 1)
            if op == 0 and raw:
                raw[min(at, len(raw) - 1)] = rng.randrange(256)
            elif op == 1:
                raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
            elif op == 2:
                del raw[at:]
            else:
                raw[at:at] = rng.choice(valid)
        _check_decode(bytes(raw))


# Framing over a stream. ------------------------------------------------------------------------


async def _frames(data: bytes, max_bytes: int = p.MAX_FRAME_BYTES) -> list[bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while (frame := await p.read_frame(reader, max_bytes)) is not None:
        out.append(frame)
    return out


async def test_read_frame_splits_a_stream_of_frames():
    frames = [p.encode_frame(m) for m in CLIENT_MESSAGES]
    assert await _frames(b"".join(frames)) == [f[4:] for f in frames]


async def test_read_frame_rejects_an_oversized_header_without_reading_it():
    with pytest.raises(p.FrameTooLarge) as info:
        await _frames((1025).to_bytes(4, "big") + b"x" * 10, max_bytes=1024)
    assert info.value.code == "frame_too_large"


@pytest.mark.parametrize("data", [b"\x00\x00", b"\x00\x00\x00\x05abc"])
async def test_read_frame_reports_a_truncated_frame(data):
    with pytest.raises(asyncio.IncompleteReadError):
        await _frames(data)
