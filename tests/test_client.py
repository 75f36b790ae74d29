"""The client library against a scripted fake server: framing, routing by id, errors, timeouts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from qllm import protocol as p
from qllm.client import (
    AsyncClient,
    Client,
    ConnectionLost,
    Forbidden,
    MaxTokensTooLarge,
    PromptTooLong,
    RequestTimeout,
    ServerError,
    ServerShutdown,
    TooManyRequests,
)
from qllm.errors import EngineClosed, InvalidRequest, QllmError, RequestFailed
from qllm.framing import PREFIX_BYTES, frame_id


class Peer:
    """The server side of one connection: what the client sent, and a way to reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.received: list[p.Message] = []

    async def recv(self) -> p.Message | None:
        payload = await p.read_frame(self.reader)
        if payload is None:
            return None
        message = p.decode_client(payload)
        self.received.append(message)
        return message

    def send(self, *messages: p.Message) -> None:
        for message in messages:
            self.writer.write(p.encode_frame(message))


Script = Callable[[Peer], Awaitable[None]]


async def welcome_then(script: Script) -> Script:
    async def run(peer: Peer) -> None:
        assert isinstance(await peer.recv(), p.Hello)
        peer.send(p.Welcome(model="fake", max_tokens=100))
        await script(peer)

    return run


@asynccontextmanager
async def fake_server(tmp_path, script: Script, *, hello: bool = True):
    """A Unix socket server running ``script`` for each connection (after the hello, if asked)."""
    peers: list[Peer] = []
    tasks: set[asyncio.Task] = set()
    run = await welcome_then(script) if hello else script

    async def handle(reader, writer):
        peer = Peer(reader, writer)
        peers.append(peer)
        try:
            await run(peer)
            await writer.drain()
        finally:
            writer.close()

    def accept(reader, writer):
        task = asyncio.get_running_loop().create_task(handle(reader, writer))
        tasks.add(task)

    path = tmp_path / "fake.sock"
    server = await asyncio.start_unix_server(accept, path=str(path))
    try:
        yield path, peers
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def final(rid: int, **kw) -> p.Final:
    return p.Final(id=rid, status=kw.pop("status", "length"), token_ids=kw.pop("token_ids", [1, 2]), **kw)


async def answer_generates(peer: Peer) -> None:
    """Reply to every generate with chunks (if streaming) and a final; to stats and health."""
    while (message := await peer.recv()) is not None:
        match message:
            case p.Generate(id=rid, stream=stream):
                if stream:
                    peer.send(p.Chunk(id=rid, index=0, token_ids=[1], text="a"))
                    peer.send(p.Chunk(id=rid, index=1, token_ids=[2], text="b"))
                peer.send(final(rid, text="ab"))
            case p.Stats(id=rid):
                peer.send(p.StatsReply(id=rid, stats={"live": 0}))
            case p.Health(id=rid):
                peer.send(p.HealthReply(id=rid, model="fake"))


async def test_hello_welcome_and_generate(tmp_path):
    async with fake_server(tmp_path, answer_generates) as (path, peers), AsyncClient(path) as client:
        assert client.welcome.model == "fake"
        result = await client.generate(
            [5, 6], max_tokens=7, priority="ls", rank=3, ttft_deadline=0.5, stop="x"
        )
        assert await client.stats() == {"live": 0}
        assert (await client.health()).model == "fake"
    hello, generate = peers[0].received[:2]
    assert hello == p.Hello(client="qllm.client")
    assert generate == p.Generate.build(
        id=generate.id, prompt=[5, 6], max_tokens=7, priority="ls", rank=3, ttft_deadline=0.5, stop=["x"]
    )
    assert result.text == "ab" and result.token_ids == [1, 2]


