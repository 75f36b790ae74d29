"""Helpers for the server tests: a server on a temporary socket, in this loop or in a thread."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qllm import protocol as p
from qllm.server.app import Server
from qllm.server.config import Config, ServerConfig
from qllm.server.listener import open_listeners


@dataclass
class Running:
    server: Server
    engine: Any
    path: Path
    notes: list[str] = field(default_factory=list)  # what the server told sd_notify, in order
    http: list[str] = field(default_factory=list)  # HTTP addresses: unix:PATH, http://HOST:PORT


@asynccontextmanager
async def running_server(
    tmp_path: Path,
    model: Any,
    *,
    policy: str = "priority-aging",
    engine: Any = None,
    credentials=None,
    http: bool = False,
    **settings,
) -> AsyncIterator[Running]:
    """Serve ``model`` on ``tmp_path/qllm.sock`` from this event loop until the block ends; with
    ``http``, the HTTP front end too (``tmp_path/qllm-http.sock``, TCP with ``http_listen``)."""
    from qllm import Engine

    config = Config(server=ServerConfig(socket=str(tmp_path / "qllm.sock"), **settings))
    listeners = open_listeners(config.server, env={}, http=http)
    engine = engine if engine is not None else Engine(model=model, policy=policy)
    ready = asyncio.Event()
    notes: list[str] = []

    def notify(state: str) -> bool:
        notes.append(state)
        if state == "READY=1":
            ready.set()
        return True

    stop = asyncio.Event()
    extra = {} if credentials is None else {"credentials": credentials}
    try:
        async with engine:
            server = Server(engine, config, notify=notify, **extra)
            serving = asyncio.create_task(server.serve(listeners.native, stop, listeners.http))
            waiting = asyncio.create_task(ready.wait())
            await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if serving.done():
                serving.result()  # it failed to start: raise why
            try:
                yield Running(server, engine, Path(config.server.socket), notes, server.http_addresses)
            finally:
                stop.set()
                await serving
    finally:
        listeners.close()


@contextmanager
def server_thread(tmp_path: Path, model: Any, **kw: Any):
    """The same server on an event loop in a thread, for blocking clients and sockets."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        try:
            async with running_server(tmp_path, model, **kw) as running:
                box["running"] = running
                box["stop"] = asyncio.Event()
                started.set()
                await box["stop"].wait()
        except BaseException as exc:
            box["error"] = exc
            started.set()
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    started.wait()
    if "error" in box:
        thread.join()
        raise box["error"]
    try:
        yield box["running"]
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join()
        loop.close()


def recv_frames(sock: socket.socket, max_bytes: int = 1 << 24) -> list[p.Message]:
    """Every frame until the server closes the connection, decoded (raises on a malformed one)."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
        if len(data) > max_bytes:
            raise AssertionError("the server sent more than expected")
    frames, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        assert at + 4 + size <= len(data), "the server sent a truncated frame"
        frames.append(p.decode_server(bytes(data[at + 4 : at + 4 + size])))
        at += 4 + size
    return frames


@dataclass
class Process:
    """A ``qllm serve`` child process (see :func:`serve_process`)."""

    proc: subprocess.Popen
    path: Path
    stderr: Path

    def rss(self) -> int:
        """Resident set size in bytes (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def events(self) -> list[dict]:
        """The JSON log lines written so far."""
        lines = self.stderr.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def connect(self, hello: bool = True, timeout: float = 30) -> socket.socket:
        """A raw socket to the server; after ``hello``, its welcome is already read."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.path))
        if hello:
            sock.sendall(p.encode_frame(p.Hello()))
            assert isinstance(recv_frame(sock), p.Welcome)
        return sock


@contextmanager
def serve_process(tmp_path: Path, config: str = "", *args: str, env: dict | None = None):
    """``qllm serve --model tiny`` in a child process, with ``config`` as its TOML file; yields
    once it announced READY=1 and stops it with SIGTERM."""
    (tmp_path / "qllm.toml").write_text(config + "\n[log]\nformat = 'json'\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(180)
    stderr_path = tmp_path / "stderr"
    environ = {**os.environ, **(env or {}), "NOTIFY_SOCKET": str(tmp_path / "notify")}
    argv = [sys.executable, "-m", "qllm", "serve", "--model", "tiny", "--config", str(tmp_path / "qllm.toml"),
            "--socket", str(tmp_path / "qllm.sock"), "--threads", "1", *args]  # fmt: skip
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(argv, env=environ, stderr=stderr)
    try:
        while notify.recv(4096) != b"READY=1":
            pass
        yield Process(proc, tmp_path / "qllm.sock", stderr_path)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def recv_frame(sock: socket.socket) -> p.Message | None:
    """One frame from a blocking socket (None at EOF before it)."""
    header = recv_exactly(sock, 4)
    if header is None:
        return None
    payload = recv_exactly(sock, int.from_bytes(header, "big"))
    assert payload is not None, "the server sent a truncated frame"
    return p.decode_server(payload)


def recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None if not data else bytes(data)
        data += chunk
    return bytes(data)
