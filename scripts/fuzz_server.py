"""Fuzz a live ``qllm serve --model tiny`` with random frames; check that it stays up and bounded.

    .venv/bin/python scripts/fuzz_server.py --frames 100000 [--seed 1] [--per-connection 200]

Each connection sends a hello (95% of the time), then random frames (valid messages with random
values, random MessagePack maps, random bytes), and one in ten ends with a cut frame or an
oversized header. It then shuts down
its sending side and reads every reply until the server closes it. After each connection a
well-behaved client must get a ``health`` reply. At the end: frames sent, replies by type and
error code, connections the server closed early, the server's RSS before and after, wall time.
Exit status 1 if the server died, hung, sent an undecodable frame, or a health check failed.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from qllm import protocol as p

KEYS = ["type", "id", "prompt", "max_tokens", "priority", "stream", "top_p", "temperature", "seed", "rank",
        "stop", "protocol", "chat", "ignore_eos", "top_k", "ttft_deadline"]  # fmt: skip
TYPES = ["hello", "generate", "cancel", "stats", "health", "launch", ""]


def value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 1:
        return rng.choice([0, 1, 2, 5, 64, -1, 2**63])
    if kind == 2:
        return rng.choice([0.0, 1e-39, 5e-324, 1.0, 2.0, -1.0, float("inf"), float("nan"), 1e308])
    if kind == 3:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice([None, True, False, "ls", "be", "generate"])
    if kind == 5:
        return rng.randbytes(rng.randrange(8))
    if kind == 6:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {rng.choice(KEYS): value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return msgspec.msgpack.Ext(rng.randrange(128), rng.randbytes(3))


def frame(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.35:  # a valid message with small limits, so the server really serves it
        rid = rng.randrange(50)
        message = rng.choice([
            p.Generate.build(id=rid, prompt=rng.choice(["Hi", "a b c", [1, 2, 3]]), max_tokens=rng.randint(1, 4),
                             stream=rng.random() < 0.5, priority=rng.choice(["ls", "be"]),
                             temperature=rng.choice([0.0, 0.7, 1e-39]), seed=rng.randrange(100)),
            p.Cancel(id=rid), p.Stats(id=rid), p.Health(id=rid), p.Hello(),
        ])  # fmt: skip
        return p.encode_frame(message)
    if kind < 0.75:  # a map with known keys and random values
        body = {rng.choice(KEYS): value(rng) for _ in range(rng.randrange(6))}
        if rng.random() < 0.8:
            body["type"] = rng.choice(TYPES)
        payload = msgspec.msgpack.encode(body)
    else:
        payload = rng.randbytes(rng.randrange(40))
    return len(payload).to_bytes(4, "big") + payload


def ending(rng: random.Random) -> bytes:
    """What a connection ends with: mostly nothing, else a cut frame or an oversized header."""
    kind = rng.random()
    if kind < 0.9:
        return b""
    if kind < 0.95:  # cut short: the connection ends inside a frame
        return rng.randrange(5, 100).to_bytes(4, "big") + rng.randbytes(rng.randrange(4))
    return rng.randrange(1 << 21, 1 << 32).to_bytes(4, "big")


def read_all(sock: socket.socket) -> list[p.Message]:
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    frames, at = [], 0
    while at + 4 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        frames.append(p.decode_server(bytes(data[at + 4 : at + 4 + size])))  # raises if malformed
        at += 4 + size
    if at != len(data):
        raise AssertionError("the server sent a truncated frame")
    return frames


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def health(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(p.encode_frame(p.Hello()) + p.encode_frame(p.Health(id=1)))
        sock.shutdown(socket.SHUT_WR)
        frames = read_all(sock)
    if not any(isinstance(f, p.HealthReply) for f in frames):
        raise AssertionError(f"no health reply: {frames}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--per-connection", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="qllm-fuzz-"))
    path = tmp / "qllm.sock"
    (tmp / "qllm.toml").write_text("[server]\nmax_tokens = 8\n[log]\nformat = 'json'\nlevel = 'warning'\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    notify.settimeout(180)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify")}
    argv = [sys.executable, "-m", "qllm", "serve", "--model", "tiny", "--threads", "1",
            "--config", str(tmp / "qllm.toml"), "--socket", str(path)]  # fmt: skip
    with open(tmp / "stderr", "wb") as stderr:
        server = subprocess.Popen(argv, env=env, stderr=stderr)
    while notify.recv(4096) != b"READY=1":
        pass
    replies: collections.Counter = collections.Counter()
    sent = connections = failures = 0
    started = time.monotonic()
    health(path)
    before = rss(server.pid)
    try:
        while sent < args.frames:
            count = min(args.per_connection, args.frames - sent)
            hello = p.encode_frame(p.Hello()) if rng.random() < 0.95 else b""
            data = hello + b"".join(frame(rng) for _ in range(count)) + ending(rng)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(60)
                sock.connect(str(path))
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server closed it early (bad framing): its replies are still there
                for message in read_all(sock):
                    replies[
                        type(message).__name__ + (f":{message.code}" if isinstance(message, p.Error) else "")
                    ] += 1
            sent += count
            connections += 1
            if server.poll() is not None:
                raise AssertionError(f"the server exited with {server.returncode}")
            if connections % 25 == 0:
                health(path)
        health(path)
    except (AssertionError, OSError, p.ProtocolError) as exc:
        failures += 1
        print(f"FAILED after {sent} frames: {exc!r}")
    after = rss(server.pid)
    elapsed = time.monotonic() - started
    server.send_signal(signal.SIGTERM)
    code = server.wait(120)
    print(f"frames sent: {sent} over {connections} connections in {elapsed:.0f} s")
    print(f"server RSS: {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after; exit status {code}")
    for name, n in sorted(replies.items(), key=lambda kv: -kv[1]):
        print(f"  {name}: {n}")
    return 1 if failures or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
