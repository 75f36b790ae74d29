"""The native and HTTP front ends under one mixed load: the same tokens as the in-process engine,
and a SIGTERM that ends every request with a final frame or a closed stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import httpx
import openai
import pytest
from serving import running_server

from qllm.client import AsyncClient, ServerShutdown

CLIENTS = 32  # half native, half HTTP


def _prompt(i: int) -> tuple[str, int]:
    return f"client {i} says hello", 1000 + i


@pytest.mark.slow
async def test_mixed_native_and_http_load_gets_the_engines_tokens(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running:
        expected = {}
        for i in range(CLIENTS):
            prompt, seed = _prompt(i)
            result = await running.engine.generate(prompt, max_tokens=8, temperature=0.9, seed=seed)
            expected[i] = result.text
        http_path = running.http[0].removeprefix("unix:")

        async def native(i: int) -> str:
            prompt, seed = _prompt(i)
            async with AsyncClient(running.path, timeout=120) as client:
                final = await client.generate(prompt, max_tokens=8, temperature=0.9, seed=seed)
            return final.text

        async def http(i: int) -> str:
            prompt, seed = _prompt(i)
            transport = httpx.AsyncHTTPTransport(uds=http_path)
            async with openai.AsyncOpenAI(
                base_url="http://qllm/v1",
                api_key="unused",
                max_retries=0,
                http_client=httpx.AsyncClient(transport=transport, timeout=120),
            ) as client:
                stream = await client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=8, temperature=0.9, seed=seed, stream=True
                )
                return "".join([e.choices[0].text async for e in stream if e.choices])

        texts = await asyncio.gather(*(native(i) if i % 2 else http(i) for i in range(CLIENTS)))
    assert dict(enumerate(texts)) == expected


async def _sse_lines(client: httpx.AsyncClient, i: int, started: asyncio.Event) -> list[str]:
    """The data lines of one endless streaming completion, until the server ends the stream."""
    body = {"prompt": f"endless {i}", "max_tokens": 100000, "stream": True, "ignore_eos": True}
    lines: list[str] = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line.removeprefix("data: "))
                    started.set()
    except httpx.RemoteProtocolError:
        lines.append("<closed>")
    return lines


@pytest.mark.slow
async def test_sigterm_under_mixed_load_ends_every_request_and_exits_0(tmp_path):
    sock = tmp_path / "qllm.sock"
    (tmp_path / "qllm.toml").write_text("[server]\nmax_tokens = 1000000\n[log]\nformat = 'json'\n")
    stderr = open(tmp_path / "stderr", "wb")  # noqa: SIM115 - closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qllm", "serve", "--config", str(tmp_path / "qllm.toml"),
        "--socket", str(sock), "--drain-timeout", "1", "--threads", "1", stderr=stderr,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )  # fmt: skip
    http_path = tmp_path / "qllm-http.sock"
    try:
        async with asyncio.timeout(180):
            while (
                not (sock.exists() and http_path.exists())
                or b"server_ready" not in (tmp_path / "stderr").read_bytes()
            ):
                await asyncio.sleep(0.05)
        native_clients = [AsyncClient(sock, timeout=120) for _ in range(CLIENTS // 2)]
        for client in native_clients:
            await client.connect()
        streams = [
            await c.submit(f"endless {i}", max_tokens=100000, stream=True, ignore_eos=True)
            for i, c in enumerate(native_clients)
        ]
        for s in streams:
            await s.__anext__()  # running
        http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(http_path)), base_url="http://q", timeout=120
        )
        started = [asyncio.Event() for _ in range(CLIENTS // 2)]
        readers = [asyncio.create_task(_sse_lines(http, i, started[i])) for i in range(CLIENTS // 2)]
        async with asyncio.timeout(120):
            for event in started:
                await event.wait()
        proc.send_signal(signal.SIGTERM)
        finals = []
        for s in streams:
            try:
                finals.append(await s.final())
            except ServerShutdown as exc:
                finals.append(exc.result)
        http_lines = await asyncio.gather(*readers)
        await http.aclose()
        for client in native_clients:
            await client.close()
        code = await asyncio.wait_for(proc.wait(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr.close()
    log = (tmp_path / "stderr").read_text()
    assert code == 0, log
    odd = [(f.status, f.error) for f in finals if f.status != "aborted" or f.error.code != "shutdown"]
    assert not odd
    for lines in http_lines:
        # Each stream ends: an error event then [DONE] (cut at the drain), or a closed connection.
        assert lines[-1] in ("[DONE]", "<closed>"), lines[-3:]
        if lines[-1] == "[DONE]":
            assert json.loads(lines[-2])["error"]["code"] == "server_shutting_down"
    assert not sock.exists() and not http_path.exists()