async def test_stream_yields_chunks_then_keeps_the_final(tmp_path):
    async with fake_server(tmp_path, answer_generates) as (path, _), AsyncClient(path) as client:
        async with client.stream("hi") as stream:
            texts = [chunk.text async for chunk in stream]
        assert texts == ["a", "b"]
        assert stream.result.text == "ab"
        # The shorthand: iterate the context directly.
        assert [c.index async for c in client.stream("hi")] == [0, 1]


async def test_replies_are_routed_by_id(tmp_path):
    async def reverse(peer: Peer) -> None:
        first, second = await peer.recv(), await peer.recv()
        peer.send(final(second.id, text="second"), p.Chunk(id=12345, index=0, token_ids=[0]))
        peer.send(final(first.id, text="first"))
        await peer.recv()

    async with fake_server(tmp_path, reverse) as (path, _), AsyncClient(path) as client:
        one, two = await asyncio.gather(client.generate("1"), client.generate("2"))
    assert (one.text, two.text) == ("first", "second")


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        ("invalid_request", InvalidRequest),
        ("prompt_too_long", PromptTooLong),
        ("max_tokens_too_large", MaxTokensTooLarge),
        ("engine_closed", EngineClosed),
        ("too_many_requests", TooManyRequests),
        ("duplicate_id", p.ProtocolError),
        ("no_such_code_yet", ServerError),
    ],
)
async def test_error_frames_raise_the_exception_of_their_code(tmp_path, code, exc):
    async def reject(peer: Peer) -> None:
        message = await peer.recv()
        peer.send(p.Error(id=message.id, code=code, message="because"))
        await peer.recv()

    async with fake_server(tmp_path, reject) as (path, _), AsyncClient(path) as client:
        with pytest.raises(exc, match="because") as info:
            await client.generate("x")
    assert info.value.code == code
    assert isinstance(info.value, QllmError)


@pytest.mark.parametrize(
    ("status", "error", "exc"),
    [("error", "request_failed", RequestFailed), ("aborted", "shutdown", ServerShutdown)],
)
async def test_a_final_with_an_error_raises_and_carries_the_result(tmp_path, status, error, exc):
    async def fail(peer: Peer) -> None:
        message = await peer.recv()
        peer.send(final(message.id, status=status, error=p.ErrorInfo(code=error, message="why")))
        await peer.recv()

    async with fake_server(tmp_path, fail) as (path, _), AsyncClient(path) as client:
        with pytest.raises(exc, match="why") as info:
            await client.generate("x")
    assert info.value.result.status == status
    assert info.value.result.token_ids == [1, 2]


async def test_a_cancel_this_client_asked_for_returns_the_aborted_result(tmp_path):
    async def cancellable(peer: Peer) -> None:
        generate = await peer.recv()
        cancel = await peer.recv()
        assert cancel == p.Cancel(id=generate.id)
        peer.send(final(generate.id, status="aborted", error=p.ErrorInfo(code="cancelled")))
        await peer.recv()

    async with fake_server(tmp_path, cancellable) as (path, _), AsyncClient(path) as client:
        request = await client.submit("x")
        await client.cancel(request.id)
        result = await request.final()
    assert result.status == "aborted"


async def test_leaving_a_stream_early_cancels_it(tmp_path):
    got_cancel = asyncio.Event()

    async def endless(peer: Peer) -> None:
        generate = await peer.recv()
        for i in range(3):
            peer.send(p.Chunk(id=generate.id, index=i, token_ids=[i]))
        assert await peer.recv() == p.Cancel(id=generate.id)
        got_cancel.set()
        peer.send(final(generate.id, status="aborted"))
        await peer.recv()

    async with fake_server(tmp_path, endless) as (path, _), AsyncClient(path) as client:
        async with client.stream("x") as stream:
            async for chunk in stream:
                if chunk.index == 1:
                    break
        await got_cancel.wait()


