"""Measure what careless and hostile local clients cost a live ``qllm serve --model tiny``.

    .venv/bin/python scripts/hostile_clients.py unread [--count 300000]
    .venv/bin/python scripts/hostile_clients.py tokenize [--prompts 20]
    .venv/bin/python scripts/hostile_clients.py fairness [--flood 64] [--tokens 64]

``unread``: one connection sends ``stats`` requests and never reads the replies; prints how many
the socket took, the server's RSS growth and a bystander's generate time. ``tokenize``: one
connection pipelines long CJK prompts; prints another connection's health round trips meanwhile.
``fairness``: one connection floods best-effort requests; prints another connection's 4-token
request time against its solo time. The figures in docs/protocol.md come from these.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import recv_frame, serve_process

from qllm import protocol as p
from qllm.client import AsyncClient, Client


def unread(args: argparse.Namespace) -> None:
    with serve_process(Path(tempfile.mkdtemp())) as server, Client(server.path, timeout=120) as bystander:
        bystander.generate("warm up", max_tokens=2)
        before = server.rss()
        flood = server.connect()
        flood.settimeout(3.0)  # the server stopped reading once the socket takes nothing for 3 s
        batch = p.encode_frame(p.Stats(id=1)) * 1000
        sent, started = 0, time.monotonic()
        try:
            while sent < args.count:
                view = memoryview(batch)
                while view:
                    view = view[flood.send(view) :]
                sent += 1000
        except TimeoutError:
            pass
        grown = server.rss() - before
        print(f"{sent} of {args.count} unread stats requests taken in {time.monotonic() - started:.1f} s; "
              f"server RSS {before / 2**20:.0f} MiB, grown by {grown / 2**20:.1f} MiB")  # fmt: skip
        started = time.monotonic()
        bystander.generate("Hello", max_tokens=4, ignore_eos=True)
        print(f"a bystander's 4-token generate meanwhile: {time.monotonic() - started:.2f} s")
        flood.close()


def tokenize(args: argparse.Namespace) -> None:
    with serve_process(Path(tempfile.mkdtemp())) as server:
        probe, flood = server.connect(), server.connect()

        def round_trip() -> float:
            started = time.perf_counter()
            probe.sendall(p.encode_frame(p.Health(id=1)))
            recv_frame(probe)
            return time.perf_counter() - started

        idle = max(round_trip() for _ in range(50))
        prompt = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(131072))
        frames = b"".join(p.encode_frame(p.Generate(id=i, prompt=prompt)) for i in range(args.prompts))
        reader = threading.Thread(target=lambda: [recv_frame(flood) for _ in range(args.prompts)])
        reader.start()
        threading.Thread(target=flood.sendall, args=(frames,), daemon=True).start()
        started, delays = time.perf_counter(), []
        while reader.is_alive():
            delays.append(round_trip())
        delays.sort()
        print(f"health round trip idle: max {idle * 1e3:.1f} ms; during {args.prompts} pipelined 131072-character "
              f"CJK prompts ({time.perf_counter() - started:.1f} s): {len(delays)} checks, "
              f"median {delays[len(delays) // 2] * 1e3:.2f} ms, max {delays[-1] * 1e3:.1f} ms")  # fmt: skip


def fairness(args: argparse.Namespace) -> None:
    async def main(path: Path) -> None:
        async with AsyncClient(path, timeout=600) as flooder, AsyncClient(path, timeout=600) as other:
            started = time.monotonic()
            await other.generate("short one", max_tokens=4, ignore_eos=True)
            solo = time.monotonic() - started
            flood = [
                await flooder.submit(f"long {i}", max_tokens=args.tokens, ignore_eos=True)
                for i in range(args.flood)
            ]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await other.generate("short one", max_tokens=4, ignore_eos=True)
            waited = time.monotonic() - started
            started = time.monotonic()
            await asyncio.gather(*(request.final() for request in flood))
            print(f"4-token request: {solo:.2f} s alone, {waited:.2f} s under {args.flood} x {args.tokens}-token "
                  f"best-effort requests of another connection ({waited / solo:.1f}x); the flood ended "
                  f"{time.monotonic() - started:.1f} s later")  # fmt: skip

    with serve_process(Path(tempfile.mkdtemp())) as server:
        asyncio.run(main(server.path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("unread").add_argument("--count", type=int, default=300_000)
    sub.add_parser("tokenize").add_argument("--prompts", type=int, default=20)
    fair = sub.add_parser("fairness")
    fair.add_argument("--flood", type=int, default=64)
    fair.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    {"unread": unread, "tokenize": tokenize, "fairness": fairness}[args.what](args)


if __name__ == "__main__":
    main()
