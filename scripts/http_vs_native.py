"""TTFT of the HTTP API against the native socket, side by side on one ``qllm serve``.

Starts ``qllm serve`` (model tiny by default) with its native socket, its HTTP Unix socket and a
loopback TCP port, then sends the same streaming requests one at a time, interleaved between
the front ends, and prints each front end's TTFT percentiles (first token as the client sees it):
``native`` (qllm.client), ``http-raw`` (a minimal HTTP client on the Unix socket: the server's
cost of HTTP), ``http-unix`` and ``http-tcp`` (httpx, as an application would use it).

    .venv/bin/python scripts/http_vs_native.py --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from qllm.client import AsyncClient


async def native_ttft(client: AsyncClient, prompt: str, max_tokens: int) -> float:
    start = time.perf_counter()
    stream = await client.submit(prompt, max_tokens=max_tokens, ignore_eos=True, stream=True, priority="ls")
    await stream.__anext__()
    ttft = time.perf_counter() - start
    await stream.final()
    return ttft


async def http_ttft(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> float:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "priority": "ls"}
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: {"):  # a completion's first event is its first token
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("no token came")
    return ttft


class RawHttp:
    """A minimal HTTP/1.1 client on one kept-alive Unix connection, to time the server's side of
    HTTP without a client library's own overhead (httpx adds ~2 ms per request here)."""

    def __init__(self, path: Path):
        self.path = path

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(str(self.path))

    async def ttft(self, prompt: str, max_tokens: int) -> float:
        body = json.dumps(
            {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "priority": "ls"}
        ).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nhost: q\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        start = time.perf_counter()
        self.writer.write(head.encode() + body)
        await self.reader.readuntil(b"data: {")
        ttft = time.perf_counter() - start
        await self.reader.readuntil(b"data: [DONE]\n\n")
        await self.reader.readuntil(b"0\r\n\r\n")  # the chunked body's end
        return ttft

    def close(self) -> None:
        self.writer.close()


def _summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1e3 for v in values)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    return f"{name:<10} n={len(ms):<4} p50 {statistics.median(ms):7.3f} ms   p90 {p90:7.3f} ms   min {ms[0]:7.3f} ms"


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock, http_sock = Path(tmp) / "qllm.sock", Path(tmp) / "qllm-http.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "qllm", "serve", "--model", args.model, "--socket", str(sock),
             "--http-listen", f"127.0.0.1:{args.port}", "--threads", str(args.threads), "--log-level", "warning"],
        )  # fmt: skip
        try:
            while not http_sock.exists():  # the sockets open before the model loads
                if proc.poll() is not None:
                    raise SystemExit("qllm serve exited")
                await asyncio.sleep(0.05)
            native = AsyncClient(sock, connect_timeout=300)
            await native.connect()
            uds = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(http_sock)), base_url="http://q"
            )
            tcp = httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}")
            raw = RawHttp(http_sock)
            await raw.connect()
            fronts = {
                "native": lambda p: native_ttft(native, p, args.max_tokens),
                "http-raw": lambda p: raw.ttft(p, args.max_tokens),
                "http-unix": lambda p: http_ttft(uds, p, args.max_tokens),
                "http-tcp": lambda p: http_ttft(tcp, p, args.max_tokens),
            }
            for measure in fronts.values():  # warm up: tokenizer, kernels, connections
                for _ in range(5):
                    await measure("warm up")
            times: dict[str, list[float]] = {name: [] for name in fronts}
            for i in range(args.requests):
                order = list(fronts.items())
                order = order[i % len(order) :] + order[: i % len(order)]
                for name, measure in order:
                    times[name].append(await measure(f"request {i} says hello"))
            print(
                f"model {args.model}, {args.requests} sequential requests per front end, {args.max_tokens} tokens each"
            )
            for name, values in times.items():
                print(_summary(name, values))
            base = statistics.median(times["native"])
            for name in ("http-raw", "http-unix", "http-tcp"):
                print(f"{name} - native: p50 {1e3 * (statistics.median(times[name]) - base):+.3f} ms")
            await native.close()
            await uds.aclose()
            await tcp.aclose()
            raw.close()
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=18080)
    asyncio.run(main(parser.parse_args()))
