"""Two ``qllm serve`` replicas behind smg, the gateway ``make gateway`` installs (docs/scaling.md):
completions through it reach both replicas, and the priority and tenant a request carries in its
body reach the replica that serves it. smg forwards only its own list of headers, not the
``X-Qllm-*`` ones; the last test holds the docs to that.

Skipped without the gateway: ``make gateway`` builds ``.venv-gateway/bin/smg``, or ``QLLM_GATEWAY``
names an ``smg`` executable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import serve_process

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = os.environ.get("QLLM_GATEWAY") or str(ROOT / ".venv-gateway" / "bin" / "smg")
REPLICAS = 2

pytestmark = pytest.mark.slow


def gateway_binary() -> str:
    found = shutil.which(GATEWAY)
    if found is None:
        pytest.skip(f"no gateway at {GATEWAY}: run `make gateway`, or set QLLM_GATEWAY to an smg executable")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class Cluster:
    gateway: str  # http://127.0.0.1:PORT
    replicas: list[str]
    log: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key="unused", max_retries=0, timeout=60)


def _workers_ready(url: str, gateway: subprocess.Popen, log: Path) -> bool:
    if gateway.poll() is not None:
        raise AssertionError(f"the gateway exited ({gateway.returncode}):\n{log.read_text()[-4000:]}")
    try:
        workers = httpx.get(f"{url}/workers", timeout=5).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return len(workers) == REPLICAS and all(w["is_healthy"] and w["status"] == "ready" for w in workers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    smg = gateway_binary()
    with ExitStack() as stack:
        replicas = []
        for n in range(REPLICAS):
            port = free_port()
            stack.enter_context(
                serve_process(
                    tmp_path_factory.mktemp(f"replica{n}"), f"[server]\nhttp_listen = '127.0.0.1:{port}'"
                )
            )
            replicas.append(f"http://127.0.0.1:{port}")
        port, metrics_port = free_port(), free_port()
        log = tmp_path_factory.mktemp("gateway") / "smg.log"
        argv = [smg, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *replicas,
                "--policy", "round_robin", "--disable-tokenizer-autoload",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), "--log-level", "warn"]  # fmt: skip
        with open(log, "wb") as out:
            gateway = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _workers_ready(url, gateway, log), "the gateway to register both replicas")
            yield Cluster(url, replicas, log)
        finally:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()


@dataclass(frozen=True)
class Counts:
    """One replica's finished requests by class and accepted requests by tenant (/metrics)."""

    by_class: dict[str, float]
    by_tenant: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.by_class.values())


def counts(replica: str) -> Counts:
    text = httpx.get(f"{replica}/metrics", timeout=10).text
    by_class: dict[str, float] = {}
    by_tenant: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qllm_requests_total":
                cls = sample.labels["class"]
                by_class[cls] = by_class.get(cls, 0.0) + sample.value
            elif sample.name == "qllm_tenant_requests_total":
                by_tenant[sample.labels["tenant"]] = sample.value
    return Counts(by_class, by_tenant)


def grew(before: list[Counts], cluster: Cluster, total: int) -> list[tuple[Counts, Counts]]:
    """(before, after) per replica once the replicas together finished ``total`` more requests."""
    after: list[Counts] = []

    def done() -> bool:
        after[:] = [counts(r) for r in cluster.replicas]
        return sum(a.total - b.total for b, a in zip(before, after)) >= total

    wait_for(done, f"{total} requests to finish on the replicas", timeout=10)
    return list(zip(before, after))


def snapshot(cluster: Cluster) -> list[Counts]:
    return [counts(r) for r in cluster.replicas]


def test_completions_through_the_gateway_reach_every_replica(cluster):
    before = snapshot(cluster)
    with cluster.client() as client:
        for n in range(3):
            reply = client.completions.create(model="tiny", prompt=f"Hello {n}", max_tokens=2)
            assert reply.choices[0].finish_reason in ("length", "stop")
        with client.completions.create(model="tiny", prompt="Hello", max_tokens=2, stream=True) as stream:
            assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in stream)
    # smg sends each replica the host of its worker URL, whatever Host the client gave it
    reply = httpx.post(
        f"{cluster.gateway}/v1/completions",
        json={"model": "tiny", "prompt": "Hello", "max_tokens": 2},
        headers={"Host": "gateway.example"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text

    pairs = grew(before, cluster, 5)
    served = [a.total - b.total for b, a in pairs]
    assert sum(served) == 5 and all(n >= 2 for n in served), served  # round robin: 2 and 3


def test_the_body_priority_reaches_the_replica_that_serves_it(cluster):
    before = snapshot(cluster)
    with cluster.client() as client:
        for n in range(REPLICAS):  # round robin: one on each replica
            client.completions.create(
                model="tiny", prompt=f"Hi {n}", max_tokens=2, extra_body={"priority": "ls"}
            )

    pairs = grew(before, cluster, REPLICAS)
    for b, a in pairs:
        assert a.by_class.get("ls", 0) - b.by_class.get("ls", 0) == a.total - b.total == 1
        assert a.by_class.get("be", 0) == b.by_class.get("be", 0)


def test_the_body_tenant_and_user_reach_the_replica_that_serves_them(cluster):
    before = snapshot(cluster)
    with cluster.client() as client:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"tenant": "team-a"})
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, user="team-b")

    pairs = grew(before, cluster, 2)
    for tenant in ("team-a", "team-b"):
        accepted = [a.by_tenant.get(tenant, 0) - b.by_tenant.get(tenant, 0) for b, a in pairs]
        assert sorted(accepted) == [0, 1], (tenant, accepted)  # on one replica, once


def test_smg_does_not_forward_the_qllm_headers_so_clients_use_the_body_fields(cluster):
    before = snapshot(cluster)
    with cluster.client() as client:
        client.completions.create(
            model="tiny",
            prompt="Hi",
            max_tokens=2,
            extra_headers={"X-Qllm-Priority": "ls", "X-Qllm-Tenant": "team-h"},
        )

    pairs = grew(before, cluster, 1)
    assert sum(a.by_class.get("ls", 0) - b.by_class.get("ls", 0) for b, a in pairs) == 0  # served as BE
    assert sum(a.by_tenant.get("default", 0) - b.by_tenant.get("default", 0) for b, a in pairs) == 1
    assert all("team-h" not in a.by_tenant for _, a in pairs)