async def test_timeout_cancels_the_request_on_the_server(tmp_path):
    got_cancel = asyncio.Event()

    async def silent(peer: Peer) -> None:
        generate = await peer.recv()
        assert await peer.recv() == p.Cancel(id=generate.id)
        got_cancel.set()
        await peer.recv()

    async with fake_server(tmp_path, silent) as (path, _), AsyncClient(path, timeout=0.05) as client:
        with pytest.raises(RequestTimeout) as info:
            await client.generate("x")
        await got_cancel.wait()
    assert isinstance(info.value, TimeoutError)


async def test_server_closing_fails_pending_requests(tmp_path):
    async def hang_up(peer: Peer) -> None:
        await peer.recv()  # a generate, then the server goes away

    async with fake_server(tmp_path, hang_up) as (path, _), AsyncClient(path) as client:
        with pytest.raises(ConnectionLost):
            await client.generate("x")
        with pytest.raises(ConnectionLost):
            await client.health()


async def test_refused_at_connect(tmp_path):
    async def refuse(peer: Peer) -> None:
        peer.send(p.Error(code="forbidden", message="this user may not use the server"))

    async with fake_server(tmp_path, refuse, hello=False) as (path, _):
        with pytest.raises(Forbidden, match="may not") as info:
            await AsyncClient(path).connect()
    assert isinstance(info.value, PermissionError)


async def test_unsupported_protocol(tmp_path):
    async def old(peer: Peer) -> None:
        await peer.recv()
        peer.send(p.Error(code="unsupported_protocol", message="this server speaks 7"))

    async with fake_server(tmp_path, old, hello=False) as (path, _):
        with pytest.raises(p.UnsupportedProtocol, match="speaks 7"):
            await AsyncClient(path).connect()


async def test_no_server(tmp_path):
    with pytest.raises(ConnectionLost, match="qllm serve"):
        await AsyncClient(tmp_path / "absent.sock").connect()


def test_sync_client_against_the_fake(tmp_path):
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box = {}

    async def main():
        async with fake_server(tmp_path, answer_generates) as (path, _):
            box["path"], box["stop"] = path, asyncio.Event()
            started.set()
            await box["stop"].wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),))
    thread.start()
    started.wait()
    try:
        with Client(box["path"], timeout=10) as client:
            assert client.generate("x").text == "ab"
            with client.stream("x") as stream:
                assert [c.text for c in stream] == ["a", "b"]
            assert stream.result.status == "length"
            assert client.health().model == "fake"
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join()
        loop.close()


async def test_an_oversized_frame_fails_only_its_request(tmp_path):
    async def script(peer: Peer) -> None:
        first, second = await peer.recv(), await peer.recv()
        huge = p.Final(id=first.id, status="length", text="x" * (2 * p.MAX_FRAME_BYTES))
        peer.send(huge, final(second.id, text="fine"))
        await peer.recv()

    async with fake_server(tmp_path, script) as (path, _), AsyncClient(path) as client:
        one = await client.submit("one")
        two = await client.submit("two")
        with pytest.raises(p.FrameTooLarge, match="frame of 2097"):
            await one.final()
        assert (await two.final()).text == "fine"  # the connection survived


async def test_an_oversized_frame_without_a_readable_id_ends_the_connection(tmp_path):
    async def script(peer: Peer) -> None:
        await peer.recv()
        peer.writer.write((p.MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"\x92" + b"\x00" * p.MAX_FRAME_BYTES)
        await peer.recv()

    async with fake_server(tmp_path, script) as (path, _), AsyncClient(path) as client:
        with pytest.raises(p.FrameTooLarge):
            await client.generate("one")


def test_frame_id_reads_the_id_from_the_first_bytes_only():
    frame = p.encode_frame(p.Error(id=2**40, code="x", message="y" * 1000))
    assert frame_id(frame[4 : 4 + PREFIX_BYTES]) == 2**40
    assert frame_id(p.encode_frame(p.Error(code="x"))[4:]) is None  # id null: the connection's
    assert frame_id(b"\x81\xa4type") is None  # cut short
    assert frame_id(b"\x93\x01\x02\x03") is None  # not a map
