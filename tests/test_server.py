"""End to end through the real socket: correctness under concurrency, streaming, cancel, bad input."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import recv_frames, running_server, server_thread

import qllm
from qllm import protocol as p
from qllm.client import AsyncClient, Client, Forbidden, MaxTokensTooLarge, PromptTooLong
from qllm.errors import InvalidRequest
from qllm.server import app as server_module
from qllm.server.listener import Credentials

PROMPTS = [
    "Hello there",
    "The quick brown fox",
    "Once upon a time",
    "A B C D E F G",
    "qllm serves mixture of experts models",
    "1 2 3 4 5 6 7 8 9 10",
    "def main():",
    "Le petit prince",
]


def make_requests(n: int) -> list[dict]:
    """``n`` requests mixing LS and BE, ranks, lengths, greedy and seeded sampling."""
    out = []
    for i in range(n):
        kw = {
            "max_tokens": 2 + i % 5,
            "priority": "ls" if i % 3 == 0 else "be",
            "rank": i % 2,
            "ignore_eos": True,
        }
        if i % 4 == 1:
            kw |= {"temperature": 0.8, "top_k": 20, "seed": i}
        out.append({"prompt": PROMPTS[i % len(PROMPTS)] + f" #{i}", **kw})
    return out


async def wait_idle(client: AsyncClient) -> dict:
    """Stats once the engine holds no live request (the server frees a request right after its
    final frame, so this takes a few round trips at most)."""
    for _ in range(1000):
        stats = await client.stats()
        if not any(stats["live"].values()) and stats["memory"]["resident_bytes"] == 0:
            return stats
        await asyncio.sleep(0.005)
    raise AssertionError(f"the engine kept live requests: {stats['live']} {stats['memory']}")


async def test_64_concurrent_clients_get_the_in_process_engines_tokens(tmp_path, tiny):
    requests = make_requests(64)
    async with qllm.Engine(model=tiny) as engine:
        expected = await asyncio.gather(*(engine.generate(**r) for r in requests))

    async def one(path, request):
        async with AsyncClient(path, timeout=120) as client:
            return await client.generate(**request)

    async with running_server(tmp_path, tiny) as running:
        results = await asyncio.gather(*(one(running.path, r) for r in requests))
        async with AsyncClient(running.path) as client:
            stats = await wait_idle(client)
    for request, want, got in zip(requests, expected, results):
        assert got.status == want.status == "length"
        assert got.token_ids == want.token_ids, request
        assert got.text == want.text
        assert got.priority == request["priority"]
        assert got.usage.completion_tokens == request["max_tokens"]
        assert got.usage.prompt_tokens == want.prompt_tokens
        assert got.timings.ttft is not None and got.timings.turnaround >= got.timings.ttft
    done = {c: sum(m["requests"].values()) for c, m in stats["metrics"].items()}
    assert done == {"ls": 22, "be": 42}
    assert stats["server"]["connections_accepted"] == 65


async def test_many_requests_multiplexed_on_one_connection(tmp_path, tiny):
    requests = make_requests(16)
    async with qllm.Engine(model=tiny) as engine:
        expected = [await engine.generate(**r) for r in requests]
    async with running_server(tmp_path, tiny) as running, AsyncClient(running.path) as client:
        results = await asyncio.gather(*(client.generate(**r) for r in requests))
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    assert [r.id for r in results] == sorted({r.id for r in results})  # one id per request


async def test_streaming_delivers_every_token_in_order_before_the_final(tmp_path, tiny):
    async with running_server(tmp_path, tiny) as running, AsyncClient(running.path) as client:
        async with client.stream("Once upon a time", max_tokens=12, ignore_eos=True, priority="ls") as stream:
            chunks = [chunk async for chunk in stream]
        final = stream.result
    assert final.status == "length"
    assert [c.index for c in chunks] == list(range(12))
    assert [t for c in chunks for t in c.token_ids] == final.token_ids
    assert all(c.id == final.id for c in chunks)


async def test_cancel_mid_stream_ends_with_an_aborted_final_and_frees_the_request(tmp_path, tiny):
    async with running_server(tmp_path, tiny) as running, AsyncClient(running.path) as client:
        async with client.stream("A long story", max_tokens=4000, ignore_eos=True) as stream:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    await stream.cancel()
        final = stream.result
        stats = await wait_idle(client)
    assert final.status == "aborted"
    assert final.error is not None and final.error.code == "cancelled"
    assert 3 <= len(final.token_ids) < 4000
    assert stats["metrics"]["be"]["requests"]["aborted"] == 1


async def test_client_disconnect_mid_stream_cancels_its_request_and_frees_memory(tmp_path, tiny):
    async with running_server(tmp_path, tiny) as running:
        reader, writer = await asyncio.open_unix_connection(str(running.path))
        writer.write(p.encode_frame(p.Hello()))
        gen = p.Generate.build(
            id=1, prompt="Tell me everything", max_tokens=4000, ignore_eos=True, stream=True
        )
        writer.write(p.encode_frame(gen))
        assert isinstance(p.decode_server(await p.read_frame(reader)), p.Welcome)
        for _ in range(3):
            assert isinstance(p.decode_server(await p.read_frame(reader)), p.Chunk)
        async with AsyncClient(running.path) as observer:
            during = await observer.stats()
            assert during["live"]["be"] and during["memory"]["resident_bytes"] > 0
            writer.close()
            await writer.wait_closed()
            after = await wait_idle(observer)
    be = after["metrics"]["be"]
    assert be["requests"]["aborted"] == 1
    assert be["generated_tokens"] < 4000


async def test_limits_are_typed_errors_and_the_connection_goes_on(tmp_path, tiny):
    async with (
        running_server(tmp_path, tiny, max_tokens=50, max_prompt_tokens=20) as running,
        AsyncClient(running.path) as client,
    ):
        assert (client.welcome.max_tokens, client.welcome.max_prompt_tokens) == (50, 20)
        with pytest.raises(MaxTokensTooLarge, match="50"):
            await client.generate("hi", max_tokens=51)
        with pytest.raises(PromptTooLong):
            await client.generate(list(range(21)), max_tokens=2)
        with pytest.raises(PromptTooLong):
            await client.generate("word " * 1000, max_tokens=2)
        with pytest.raises(InvalidRequest, match="out of range"):
            await client.generate([10**6], max_tokens=2)
        with pytest.raises(InvalidRequest, match="max_tokens"):
            await client.generate("hi", max_tokens=0)
        ok = await client.generate("hi", max_tokens=2, ignore_eos=True)
        health = await client.health()
    assert ok.status == "length"
    assert health.status == "ok" and health.live == 0


async def test_duplicate_ids_and_too_many_requests_are_refused_without_harm(tmp_path, tiny):
    async with running_server(tmp_path, tiny, max_requests_per_connection=2) as running:
        reader, writer = await asyncio.open_unix_connection(str(running.path))
        long = {"prompt": "x y z", "max_tokens": 50, "ignore_eos": True}
        for frame in (
            p.Hello(),
            p.Generate.build(id=1, **long),
            p.Generate.build(id=1, **long),  # duplicate of a live id
            p.Generate.build(id=2, **long),
            p.Generate.build(id=3, **long),  # a third live request: over the limit
        ):
            writer.write(p.encode_frame(frame))
        replies = []
        while len([m for m in replies if isinstance(m, p.Final)]) < 2:
            replies.append(p.decode_server(await p.read_frame(reader)))
        writer.close()
        await writer.wait_closed()
    errors = {(m.id, m.code) for m in replies if isinstance(m, p.Error)}
    assert errors == {(1, "duplicate_id"), (3, "too_many_requests")}
    finals = {m.id: m for m in replies if isinstance(m, p.Final)}
    assert sorted(finals) == [1, 2]
    assert all(f.status == "length" and len(f.token_ids) == 50 for f in finals.values())


async def test_shutdown_cuts_off_a_client_that_does_not_read(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(server_module, "CLOSE_TIMEOUT", 0.2)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with structlog.testing.capture_logs() as logs, stuck:
        async with asyncio.timeout(120):  # a server waiting for this client forever fails here
            async with running_server(tmp_path, tiny, drain_timeout=0) as running:
                stuck.connect(str(running.path))
                stuck.setblocking(False)
                # Stats replies pile up in the socket buffers: nobody reads them.
                frames = [p.Hello()] + [p.Stats(id=i) for i in range(2000)]
                await asyncio.get_running_loop().sock_sendall(stuck, b"".join(map(p.encode_frame, frames)))
                async with AsyncClient(running.path) as observer:
                    while (await observer.stats())["server"]["connections"] < 2:
                        await asyncio.sleep(0.01)
            # Leaving the block stopped the server.
    assert "connection_cut_off" in [entry["event"] for entry in logs]


def test_sync_client(tmp_path, tiny):
    with server_thread(tmp_path, tiny) as running, Client(running.path, timeout=60) as client:
        result = client.generate("Hello", max_tokens=4, ignore_eos=True, priority="ls")
        with client.stream("Hello", max_tokens=4, ignore_eos=True, priority="ls") as stream:
            tokens = [t for chunk in stream for t in chunk.token_ids]
        assert tokens == result.token_ids == stream.result.token_ids
        assert client.health().status == "ok"
        assert client.stats()["metrics"]["ls"]["requests"]["length"] == 2


# Peer credentials --------------------------------------------------------------------------------


async def test_allow_list_rejects_another_uid(tmp_path, tiny):
    def stranger(_sock) -> Credentials:
        return Credentials(pid=1, uid=os.getuid() + 4242, gid=os.getgid() + 4242)

    async with running_server(tmp_path, tiny, allow_uids=[os.getuid()], credentials=stranger) as running:
        with pytest.raises(Forbidden):
            await AsyncClient(running.path).connect()


async def test_allow_list_admits_a_listed_gid_through_a_fake_credential(tmp_path, tiny):
    def member(_sock) -> Credentials:
        return Credentials(pid=1, uid=os.getuid() + 4242, gid=777)

    async with (
        running_server(tmp_path, tiny, allow_gids=[777], credentials=member) as running,
        AsyncClient(running.path) as client,
    ):
        assert (await client.health()).status == "ok"


async def test_allow_list_real_credentials_of_this_process(tmp_path, tiny):
    async with (
        running_server(tmp_path / "a", tiny, allow_uids=[os.getuid()]) as running,
        AsyncClient(running.path) as client,
    ):
        assert (await client.health()).status == "ok"
    async with running_server(tmp_path / "b", tiny, allow_uids=[os.getuid() + 4242]) as running:
        with pytest.raises(Forbidden):
            await AsyncClient(running.path).connect()


# The second user runs a stdlib-only Python (it may not read this virtualenv): it sends a hello
# and prints the bytes of the reply.
RAW_HELLO_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.hex())
"""
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as a second user")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON} for the second user")
async def test_allow_list_rejects_a_real_second_user(tiny):
    nobody = 65534
    shared = Path(tempfile.mkdtemp(prefix="qllm-peercred-"))
    shared.chmod(0o755)
    try:
        async with running_server(shared, tiny, allow_uids=[0], socket_mode="0666") as running:
            argv = [SYSTEM_PYTHON, "-c", RAW_HELLO_CLIENT, str(running.path), p.encode_frame(p.Hello()).hex()]
            proc = await asyncio.to_thread(
                subprocess.run, argv, user=nobody, group=nobody, extra_groups=[], cwd="/",
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            async with AsyncClient(running.path) as client:  # root is on the list
                assert (await client.health()).status == "ok"
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    reply = bytes.fromhex(proc.stdout.strip())
    message = p.decode_server(reply[4:])
    assert isinstance(message, p.Error) and message.code == "forbidden"
    assert len(reply) == 4 + int.from_bytes(reply[:4], "big")  # nothing else: no welcome


# Bad input against a live server -----------------------------------------------------------------

_payloads = st.one_of(
    st.binary(max_size=40),
    st.builds(
        msgspec.msgpack.encode,
        st.dictionaries(
            st.sampled_from(["type", "id", "prompt", "max_tokens", "priority", "stream", "top_p"]),
            st.one_of(
                st.integers(-5, 2**40), st.text(max_size=6), st.sampled_from(["generate", "cancel", "stats"])
            ),
            max_size=5,
        ),
    ),
)
_framed = st.builds(lambda b: len(b).to_bytes(4, "big") + b, _payloads)
_raw = st.binary(min_size=1, max_size=12)  # may break the framing: a wrong header, a cut frame


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny):
    with server_thread(tmp_path_factory.mktemp("fuzz"), tiny, max_tokens=8, max_frame_bytes=4096) as running:
        yield running


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hello=st.booleans(), parts=st.lists(st.one_of(_framed, _framed, _raw), min_size=1, max_size=3))
def test_fuzz_live_server_answers_or_closes_only_that_connection(fuzz_server, hello, parts):
    data = b"".join(parts)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(fuzz_server.path))
        first = p.encode_frame(p.Hello()) if hello else b""
        sock.sendall(first + data + p.encode_frame(p.Health(id=99)))
        sock.shutdown(socket.SHUT_WR)  # the server must answer and close, never wait for more
        frames = recv_frames(sock)  # every frame the server sent decodes
    for frame in frames:
        if isinstance(frame, p.Error):
            assert frame.code in {"bad_frame", "invalid_request", "protocol_error", "frame_too_large",
                                  "max_tokens_too_large", "prompt_too_long", "duplicate_id"}  # fmt: skip
    well_framed = all(len(b) >= 4 and int.from_bytes(b[:4], "big") == len(b) - 4 for b in parts)
    if hello and well_framed:
        assert any(isinstance(f, p.HealthReply) and f.id == 99 for f in frames)
    # Another client is served as usual.
    with Client(fuzz_server.path, timeout=30) as client:
        assert client.health().status == "ok"


