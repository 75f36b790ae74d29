"""Careless and hostile local clients against a live ``qllm serve --model tiny`` (a child process):
memory stays bounded, stalled connections close, limits hold, other clients keep being served."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import structlog
from serving import recv_exactly, recv_frame, running_server, serve_process, server_thread
from test_protocol import documented_frames

from qllm import protocol as p
from qllm.client import AsyncClient, Client, ConnectionLost, TooManyConnections
from qllm.errors import InvalidRequest
from qllm.kernel.config import EngineConfig
from qllm.logging import Throttled, configure
from qllm.paths import fallback_socket_dir
from qllm.server.config import ServerConfig
from qllm.server.listener import open_listener

UNREAD_STATS = 300_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ``qllm serve --model tiny`` (default settings) for the tests that do not stop it."""
    with serve_process(tmp_path_factory.mktemp("serve")) as running:
        yield running


def send_until_blocked(sock: socket.socket, frame: bytes, count: int, stall: float = 3.0) -> int:
    """Send ``count`` copies of ``frame`` until the socket takes nothing for ``stall`` seconds;
    returns how many were sent whole."""
    sock.settimeout(stall)
    batch = frame * 1000
    sent = 0
    try:
        while sent < count:
            view = memoryview(batch)
            while view:
                view = view[sock.send(view) :]
            sent += 1000
    except TimeoutError:
        pass
    return sent


def test_a_client_that_never_reads_its_replies_is_paused_not_buffered(server):
    with Client(server.path, timeout=60) as bystander:
        bystander.generate("warm up", max_tokens=2)
        bystander.stats()
        before = server.rss()
        flood = server.connect()
        frame = p.encode_frame(p.Stats(id=1))
        sent = send_until_blocked(flood, frame, UNREAD_STATS)
        grown = server.rss() - before
        # The server stopped reading once max_outbox_bytes (1 MiB) of replies were unread: the
        # requests wait in the socket buffers (a few hundred kB), not in the server.
        assert sent < UNREAD_STATS
        assert grown < 50 << 20, f"server RSS grew by {grown / 2**20:.1f} MiB"
        started = time.monotonic()
        result = bystander.generate("Hello", max_tokens=4, ignore_eos=True)
        assert len(result.token_ids) == 4
        assert bystander.health().status == "ok"
        waited = time.monotonic() - started
        assert waited < 10, f"a well-behaved client waited {waited:.1f} s"
        # Once the flooding client reads, it gets every reply, in order, and is read again.
        flood.settimeout(30)
        reader = threading.Thread(target=lambda: [recv_frame(flood) for _ in range(sent)])
        reader.start()
        reader.join(120)
        assert not reader.is_alive()
        flood.sendall(p.encode_frame(p.Health(id=7)))
        assert isinstance(recv_frame(flood), p.HealthReply)
        flood.close()


# The default socket directory ----------------------------------------------------------------


