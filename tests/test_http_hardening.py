"""The HTTP front end against hostile and careless clients on loopback TCP: connection caps by
address with an LS reserve, timeouts while a request arrives and while a connection idles, bounds
on the request line and headers, Content-Type, Host and Origin checks, bounded error messages,
400s (never 5xx) for bad bodies, and one JSON log line per bad request."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager

import httpx
import pytest
from serving import running_server, serve_process
from structlog.testing import capture_logs

from qllm.paths import free_port
from qllm.server.limits import TcpLimits

OPENAI_KEYS = {"message", "type", "code", "param"}


@asynccontextmanager
async def tcp_server(tmp_path, model, **settings):
    """A server with HTTP on a loopback port; yields (running, port)."""
    async with running_server(tmp_path, model, http=True, http_listen="127.0.0.1:0", **settings) as running:
        (url,) = [a for a in running.http if a.startswith("http://")]
        yield running, int(url.rsplit(":", 1)[1])


class Raw:
    """A raw TCP connection speaking HTTP/1.1 by hand (socket calls: what the server sent can be
    read after a write failed)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int) -> Raw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def send(self, data: bytes) -> bool:
        """Write ``data``; False once the server has closed the connection."""
        try:
            await self.loop.sock_sendall(self.sock, data)
        except OSError:
            return False
        return True

    async def more(self) -> bool:
        try:
            chunk = await self.loop.sock_recv(self.sock, 65536)
        except OSError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    async def response(self, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body (by content-length)."""
        async with asyncio.timeout(timeout):
            while b"\r\n\r\n" not in self.buffer:
                assert await self.more(), f"closed without a response: {bytes(self.buffer)!r}"
            end = self.buffer.index(b"\r\n\r\n") + 4
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            size = int(headers.get("content-length", "0"))
            while len(self.buffer) < end + size:
                assert await self.more(), "closed within a response body"
            body = bytes(self.buffer[end : end + size])
            del self.buffer[: end + size]
        return status, headers, body

    async def closed(self, timeout: float = 10) -> bool:
        """Whether the server closes the connection within ``timeout`` s (what it sends is read)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.more():
                    pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def request(
    path: str = "/v1/completions",
    body: bytes | dict | None = None,
    *,
    method: str = "POST",
    host: str = "127.0.0.1",
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    payload = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if payload or method == "POST":
        lines.append(f"Content-Length: {len(payload)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


async def ask(port: int, data: bytes) -> tuple[int, dict[str, str], dict]:
    """One request on a new connection: status, headers and the JSON body."""
    conn = await Raw.open(port)
    try:
        await conn.send(data)
        status, headers, body = await conn.response()
    finally:
        conn.close()
    is_json = headers.get("content-type", "").startswith("application/json")
    return status, headers, json.loads(body) if is_json else {}


def assert_openai_error(body: dict, code: str | None = None) -> str:
    """``body`` is an OpenAI error object with a bounded message; returns the message."""
    error = body["error"]
    assert set(error) == OPENAI_KEYS
    assert isinstance(error["message"], str) and 0 < len(error["message"]) <= 1024
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


COMPLETION = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


# ---------------------------------------------------------------------------- connection caps


async def _open_stream(port: int, priority: str = "be") -> Raw:
    """A connection with a long streaming request whose first event has come."""
    conn = await Raw.open(port)
    body = {"prompt": "a", "max_tokens": 4000, "stream": True, "priority": priority, "ignore_eos": True}
    await conn.send(request(body=body))
    async with asyncio.timeout(60):
        while b"data: " not in conn.buffer:
            assert await conn.more(), "closed before the first event"
    return conn


async def test_tcp_peers_are_capped_by_address_with_a_reserve_for_ls(tmp_path, tiny):
    settings = {"max_tcp_connections_per_address": 4, "ls_reserved_connections": 1}
    async with tcp_server(tmp_path, tiny, **settings) as (running, port):
        streams = [await _open_stream(port) for _ in range(3)]  # the BE slots of the address
        status, headers, body = await ask(port, request(body=COMPLETION))  # into the reserve
        assert status == 503 and headers["connection"] == "close"
        message = assert_openai_error(body, "too_many_connections")
        assert "LS" in message
        ls = await _open_stream(port, priority="ls")  # the reserve takes it
        status, _, body = await ask(port, request(body=COMPLETION))  # past the cap: refused at once
        assert status == 503
        assert_openai_error(body, "too_many_connections")
        for conn in [*streams, ls]:
            conn.close()
        stats = running.server.stats()
    assert stats["tcp_connections_refused"] == 1


async def test_unix_socket_peers_do_not_count_against_tcp_caps(tmp_path, tiny):
    async with tcp_server(tmp_path, tiny, max_tcp_connections_per_address=2, ls_reserved_connections=0) as (
        running,
        port,
    ):
        (unix,) = [a for a in running.http if a.startswith("unix:")]
        transport = httpx.AsyncHTTPTransport(uds=unix.removeprefix("unix:"))
        async with httpx.AsyncClient(transport=transport, base_url="http://qllm") as client:
            replies = await asyncio.gather(*(client.get("/health") for _ in range(4)))
        idle = [await Raw.open(port) for _ in range(2)]
        status, _, _ = await ask(port, request("/health", method="GET", content_type=None))
        for conn in idle:
            conn.close()
    assert [r.status_code for r in replies] == [200] * 4
    assert status == 503  # the two idle TCP sockets fill the address's cap


async def test_tcp_peers_are_refused_when_an_allow_list_is_set(tmp_path, tiny):
    async with tcp_server(tmp_path, tiny, allow_uids=[0]) as (running, port):
        status, _, body = await ask(port, request("/health", method="GET", content_type=None))
        connections = running.server.stats()["tcp_connections"]
    assert status == 403
    assert_openai_error(body, "forbidden")
    assert connections == 0


async def test_idle_connections_are_shed_for_a_new_client(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(TcpLimits, "SHED_AFTER", 0.05)
    settings = {"max_tcp_connections_per_address": 4, "ls_reserved_connections": 0, "http_idle_timeout": 600}
    async with tcp_server(tmp_path, tiny, **settings) as (running, port):
        idle = [await Raw.open(port) for _ in range(4)]
        await asyncio.sleep(0.2)
        status, _, body = await ask(port, request(body=COMPLETION))
        closed = await idle[0].closed(timeout=5)  # the longest idle made room
        for conn in idle:
            conn.close()
        shed = running.server.stats()["tcp_connections_shed"]
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert closed and shed == 1


async def test_many_concurrent_tcp_streams_complete_and_an_ls_request_gets_in(tmp_path, tiny):
    clients = 200
    async with tcp_server(tmp_path, tiny) as (_, port):
        limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=300
        ) as client:

            async def stream(i: int, priority: str = "be") -> tuple[int, str]:
                body = {"prompt": f"client {i}", "max_tokens": 2, "stream": True, "priority": priority}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    text = (await response.aread()).decode()
                return response.status_code, text

            results = await asyncio.gather(*(stream(i) for i in range(clients)), stream(-1, "ls"))
    for status, text in results:
        if status == 200:
            assert text.rstrip().endswith("data: [DONE]")
        else:  # an excess refused in the OpenAI shape (not at the defaults with 200 streams)
            assert status in (429, 503)
            assert_openai_error(json.loads(text))
    assert results[-1][0] == 200  # the LS request
    assert sum(status == 200 for status, _ in results) == clients + 1


async def test_ls_requests_keep_a_reserve_of_live_requests(tmp_path, tiny):
    async with tcp_server(tmp_path, tiny, max_http_requests=4, ls_reserved_requests=1) as (_, port):
        streams = [await _open_stream(port) for _ in range(3)]
        be_status, _, be_body = await ask(port, request(body=COMPLETION))
        ls_status, _, _ = await ask(port, request(body={**COMPLETION, "priority": "ls"}))
        for conn in streams:
            conn.close()
    assert be_status == 429
    assert_openai_error(be_body, "too_many_requests")
    assert ls_status == 200


# ---------------------------------------------------------------------------- timeouts


async def test_idle_connections_close_after_the_idle_timeout(tmp_path, tiny):
    async with tcp_server(tmp_path, tiny, http_idle_timeout=0.3) as (_, port):
        never_asked = await Raw.open(port)
        kept_alive = await Raw.open(port)
        await kept_alive.send(request("/health", method="GET", content_type=None))
        status, _, _ = await kept_alive.response()
        closed = await asyncio.gather(never_asked.closed(), kept_alive.closed())
        never_asked.close()
        kept_alive.close()
        served = await ask(port, request(body=COMPLETION))  # others are still served
    assert status == 200 and closed == [True, True]
    assert served[0] == 200


async def test_slow_headers_and_slow_bodies_get_408_while_others_are_served(tmp_path, tiny):
    settings = {"http_header_timeout": 0.3, "http_body_timeout": 0.3}
    async with tcp_server(tmp_path, tiny, **settings) as (_, port):

        async def slow_headers() -> tuple[int, dict]:
            conn = await Raw.open(port)
            await conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for i in range(100):  # a header line every 0.1 s: 10 s if nothing stopped it
                if not await conn.send(f"X-Slow-{i}: 1\r\n".encode()):
                    break
                await asyncio.sleep(0.1)
            status, _, body = await conn.response()
            assert await conn.closed()
            conn.close()
            return status, json.loads(body)

        async def slow_body() -> tuple[int, dict]:
            conn = await Raw.open(port)
            head = request(body=b"x" * 100)[:-100]
            await conn.send(head)
            for _ in range(100):  # a byte every 0.1 s
                if not await conn.send(b" "):
                    break
                await asyncio.sleep(0.1)
            status, _, body = await conn.response()
            assert await conn.closed()
            conn.close()
            return status, json.loads(body)

        async def others() -> list[int]:
            statuses = []
            for _ in range(3):
                statuses.append((await ask(port, request(body=COMPLETION)))[0])
            return statuses

        with capture_logs() as logs:
            (h_status, h_body), (b_status, b_body), served = await asyncio.gather(
                slow_headers(), slow_body(), others()
            )
    assert h_status == b_status == 408
    assert "headers" in assert_openai_error(h_body, "request_timeout")
    assert "body" in assert_openai_error(b_body, "request_timeout")
    assert served == [200, 200, 200]
    timed_out = [e for e in logs if e["event"] == "http_request" and e["status"] == 408]
    assert len(timed_out) == 2
    assert not [e for e in logs if e["log_level"] == "error"]


# ---------------------------------------------------------------------------- request bounds


async def test_request_line_and_header_bounds(tmp_path, tiny):
    settings = {"max_http_url_bytes": 1024, "max_http_header_bytes": 4096, "max_http_headers": 16}
    async with tcp_server(tmp_path, tiny, **settings) as (_, port):
        long_url = await ask(port, request("/" + "a" * 2000, method="GET", content_type=None))
        big_header = await ask(port, request("/health", method="GET", headers={"X-Big": "b" * (1 << 20)}))
        many = {f"X-H{i}": "1" for i in range(100_000)}
        many_headers = await ask(port, request("/health", method="GET", headers=many))

        # An unterminated header: refused once it outgrows the bound, never buffered whole.
        conn = await Raw.open(port)
        await conn.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
        sent = 0
        while sent < 64 << 20 and await conn.send(b"z" * (1 << 16)):
            sent += 1 << 16
        status, _, body = await conn.response()
        conn.close()
        after = await ask(port, request("/health", method="GET", content_type=None))
    assert long_url[0] == 414
    assert_openai_error(long_url[2], "uri_too_long")
    for status_, _, body_ in (big_header, many_headers):
        assert status_ == 431
        assert_openai_error(body_, "request_header_fields_too_large")
    assert status == 431 and sent < 16 << 20  # the server stopped reading long before 64 MiB
    assert_openai_error(json.loads(body), "request_header_fields_too_large")
    assert after[0] == 200


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_a_body_not_declared_json_gets_415(tmp_path, tiny, content_type):
    async with tcp_server(tmp_path, tiny) as (_, port):
        status, _, body = await ask(port, request(body=COMPLETION, content_type=content_type))
        ok = await ask(port, request(body=COMPLETION, content_type="application/json; charset=utf-8"))
    assert status == 415
    assert_openai_error(body, "unsupported_media_type")
    assert ok[0] == 200


async def test_host_must_be_served_and_origins_are_refused_unless_allowed(tmp_path, tiny):
    async with tcp_server(tmp_path, tiny) as (running, port):
        rebound = await ask(port, request(body=COMPLETION, host=f"evil.example:{port}"))
        local = await ask(port, request(body=COMPLETION, host=f"localhost:{port}"))
        v6 = await ask(port, request("/health", method="GET", host=f"[::1]:{port}"))
        cross = await ask(port, request(body=COMPLETION, headers={"Origin": "http://evil.example"}))
        (unix,) = [a for a in running.http if a.startswith("unix:")]
        transport = httpx.AsyncHTTPTransport(uds=unix.removeprefix("unix:"))
        async with httpx.AsyncClient(transport=transport, base_url="http://any-name") as client:
            unix_reply = await client.get("/health")  # no Host check on the Unix socket
    assert rebound[0] == 400
    assert_openai_error(rebound[2], "invalid_host")
    assert local[0] == 200 and v6[0] == 200
    assert cross[0] == 403
    assert_openai_error(cross[2], "origin_not_allowed")
    assert unix_reply.status_code == 200


async def test_allowed_hosts_and_origins_are_configurable(tmp_path, tiny):
    settings = {"http_allowed_hosts": ["qllm.internal"], "http_allowed_origins": ["http://app.example"]}
    async with tcp_server(tmp_path, tiny, **settings) as (_, port):
        named = await ask(port, request(body=COMPLETION, host="qllm.internal"))
        listen_host = await ask(port, request(body=COMPLETION))  # 127.0.0.1, what http_listen binds
        loopback_name = await ask(port, request(body=COMPLETION, host="localhost"))
        origin = {"Origin": "http://app.example"}
        browser = await ask(port, request(body=COMPLETION, host="qllm.internal", headers=origin))
        preflight_headers = {**origin, "Access-Control-Request-Method": "POST"}
        preflight = await ask(
            port,
            request(method="OPTIONS", host="qllm.internal", content_type=None, headers=preflight_headers),
        )
        other = await ask(port, request(body=COMPLETION, headers={"Origin": "http://other.example"}))
    assert named[0] == listen_host[0] == 200
    assert loopback_name[0] == 400  # the list replaces the loopback names
    assert browser[0] == 200 and browser[1]["access-control-allow-origin"] == "http://app.example"
    assert preflight[0] == 200 and "POST" in preflight[1]["access-control-allow-methods"]
    assert other[0] == 403


# ---------------------------------------------------------------------------- bodies


DEEP = 100_000


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "a", "logprobs": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"messages": [{"role": "user", "content": ['
        + b"{" * 1
        + b'"type": '
        + b"[" * DEEP
        + b"]" * DEEP
        + b"}]}]}",
        b'{"prompt": "a", "top_p": ' + b"[" * DEEP + b"}",
        b'{"prompt": "a", "unknown": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
    ],
    ids=["logprobs", "content-parts", "unterminated", "unknown-field"],
)
async def test_deep_nesting_is_a_400(tmp_path, tiny, body):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    async with tcp_server(tmp_path, tiny) as (_, port):
        status, _, reply = await ask(port, request(path, body=body))
    assert status == 400
    assert_openai_error(reply)


async def test_typed_fields_refuse_what_they_do_not_declare(tmp_path, tiny):
    async with tcp_server(tmp_path, tiny) as (_, port):
        logprobs = await ask(port, request(body={**COMPLETION, "logprobs": {"a": 1}}))
        part = {"role": "user", "content": [{"type": "text", "text": ["not", "a", "string"]}]}
        content = await ask(port, request("/v1/chat/completions", body={"messages": [part]}))
        image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        unsupported = await ask(port, request("/v1/chat/completions", body={"messages": [image]}))
    assert logprobs[0] == content[0] == unsupported[0] == 400
    assert "logprobs" in assert_openai_error(logprobs[2])
    assert "content" in assert_openai_error(content[2])
    assert "text content parts" in assert_openai_error(unsupported[2])


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": 2**70},
        {"seed": -(2**64)},
        {"stop": ["s"] * 100_000},
        {"stop": [f"s{i}" for i in range(17)]},
        {"stop": "x" * 257},
        {"stop": [""]},
    ],
    ids=["seed-high", "seed-low", "stop-100000", "stop-17", "stop-long", "stop-empty"],
)
async def test_out_of_range_values_are_400_not_500(tmp_path, tiny, fields):
    async with tcp_server(tmp_path, tiny) as (_, port):
        status, _, body = await ask(port, request(body={**COMPLETION, **fields}))
        edge = await ask(port, request(body={**COMPLETION, "seed": 2**64 - 1, "stop": ["z" * 256] * 16}))
    assert status == 400
    assert_openai_error(body)
    assert edge[0] == 200


async def test_error_messages_quote_input_within_a_bound(tmp_path, tiny):
    huge = "m" * 100_000
    async with tcp_server(tmp_path, tiny) as (_, port):
        with capture_logs() as logs:
            replies = [
                await ask(port, request(body={**COMPLETION, "model": huge})),
                await ask(port, request(body={**COMPLETION, "priority": huge})),
                await ask(port, request(body={**COMPLETION, huge: 1})),
                await ask(port, request(body=COMPLETION, headers={"X-Qllm-Priority": "p" * 8000})),
                await ask(port, request("/" + "u" * 8000, method="GET", content_type=None)),
                await ask(port, request("/health", body=b"{}", method="DELETE", content_type=None)),
            ]
    statuses = [status for status, _, _ in replies]
    assert statuses == [404, 400, 400, 400, 404, 405]
    for _, _, body in replies:
        assert_openai_error(body)
    paths = [e["path"] for e in logs if e["event"] == "http_request"]
    assert len(paths) == len(replies) and max(len(p) for p in paths) <= 256


# ---------------------------------------------------------------------------- errors and logs


async def test_a_client_leaving_mid_body_is_one_499_line(tmp_path, tiny):
    async with tcp_server(tmp_path, tiny) as (_, port):
        with capture_logs() as logs:
            conn = await Raw.open(port)
            await conn.send(request(body=b"x" * 1000)[:-900])
            await asyncio.sleep(0.2)
            conn.close()
            await asyncio.sleep(0.3)
            served = await ask(port, request(body=COMPLETION))
    lines = [e for e in logs if e["event"] == "http_request"]
    assert [e["status"] for e in lines] == [499, 200]
    assert [e["event"] for e in logs] == ["http_request", "request_finished", "http_request"], logs
    assert served[0] == 200


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\x01: x\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["request-line", "header-name", "chunk-size", "two-lengths", "upgrade-with-body"],
)
async def test_malformed_http_gets_a_json_400(tmp_path, tiny, data):
    async with tcp_server(tmp_path, tiny) as (_, port):
        with capture_logs() as logs:
            status, headers, body = await ask(port, data)
    assert status == 400 and headers["content-type"] == "application/json"
    assert_openai_error(body)
    assert len(logs) <= 3 and all(e["log_level"] != "error" for e in logs)


@pytest.mark.slow
async def test_every_log_line_is_json_with_at_most_three_per_bad_request(tmp_path):
    port = free_port()
    config = f"[server]\nhttp_listen = '127.0.0.1:{port}'\nhttp_body_timeout = 0.5\nhttp_header_timeout = 0.5"
    bad = [
        b"GARBAGE\r\n\r\n",
        request(body=b'{"prompt": "a", "logprobs": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
        request(body={**COMPLETION, "seed": 2**70}),
        request(body={**COMPLETION, "stop": ["s"] * 100_000}),
        request(body=COMPLETION, content_type="text/plain"),
        request(body=COMPLETION, host="evil.example"),
        request(body=COMPLETION, headers={"Origin": "http://evil.example"}),
        request("/" + "u" * 8000, method="GET", content_type=None),
        request("/health", method="GET", headers={"X-Big": "b" * 100_000}),
        request(body={**COMPLETION, "model": "m" * 100_000}),
    ]
    with serve_process(tmp_path, config) as server:
        for data in bad:
            status, _, body = await ask(port, data)
            assert 400 <= status < 500, (status, data[:60])
            assert_openai_error(body)
        conn = await Raw.open(port)  # leaves mid-body
        await conn.send(request(body=b"x" * 1000)[:-900])
        await asyncio.sleep(0.2)
        conn.close()
        slow = await Raw.open(port)  # times out mid-body
        await slow.send(request(body=b"x" * 1000)[:-900])
        await slow.response()
        slow.close()
        await asyncio.sleep(0.5)
        lines = server.stderr.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    ready = next(i for i, r in enumerate(records) if r["event"] == "server_ready")
    after = records[ready + 1 :]  # what the bad requests logged
    requests = [r for r in after if r["event"] == "http_request"]
    assert len(requests) == len(bad) + 2
    assert {408, 499} <= {r["status"] for r in requests}
    assert len(after) <= 3 * (len(bad) + 2)
    assert not [r for r in after if r["level"] in ("warning", "error")]
    assert max(len(r.get("path") or "") for r in requests) <= 256


async def test_an_exception_in_a_handler_is_a_json_500_and_one_failure_line(tmp_path, tiny):
    async with tcp_server(tmp_path, tiny) as (running, port):

        def broken(rid):
            raise RuntimeError("health is broken")

        running.server.health = broken
        with capture_logs() as logs:
            status, _, body = await ask(port, request("/health", method="GET", content_type=None))
            after = await ask(port, request(body=COMPLETION))
    assert status == 500
    assert_openai_error(body, "internal_error")
    assert "broken" not in body["error"]["message"]
    events = [e["event"] for e in logs if e["event"] != "request_finished"]
    assert events == ["http_request_failed", "http_request", "http_request"]
    assert after[0] == 200


def test_library_log_lines_go_through_structlog_as_json():
    import io
    import logging

    import structlog

    from qllm.logging import configure

    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure("info", "json", stream=out)
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application\n")
        logging.getLogger("uvicorn.error").info("chatty")  # libraries' info lines stay out
    finally:
        root.handlers[:], root.level = saved
        logging.captureWarnings(False)
        structlog.reset_defaults()
    lines = out.getvalue().splitlines()
    records = [json.loads(line) for line in lines]  # one JSON line each, traceback included
    assert [(r["event"], r["logger"], r["level"]) for r in records] == [
        ("library_log", "uvicorn.error", "warning"),
        ("library_log", "uvicorn.error", "error"),
    ]
    assert records[0]["message"] == "Invalid HTTP request received."
    assert "boom" in json.dumps(records[1]["exception"])


@pytest.mark.parametrize(
    "setting",
    [
        {"http_idle_timeout": 0},
        {"http_header_timeout": 7200},
        {"http_body_timeout": -1},
        {"max_http_headers": 100_000},
        {"max_http_header_bytes": 10},
        {"max_tcp_connections": 0},
        {"http_allowed_hosts": [""]},
    ],
)
def test_http_limits_are_bounded_in_the_config(setting, tmp_path, monkeypatch):
    import qllm.server.config as config

    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "none.toml")
    with pytest.raises(config.ConfigError, match=next(iter(setting))):
        config.load_config(None, {"server": setting})


def test_the_ls_reserve_is_at_most_half_of_each_cap():
    from qllm.server.limits import reserve

    assert (reserve(64, 1024), reserve(64, 1), reserve(16, 4), reserve(0, 8)) == (64, 0, 2, 0)