def test_oversized_and_truncated_frames_close_only_their_connection(fuzz_server):
    with socket.socket(socket.AF_UNIX) as bystander, socket.socket(socket.AF_UNIX) as bad:
        bystander.connect(str(fuzz_server.path))
        bystander.sendall(p.encode_frame(p.Hello()))
        bad.connect(str(fuzz_server.path))
        bad.sendall(p.encode_frame(p.Hello()) + (1 << 30).to_bytes(4, "big") + b"x" * 100)
        frames = recv_frames(bad)
        assert isinstance(frames[0], p.Welcome)
        assert isinstance(frames[-1], p.Error) and frames[-1].code == "frame_too_large"
        bystander.sendall(p.encode_frame(p.Health(id=1)))
        bystander.shutdown(socket.SHUT_WR)
        assert isinstance(recv_frames(bystander)[-1], p.HealthReply)


def test_generate_json_has_the_same_fields_in_process_and_through_the_socket(tmp_path, tiny, capsys):
    from qllm.cli import main

    argv = ["generate", "--json", "--max-tokens", "3", "--ignore-eos", "Hello"]
    assert main(argv) == 0
    local = msgspec.json.decode(capsys.readouterr().out)
    with server_thread(tmp_path, tiny) as running:
        assert main([*argv, "--socket", str(running.path)]) == 0
        remote = msgspec.json.decode(capsys.readouterr().out)
        # Options that only choose an in-process model are refused, not silently ignored.
        for extra in (["--model", "smollm2-moe"], ["--dtype", "bfloat16"]):
            assert main([*argv, "--socket", str(running.path), *extra]) == 2
            err = capsys.readouterr().err
            assert f"{extra[0]} cannot be used with --socket" in err and "drop --socket" in err
    assert sorted(local) == sorted(remote)
    assert local["model"] == remote["model"] == "tiny"
    assert local["status"] == remote["status"] == "length"
    assert local["token_ids"] == remote["token_ids"] and len(local["token_ids"]) == 3
    assert local["preemptions"] == 0 and local["turnaround_s"] >= local["ttft_s"] > 0


async def test_stats_name_the_model_alike_in_process_and_through_the_socket(tmp_path, tiny):
    async with qllm.Engine(model="tiny") as engine:
        local = engine.stats()
    async with running_server(tmp_path, tiny) as running, AsyncClient(running.path) as client:
        remote = await client.stats()
    assert (local["model"], local["family"]) == (remote["model"], remote["family"]) == ("tiny", "mixtral")


def test_generate_cli_through_the_socket(tmp_path, tiny):
    with server_thread(tmp_path, tiny) as running:
        out = subprocess.run(
            [sys.executable, "-m", "qllm", "generate", "--socket", str(running.path), "--json", "--max-tokens", "3",
             "Hello"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        stats = subprocess.run(
            [sys.executable, "-m", "qllm", "stats", "--socket", str(running.path), "--prometheus"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    result = msgspec.json.decode(out.stdout)
    assert result["status"] in ("length", "stopped") and 1 <= len(result["token_ids"]) <= 3
    assert 'qllm_requests_total{class="ls",status="' in stats.stdout
    assert "qllm_memory_resident_bytes 0" in stats.stdout
