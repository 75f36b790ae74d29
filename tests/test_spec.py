"""One request spec (qllm/spec.py): each field declared once, checked in one place, and reaching
every front end (Engine.submit, the native protocol through qllm.client, the OpenAI-compatible
HTTP API, ``qllm generate``) with no edit of theirs."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated

import httpx
import msgspec
import pytest
from msgspec import Meta
from serving import running_server

import qllm
import qllm.spec
from qllm import protocol as p
from qllm.cli import build_parser, main
from qllm.client import AsyncClient
from qllm.commands.generate import spec_of
from qllm.errors import InvalidRequest
from qllm.kernel.config import EngineConfig
from qllm.policies import DEFAULT_POLICY
from qllm.server import openai_api as api
from qllm.spec import PriorityClass, RequestSpec, SamplingParams, build_spec, checked, flat

BAD = [
    ("max_tokens", 0),
    ("max_tokens", 2.5),
    ("temperature", -1.0),
    ("temperature", math.inf),
    ("top_k", -1),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("stop", [""]),
    ("priority", "urgent"),
    ("rank", 2**63),
    ("rank", "high"),
    ("ttft_deadline", 0.0),
]


def test_defaults_and_the_flat_form():
    spec = build_spec({})
    assert spec == RequestSpec()
    assert spec.sampling == SamplingParams(max_tokens=64, temperature=0.0, top_k=0, top_p=1.0, stop=())
    assert (spec.priority, spec.rank, spec.ttft_deadline, spec.client) == (PriorityClass.BE, 0, None, "")
    given = {"max_tokens": 3, "stop": "x", "priority": "ls", "rank": -2, "seed": 2**64 - 1}
    spec = build_spec(given)
    assert spec.sampling.stop == ("x",)  # one string is one stop string
    assert flat(spec) == {**flat(RequestSpec()), **given, "stop": ("x",), "priority": "ls"}
    assert "client" not in flat(spec) and flat(spec, server_set=True)["client"] == ""
    assert checked(spec) == spec


@pytest.mark.parametrize(("field", "value"), BAD, ids=repr)
def test_each_bad_value_is_an_invalid_request_naming_the_field(field, value):
    with pytest.raises(InvalidRequest, match=field):
        build_spec({field: value})
    # A spec constructed directly skips msgspec's constraints; checked() applies them.
    constructed = build_spec({})
    try:
        if field in msgspec.structs.asdict(constructed.sampling):
            constructed = msgspec.structs.replace(
                constructed, sampling=msgspec.structs.replace(constructed.sampling, **{field: value})
            )
        else:
            constructed = msgspec.structs.replace(constructed, **{field: value})
    except ValueError:
        return  # __post_init__ refused it at construction
    with pytest.raises(InvalidRequest, match=field):
        checked(constructed)


def test_an_unknown_field_is_a_type_error_like_an_unknown_keyword():
    with pytest.raises(TypeError, match="max_token"):
        build_spec({"max_token": 3})


async def test_every_front_end_refuses_each_bad_value_naming_the_field(tiny):
    async with qllm.Engine(model=tiny) as engine:
        for field, value in BAD:
            with pytest.raises(InvalidRequest, match=field):
                engine.submit("hi", **{field: value})
            # The client checks before it sends: no connection is needed to see the error.
            with pytest.raises(InvalidRequest, match=field):
                await AsyncClient("/nonexistent/qllm.sock").submit("hi", **{field: value})
            for front_end in (_wire, _http):
                front_end(field, value)


def _wire(field, value) -> None:
    try:
        raw = msgspec.msgpack.encode({"type": "generate", "id": 7, "prompt": "hi", field: value})
    except OverflowError:
        return  # MessagePack cannot carry it
    with pytest.raises(p.ProtocolError, match=field) as wire:
        p.decode_client(raw)
    assert (wire.value.code, wire.value.request_id) == ("invalid_request", 7)


def _http(field, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        return  # JSON cannot carry it
    try:
        body = msgspec.json.encode({"prompt": "hi", field: value})
    except OverflowError:
        return
    with pytest.raises(api.ApiError, match=field) as http:
        req, fields = api.decode(body, api.CompletionRequest)
        api.to_spec(req, fields, None, 4096, "h1")
    assert http.value.status == 400


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--max-tokens", "0"], "max_tokens"),
        (["--temperature", "inf"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-k", "-1"], "top_k"),
        (["--seed", str(2**64)], "seed"),
        (["--stop", ""], "stop"),
        (["--rank", str(2**63)], "rank"),
        (["--ttft-deadline", "0"], "ttft_deadline"),
    ],
)
def test_the_cli_refuses_each_bad_value_naming_the_field(argv, field, capsys):
    assert main(["generate", "--model", "no-such-model", *argv, "hi"]) == 2  # before any model loads
    assert field in capsys.readouterr().err


def test_cli_options_are_the_spec_fields():
    args = build_parser().parse_args(["generate", "hi"])
    spec = spec_of(args)
    assert spec == build_spec({"priority": "ls"})  # the one CLI default: an interactive request is LS
    argv = [
        "--max-tokens",
        "5",
        "--stop",
        "a",
        "--stop",
        "b",
        "--ignore-eos",
        "--priority",
        "be",
        "--rank",
        "3",
    ]
    spec = spec_of(
        build_parser().parse_args(["generate", *argv, "--ttft-deadline", "0.5", "--seed", "9", "hi"])
    )
    assert spec == build_spec(
        dict(max_tokens=5, stop=["a", "b"], ignore_eos=True, priority="be", rank=3, ttft_deadline=0.5, seed=9)
    )


# A field added to the spec reaches every front end ---------------------------------------------


class TaggedSampling(SamplingParams, frozen=True, kw_only=True):
    new_field: Annotated[int, Meta(ge=0, description="a sampling field the test adds")] = 0


class TaggedSpec(RequestSpec, frozen=True, kw_only=True):
    tenant: Annotated[str, Meta(description="a request field the test adds")] = ""
    sampling: TaggedSampling = msgspec.field(default_factory=TaggedSampling)


@pytest.fixture
def tagged(monkeypatch):
    """The spec with two more fields, where every front end looks the spec type up."""
    monkeypatch.setattr(qllm.spec, "spec_type", lambda: TaggedSpec)


def _recording(engine) -> list:
    """The handles of the requests ``engine`` accepts from now on."""
    handles = []
    submit = engine.submit

    def recording_submit(*args, **kw):
        handles.append(submit(*args, **kw))
        return handles[-1]

    engine.submit = recording_submit
    return handles


def _assert_tagged(handles) -> None:
    (handle,) = handles
    assert isinstance(handle.spec, TaggedSpec)
    assert (handle.spec.sampling.new_field, handle.spec.tenant) == (7, "acme")
    assert handle.spec.sampling.max_tokens == 2


async def test_an_added_field_reaches_the_engine_through_the_native_socket(tagged, tmp_path, tiny):
    async with running_server(tmp_path, tiny) as running, AsyncClient(running.path) as client:
        handles = _recording(running.engine)
        result = await client.generate("hi", max_tokens=2, ignore_eos=True, new_field=7, tenant="acme")
        with pytest.raises(InvalidRequest, match="new_field"):  # checked like any other field
            await client.generate("hi", new_field=-1)
    assert result.status == "length"
    _assert_tagged(handles)
    assert handles[0].spec.client.startswith("c")  # the server names the client


async def test_an_added_field_reaches_the_engine_through_http(tagged, tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running:
        handles = _recording(running.engine)
        (unix,) = [a.removeprefix("unix:") for a in running.http if a.startswith("unix:")]
        transport = httpx.AsyncHTTPTransport(uds=unix)
        async with httpx.AsyncClient(transport=transport, base_url="http://qllm") as http:
            body = {"prompt": "hi", "max_tokens": 2, "new_field": 7, "tenant": "acme"}
            reply = await http.post("/v1/completions", json=body)
            bad = await http.post("/v1/completions", json={**body, "new_field": -1})
    assert reply.status_code == 200, reply.text
    assert bad.status_code == 400 and "new_field" in bad.json()["error"]["message"]
    _assert_tagged(handles)


async def test_an_added_field_reaches_the_engine_through_the_cli(tagged, tmp_path, tiny):
    args = build_parser().parse_args(["generate", "--new-field", "7", "--tenant", "acme", "hi"])
    assert (spec_of(args).sampling.new_field, spec_of(args).tenant) == (7, "acme")
    async with running_server(tmp_path, tiny) as running:
        handles = _recording(running.engine)
        argv = ["generate", "--socket", str(running.path), "--max-tokens", "2", "--new-field", "7",
                "--tenant", "acme", "--json", "hi"]  # fmt: skip
        assert await asyncio.to_thread(main, argv) == 0
    _assert_tagged(handles)


async def test_an_added_field_reaches_the_engine_through_submit(tagged, tiny):
    async with qllm.Engine(model=tiny) as engine:
        handle = engine.submit("hi", max_tokens=2, new_field=7, tenant="acme")
        await handle.result()
    _assert_tagged([handle])


async def test_the_wire_never_names_the_client(tmp_path, tiny):
    async with running_server(tmp_path, tiny) as running:
        handles = _recording(running.engine)
        reader, writer = await asyncio.open_unix_connection(str(running.path))
        writer.write(p.encode_frame(p.Hello()))
        frame = {"type": "generate", "id": 1, "prompt": "hi", "max_tokens": 1, "client": "someone-else"}
        payload = msgspec.msgpack.encode(frame)
        writer.write(len(payload).to_bytes(4, "big") + payload)
        await writer.drain()
        while not isinstance(p.decode_server(await p.read_frame(reader)), p.Final):
            pass
        writer.close()
        await writer.wait_closed()
    (handle,) = handles
    assert handle.spec.client != "someone-else" and handle.spec.client.startswith("c")


# One engine config ------------------------------------------------------------------------------


def test_engine_config_defaults_are_the_registry_defaults():
    assert EngineConfig().policy == DEFAULT_POLICY


async def test_engine_takes_a_config_and_settings_checked_in_one_place(tiny):
    async with qllm.Engine(model=tiny, config=EngineConfig(max_batch=2), prefill_chunk=4) as engine:
        kernel = engine.stats()["kernel"]
        assert (kernel["max_batch"], kernel["prefill_chunk"]) == (2, 4)
    for setting, value in [
        ("max_batch", 0),
        ("moe_granularity", "op"),
        ("compute", "gpu"),
        ("dtype", "int4"),
    ]:
        with pytest.raises(ValueError, match=setting):
            qllm.Engine(model=tiny, **{setting: value})
    with pytest.raises(ValueError, match="unknown field `max_bach`"):
        qllm.Engine(model=tiny, max_bach=2)