def serve_default_path(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``qllm serve`` without --socket: it must refuse before loading the model."""
    environ = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "INVOCATION_ID")}
    return subprocess.run(
        [sys.executable, "-m", "qllm", "serve", "--model", "tiny"],
        env={**environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a directory as another user")
def test_a_default_directory_created_by_another_user_is_refused(tmp_path):
    squatted = tmp_path / "qllm"
    squatted.mkdir(mode=0o777)
    squatted.chmod(0o755)
    os.chown(squatted, 65534, 65534)  # "nobody" made it first, hoping to serve its own socket there
    out = serve_default_path({"RUNTIME_DIRECTORY": str(squatted)})
    assert out.returncode == 2
    assert f"refusing {squatted}" in out.stderr and "belongs to uid 65534" in out.stderr
    assert list(squatted.iterdir()) == []


def test_a_default_directory_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "qllm"
    shared.mkdir()
    shared.chmod(0o777)
    out = serve_default_path({"RUNTIME_DIRECTORY": str(shared)})
    assert out.returncode == 2
    assert "others may write to it (mode 0o777)" in out.stderr


def test_a_missing_default_directory_is_created_private(monkeypatch):
    uid = 40000 + os.getpid() % 20000  # a non-root uid: the fallback in /tmp
    monkeypatch.setattr(os, "getuid", lambda: uid)
    directory = fallback_socket_dir(uid)
    shutil.rmtree(directory, ignore_errors=True)
    try:
        if os.geteuid() == 0:
            # Root creates it, so for this uid it is someone else's directory: refused all the same.
            with pytest.raises(ValueError, match=f"belongs to uid {os.geteuid()}"):
                open_listener(ServerConfig(), env={})
        else:
            open_listener(ServerConfig(), env={}).close()
        assert stat.S_IMODE(directory.lstat().st_mode) == 0o700
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_the_client_refuses_a_fallback_directory_it_does_not_own(monkeypatch):
    uid = 40000 + os.getpid() % 20000
    directory = fallback_socket_dir(uid)
    directory.mkdir(mode=0o755, exist_ok=True)  # owned by this process's uid, not by ``uid``
    try:
        monkeypatch.setattr(os, "getuid", lambda: uid)
        env = {k: v for k, v in os.environ.items() if k not in ("QLLM_SOCKET", "XDG_RUNTIME_DIR")}
        monkeypatch.setattr(os, "environ", env)
        with pytest.raises(ConnectionLost, match=f"refusing {directory}"):
            Client()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# Timeouts and connection caps ----------------------------------------------------------------

LIMITS = """
[server]
idle_timeout = 1.5
frame_timeout = 1.5
max_connections_per_uid = 3
max_tokens = 100000
"""


def test_idle_and_stalled_connections_close_and_connections_are_capped_per_uid(tmp_path):
    with serve_process(tmp_path, LIMITS) as server:
        idle, stalled, busy = server.connect(), server.connect(), server.connect()
        stalled.sendall(b"\x00\x00")  # half a header, then nothing: e.g. a client that hung
        busy.sendall(
            p.encode_frame(p.Generate.build(id=1, prompt="long", max_tokens=100000, ignore_eos=True))
        )
        extra = [server.connect(hello=False) for _ in range(3)]  # over the cap of 3 for this uid
        for sock in extra:
            sock.sendall(p.encode_frame(p.Hello()))
            refused = recv_frame(sock)
            assert isinstance(refused, p.Error) and refused.code == "too_many_connections", refused
            assert recv_frame(sock) is None
            sock.close()
        started = time.monotonic()
        for sock in (idle, stalled):
            error = recv_frame(sock)
            assert isinstance(error, p.Error) and error.code == "timeout", error
            assert recv_frame(sock) is None
            sock.close()
        assert time.monotonic() - started < 30
        # A connection with a live request is not idle: it is still served past the idle timeout.
        busy.sendall(p.encode_frame(p.Cancel(id=1)))
        final = recv_frame(busy)
        assert isinstance(final, p.Final) and final.status == "aborted" and final.token_ids
        with Client(server.path) as client:  # room again now that two were closed
            assert client.health().status == "ok"
        busy.close()
        events = server.events()
    reasons = sorted(e["reason"] for e in events if e["event"] == "connection_timed_out")
    assert reasons == ["frame_timeout", "idle_timeout"]
    limit_lines = [e for e in events if e["event"] == "connection_limit_reached"]
    assert len(limit_lines) == 1 and limit_lines[0]["scope"] == "uid" and limit_lines[0]["limit"] == 3


async def test_connections_are_capped_for_the_whole_server(tmp_path, tiny):
    async with running_server(tmp_path, tiny, max_connections=2) as running:
        async with AsyncClient(running.path) as first, AsyncClient(running.path):
            with structlog.testing.capture_logs() as logs:
                for _ in range(3):
                    with pytest.raises(TooManyConnections):
                        await AsyncClient(running.path).connect()
            assert (await first.health()).status == "ok"
        async with AsyncClient(running.path) as again:
            assert (await again.stats())["server"]["connections_refused"] == 3
    assert [e["scope"] for e in logs if e["event"] == "connection_limit_reached"] == ["server"]


# Sampling values at the edge, and what failures put in the log --------------------------------


def test_sampling_values_at_the_edge_generate_or_are_refused_clearly(server):
    secret = "my-secret-prompt-7f3a"
    with Client(server.path, timeout=60) as client:
        for kw in ({"temperature": 1e-39}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-46}):
            result = client.generate(secret, max_tokens=3, ignore_eos=True, **kw)
            assert result.status == "length" and len(result.token_ids) == 3, kw
        greedy = client.generate(secret, max_tokens=3, ignore_eos=True)
        assert (
            client.generate(secret, max_tokens=3, ignore_eos=True, temperature=1e-39).token_ids
            == greedy.token_ids
        )
        with pytest.raises(InvalidRequest, match="temperature must be a finite number"):
            client.generate(secret, temperature=float("inf"))
    log = server.stderr.read_text()
    assert secret not in log
    assert "Traceback" not in log and "request_failed" not in log


def test_failure_tracebacks_in_the_log_carry_no_local_variables():
    stream = io.StringIO()
    configure("info", "json", stream)
    try:
        prompt_ids = [4242, 4243]  # noqa: F841 - a local that must not reach the log
        try:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        except RuntimeError:
            structlog.get_logger().error("request_failed", exc_info=True)
    finally:
        structlog.reset_defaults()
    line = json.loads(stream.getvalue())
    assert line["exception"][0]["exc_type"] == "RuntimeError"
    assert "4242" not in stream.getvalue() and "locals" not in json.dumps(line["exception"])


def test_repeated_identical_errors_are_logged_once_per_interval():
    with structlog.testing.capture_logs() as logs:
        throttled = Throttled(structlog.get_logger(), interval=3600)
        for _ in range(1000):
            throttled.error("request_failed", "RuntimeError: boom", error="RuntimeError: boom")
        throttled.error("request_failed", "ValueError: other", error="ValueError: other")
        throttled.interval = 0
        throttled.error("request_failed", "RuntimeError: boom", error="RuntimeError: boom")
    assert [e["error"] for e in logs] == ["RuntimeError: boom", "ValueError: other", "RuntimeError: boom"]
    assert logs[-1]["suppressed"] == 999


# Bounded error frames ------------------------------------------------------------------------


def test_an_invalid_huge_value_gets_a_short_error_and_the_connection_goes_on(server):
    sock = server.connect()
    huge = msgspec.msgpack.encode({"type": "generate", "id": 5, "prompt": "x", "priority": "v" * 1_040_000})
    sock.sendall(len(huge).to_bytes(4, "big") + huge)
    error = recv_frame(sock)
    assert isinstance(error, p.Error) and error.id == 5 and error.code == "invalid_request"
    assert len(p.encode_frame(error)) < 2048 and "more characters" in error.message
    sock.sendall(p.encode_frame(p.Health(id=6)))
    assert isinstance(recv_frame(sock), p.HealthReply)
    sock.close()


# Tokenizing off the event loop ---------------------------------------------------------------

CJK_PROMPT = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(131072))  # max_prompt_chars


def test_a_tokenizing_flood_does_not_hold_up_another_clients_health_check(server):
    flood_size = 4
    probe, flood = server.connect(), server.connect()

    def health_round_trip() -> float:
        started = time.perf_counter()
        probe.sendall(p.encode_frame(p.Health(id=1)))
        assert isinstance(recv_frame(probe), p.HealthReply)
        return time.perf_counter() - started

    replies: list[p.Message] = []
    reader = threading.Thread(target=lambda: replies.extend(recv_frame(flood) for _ in range(flood_size)))
    reader.start()
    frames = b"".join(p.encode_frame(p.Generate(id=i, prompt=CJK_PROMPT)) for i in range(flood_size))
    threading.Thread(target=flood.sendall, args=(frames,), daemon=True).start()
    delays = []
    while reader.is_alive():
        delays.append(health_round_trip())
    reader.join()
    # Each prompt takes 0.2-0.8 s to tokenize here; on the event loop it held every other
    # client that long. Off the loop a health check waits a few ms (max 31 ms measured under
    # a 20-prompt flood); 200 ms leaves room for a loaded 2-core machine.
    assert len(delays) > 10 and max(delays) < 0.2, f"max {max(delays) * 1000:.0f} ms"
    assert {r.code for r in replies} == {"prompt_too_long"}  # > 8192 tokens, after tokenizing
    flood.sendall(p.encode_frame(p.Generate(id=99, prompt=CJK_PROMPT + "x")))
    refused = recv_frame(flood)
    assert refused.code == "prompt_too_long" and "131073 characters" in refused.message
    probe.close()
    flood.close()


# Smaller things ------------------------------------------------------------------------------


def test_half_close_stats_model_hello_types_and_a_second_sigterm(tmp_path):
    with serve_process(tmp_path) as server:
        # A client that shuts down its sending side still gets its requests' results.
        sock = server.connect()
        sock.sendall(p.encode_frame(p.Generate.build(id=1, prompt="Hello", max_tokens=3, ignore_eos=True)))
        sock.shutdown(socket.SHUT_WR)
        final = recv_frame(sock)
        assert isinstance(final, p.Final) and final.status == "length" and len(final.token_ids) == 3
        assert recv_frame(sock) is None
        sock.close()
        # A hello whose protocol is not an integer says so; an undecodable first frame closes.
        for payload, code, text in [
            (msgspec.msgpack.encode({"type": "hello", "protocol": "1"}), "unsupported_protocol", "integer"),
            (b"\xc1", "protocol_error", "the first frame must be a hello"),
        ]:
            sock = server.connect(hello=False)
            sock.sendall(len(payload).to_bytes(4, "big") + payload)
            error = recv_frame(sock)
            assert isinstance(error, p.Error) and error.code == code and text in error.message, error
            assert recv_frame(sock) is None
            sock.close()
        with Client(server.path) as client:
            stats = client.stats()
            assert (stats["model"], stats["family"]) == ("tiny", "mixtral")
            assert client.welcome.model == client.health().model == "tiny"
            # A second SIGTERM while draining exits at once with 130, and removes the socket.
            endless = client.stream("endless", max_tokens=4096, ignore_eos=True)
            next(endless)
            server.proc.send_signal(signal.SIGTERM)
            while client.health().status != "draining":  # the first one was handled
                pass
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(60) == 130
        assert not server.path.exists()
        assert any(e["event"] == "forced_exit" for e in server.events())


def test_sigterm_during_the_model_load_stops_without_ready(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    argv = [sys.executable, "-m", "qllm", "serve", "--model", "tiny", "--socket", str(tmp_path / "q.sock")]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    try:
        notes = [notify.recv(4096).decode()]
        assert notes[0].startswith("STATUS=loading model")  # loading takes seconds: signal now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        notify.settimeout(0)
        with contextlib.suppress(BlockingIOError):
            while True:
                notes.append(notify.recv(4096).decode())
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "READY=1" not in notes, notes
    assert notes[-1] == "STATUS=stopped"
    assert not (tmp_path / "q.sock").exists()


# docs/protocol.md against the live server ----------------------------------------------------


def test_the_documented_exchange_and_sample_client_work_against_tiny(tmp_path, tiny):
    frames = documented_frames()
    # the example is what `qllm serve --model tiny` sends, under the default policy
    with (
        server_thread(tmp_path, tiny, policy=EngineConfig().policy) as running,
        socket.socket(socket.AF_UNIX) as sock,
    ):
        sock.settimeout(60)
        sock.connect(str(running.path))
        for direction, data, _ in frames:  # in the documented order
            if direction == "C":
                sock.sendall(data)
                continue
            while True:  # byte for byte: the example is what --model tiny sends
                header = recv_exactly(sock, 4)
                got = header + recv_exactly(sock, int.from_bytes(header, "big"))
                if not isinstance(p.decode_server(got[4:]), p.Final):  # its timings vary: not shown whole
                    break
            assert got == data
        text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
        code = text.split("## A client in a few lines", 1)[1].split("```python", 1)[1].split("```", 1)[0]
        code = code.replace('"/run/qllm/qllm.sock"', repr(str(running.path)))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'type': 'final'" in out.stdout and "'status': 'length'" in out.stdout


async def test_a_small_outbox_pauses_and_resumes_without_losing_a_reply(tmp_path, tiny):
    async with running_server(tmp_path, tiny, max_outbox_bytes=1024) as running:
        reader, writer = await asyncio.open_unix_connection(str(running.path))
        writer.write(p.encode_frame(p.Hello()) + b"".join(p.encode_frame(p.Stats(id=i)) for i in range(200)))
        await writer.drain()
        async with asyncio.timeout(60):
            assert isinstance(p.decode_server(await p.read_frame(reader)), p.Welcome)
            ids = [p.decode_server(await p.read_frame(reader, 1 << 20)).id for _ in range(200)]
        assert ids == list(range(200))  # every reply, in order, although each is above the bound
        writer.close()
        await writer.wait_closed()


async def test_many_failing_requests_log_one_failure_line_without_the_prompt(tiny, monkeypatch):
    from qllm import Engine
    from qllm.sampling import Sampler

    def broken(self, logits):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    monkeypatch.setattr(Sampler, "__call__", broken)
    with structlog.testing.capture_logs() as logs:
        async with Engine(model=tiny) as engine:
            results = await asyncio.gather(
                *(engine.generate(f"secret prompt {i}", max_tokens=2) for i in range(50))
            )
    assert {r.status for r in results} == {"error"}
    failures = [e for e in logs if e["event"] == "request_failed"]
    assert len(failures) == 1 and "probability tensor" in failures[0]["error"]
    assert "secret" not in repr(logs)
