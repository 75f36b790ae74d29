"""The HTTP front end of ``qllm serve``, driven by the official ``openai`` client (over an httpx
transport on the Unix socket, and on loopback TCP), raw httpx, and curl."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import running_server
from structlog.testing import capture_logs


def _uds(running) -> str:
    (unix,) = [a for a in running.http if a.startswith("unix:")]
    return unix.removeprefix("unix:")


def _openai(running, **kw) -> openai.AsyncOpenAI:
    """The official client on the server's HTTP Unix socket."""
    transport = httpx.AsyncHTTPTransport(uds=_uds(running))
    http_client = httpx.AsyncClient(transport=transport)
    return openai.AsyncOpenAI(
        base_url="http://qllm/v1", api_key="unused", http_client=http_client, max_retries=0, **kw
    )


def _raw(running) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=_uds(running)), base_url="http://qllm")


async def _idle(engine) -> None:
    """Wait (bounded) until the engine has no live request."""
    async with asyncio.timeout(60):
        while any(engine.stats()["live"][c] for c in ("ls", "be")):
            await asyncio.sleep(0.01)


async def test_completion_matches_the_in_process_engine(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running:
        expected = await running.engine.generate("Hello there", max_tokens=6, temperature=0.8, seed=7)
        async with _openai(running) as client:
            reply = await client.completions.create(
                model="tiny", prompt="Hello there", max_tokens=6, temperature=0.8, seed=7
            )
            ids = await client.completions.create(
                model="tiny", prompt=list(expected.token_ids[:1]), max_tokens=2, temperature=0
            )
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == 6
    assert reply.object == "text_completion"
    assert ids.usage.prompt_tokens == 1


async def test_streamed_completion_equals_the_full_one_and_ends_with_done(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running:
        async with _openai(running) as client:
            full = await client.completions.create(model="tiny", prompt="Once", max_tokens=5, temperature=0)
            stream = await client.completions.create(
                model="tiny",
                prompt="Once",
                max_tokens=5,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            events = [event async for event in stream]
        async with _raw(running) as raw:
            body = {"model": "tiny", "prompt": "Once", "max_tokens": 2, "stream": True}
            response = await raw.post("/v1/completions", json=body)
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == full.choices[0].text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage.completion_tokens == 5
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")


async def test_chat_uses_the_template_and_streams(tmp_path, chat_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    async with running_server(tmp_path, chat_model, http=True) as running:
        prompt = "<|endoftext|>system: Be brief.\n<|endoftext|>user: Hi\nassistant:"
        expected = await running.engine.generate(prompt, max_tokens=4, temperature=0)
        async with _openai(running) as client:
            reply = await client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=4, temperature=0
            )
            stream = await client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=4, temperature=0, stream=True
            )
            deltas = [c.choices[0].delta async for c in stream]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected.text


async def test_models_health_and_priority(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running:
        clients = []
        submit = running.engine.submit

        def recording_submit(*args, **kw):
            clients.append(kw["spec"].client)
            return submit(*args, **kw)

        running.engine.submit = recording_submit
        async with _openai(running) as client:
            models = await client.models.list()
            ls = await client.completions.create(
                model="tiny", prompt="a", max_tokens=1, extra_body={"priority": "ls"}
            )
            ranked = await client.completions.create(
                model="tiny", prompt="a", max_tokens=1, extra_headers={"X-Qllm-Priority": "ls"}
            )
        async with _raw(running) as raw:
            health = await raw.get("/health")
        stats = running.engine.stats()["metrics"]
    assert [m.id for m in models.data] == ["tiny"]
    assert health.json()["status"] == "ok"
    assert ls.usage.completion_tokens == ranked.usage.completion_tokens == 1
    assert sum(stats["ls"]["requests"].values()) == 2  # the body field and the header both chose LS
    assert len(clients) == 2 and clients[0] == clients[1] != "http"  # shared fairly per connection


async def test_an_error_per_status_code(tmp_path, tiny):
    async with (
        running_server(tmp_path, tiny, http=True, max_prompt_tokens=8, max_http_requests=1) as running,
        _openai(running) as client,
    ):
        with pytest.raises(openai.BadRequestError, match="n=2") as bad:
            await client.completions.create(model="tiny", prompt="a", n=2)
        with pytest.raises(openai.BadRequestError, match="unknown field"):
            await client.completions.create(model="tiny", prompt="a", extra_body={"nonsense": 1})
        with pytest.raises(openai.NotFoundError, match="not served here"):
            await client.completions.create(model="gpt-4", prompt="a")
        with pytest.raises(openai.APIStatusError, match="exceeds the limit") as too_long:
            await client.completions.create(model="tiny", prompt=list(range(1, 20)))
        with pytest.raises(openai.APIStatusError, match="request body over") as too_big:
            await client.completions.create(model="tiny", prompt="a" * (1 << 21))
        # One request is live (streaming, unread): the limit of 1 answers the next with 429.
        stream = await client.completions.create(model="tiny", prompt="a", max_tokens=64, stream=True)
        with pytest.raises(openai.RateLimitError, match="live HTTP requests"):
            await client.completions.create(model="tiny", prompt="a", max_tokens=1)
        await stream.close()
        await _idle(running.engine)
        running.server.draining = True  # as after SIGTERM
        try:
            with pytest.raises(openai.InternalServerError, match="shutting down") as draining:
                await client.completions.create(model="tiny", prompt="a", max_tokens=1)
        finally:
            running.server.draining = False
    assert bad.value.status_code == 400
    assert bad.value.body["code"] == "unsupported_parameter"
    assert too_long.value.status_code == too_big.value.status_code == 413
    assert draining.value.status_code == 503


async def test_disconnect_mid_stream_cancels_the_request(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running:
        async with _raw(running) as raw:
            body = {"prompt": "a", "max_tokens": 4000, "stream": True, "temperature": 0}
            async with raw.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # one token came: leave with the request live
        await _idle(running.engine)
        metrics = running.engine.stats()["metrics"]["be"]
        memory = running.engine.stats()["memory"]
    assert metrics["requests"]["aborted"] == 1
    assert metrics["generated_tokens"] < 4000
    assert memory["resident_bytes"] == 0


async def test_tcp_loopback_with_the_openai_client(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True, http_listen="127.0.0.1:0") as running:
        (url,) = [a for a in running.http if a.startswith("http://")]
        assert url.startswith("http://127.0.0.1:")
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            reply = await client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3


async def test_metrics_parse_with_prometheus_client(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running:
        await running.engine.generate("Hello", max_tokens=2, priority="ls")
        async with _raw(running) as raw:
            response = await raw.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in (
        "qllm_ttft_seconds",
        "qllm_queue_seconds",
        "qllm_preemption_latency_seconds",
        "qllm_turnaround_seconds",
        "qllm_request_preemptions",
        "qllm_request_tokens",
        "qllm_requests",
        "qllm_preemptions",
        "qllm_generated_tokens",
        "qllm_prompt_tokens",
        "qllm_live_requests",
        "qllm_memory_resident_bytes",
        "qllm_server_connections",
    ):
        assert name in families, name
    # Counts that only go up are counters (``_total``); a duration is in ``_seconds``.
    for name in (
        "qllm_kernel_batches",
        "qllm_kernel_ops",
        "qllm_memory_offloads",
        "qllm_server_connections_accepted",
    ):
        assert families[name].type == "counter", name
        assert [s.name for s in families[name].samples] == [f"{name}_total"]
    assert families["qllm_kernel_batches"].samples[0].value > 0
    assert families["qllm_server_uptime_seconds"].type == "gauge"
    assert not [name for name in families if name.endswith("_s")]
    ttft = {
        s.labels.get("le"): s.value
        for s in families["qllm_ttft_seconds"].samples
        if s.labels["class"] == "ls"
    }
    assert ttft["+Inf"] == 1


async def test_one_log_line_per_request_without_the_prompt(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running, _raw(running) as raw:
        with capture_logs() as logs:
            body = {"prompt": "secret words", "max_tokens": 1}
            response = await raw.post("/v1/completions", json=body, headers={"X-Request-Id": "abc"})
            await raw.get("/nowhere")
    lines = [entry for entry in logs if entry["event"] == "http_request"]
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("POST", "/v1/completions", 200),
        ("GET", "/nowhere", 404),
    ]
    assert lines[0]["request_id"] == "abc" == response.headers["x-request-id"]
    assert lines[0]["duration_ms"] >= 0
    assert "secret" not in json.dumps(logs, default=str)


async def test_unix_socket_peer_not_allowed_is_refused(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True, allow_uids=[os.getuid() + 1]) as running:
        raw = _raw(running)
        response = await raw.get("/health")
        await raw.aclose()
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_on_the_unix_socket(tmp_path, tiny):
    async with running_server(tmp_path, tiny, http=True) as running:
        body = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0})
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--unix-socket", _uds(running), "http://localhost/v1/completions",
            "-H", "content-type: application/json", "-d", body,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await curl.communicate()
    assert curl.returncode == 0
    reply = json.loads(out)
    assert reply["usage"]["completion_tokens"] == 2
    assert reply["choices"][0]["finish_reason"] == "length"
