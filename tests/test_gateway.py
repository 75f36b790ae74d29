"""Two ``qllm serve`` replicas behind smg, the gateway ``make gateway`` installs (docs/scaling.md):
completions through it reach both replicas, and the priority and tenant a request carries in its
body reach the replica that serves it. smg forwards only its own list of headers, not the
``X-Qllm-*`` ones; a test holds the docs to that. Through the gateway, each replica's policy
still runs an LS request ahead of the BE flood it shares the replica with, and a client that
disconnects from the gateway cancels its request on the replica.

Skipped without the gateway: ``make gateway`` builds ``.venv-gateway/bin/smg``, or ``QLLM_GATEWAY``
names an ``smg`` executable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
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

from qllm.paths import free_port

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = os.environ.get("QLLM_GATEWAY") or str(ROOT / ".venv-gateway" / "bin" / "smg")
REPLICAS = 2

pytestmark = pytest.mark.slow


def gateway_binary() -> str:
    found = shutil.which(GATEWAY)
    if found is None:
        pytest.skip(f"no gateway at {GATEWAY}: run `make gateway`, or set QLLM_GATEWAY to an smg executable")
    return found


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


BE_FLOOD = 8  # streaming BE completions, round robin: 4 on each replica
BE_TOKENS = 3000  # each runs to length (ignore_eos): far longer than one short LS request
LS_TOKENS = 4


@dataclass
class Sample:
    """One replica's figures from /metrics that show the policy at work."""

    live_be: float  # BE requests waiting, running or suspended
    preemptions_be: float  # preemptions of finished BE requests
    ls_done: float  # finished LS requests
    be_done: float  # finished BE requests


def sample(replica: str) -> Sample:
    text = httpx.get(f"{replica}/metrics", timeout=10).text
    live_be = preemptions_be = ls_done = be_done = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            cls = s.labels.get("class")
            if s.name == "qllm_live_requests" and cls == "be":
                live_be += s.value
            elif s.name == "qllm_preemptions_total" and cls == "be":
                preemptions_be += s.value
            elif s.name == "qllm_requests_total":
                if cls == "ls":
                    ls_done += s.value
                elif cls == "be":
                    be_done += s.value
    return Sample(live_be, preemptions_be, ls_done, be_done)


class BeStream:
    """A long streaming BE completion through the gateway, read in a thread until told to stop."""

    def __init__(self, gateway: str, n: int) -> None:
        self.first_token = threading.Event()
        self.finished = threading.Event()  # the stream ended (finish_reason or end of body)
        self.stop = threading.Event()
        self.tokens = 0
        self.error: BaseException | None = None
        body = {"model": "tiny", "prompt": f"Once upon a time {n}", "max_tokens": BE_TOKENS,
                "ignore_eos": True, "stream": True}  # fmt: skip
        self.thread = threading.Thread(target=self._run, args=(gateway, body), daemon=True)
        self.thread.start()

    def started(self) -> bool:
        return self.first_token.is_set() or self.finished.is_set()

    def _run(self, gateway: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{gateway}/v1/completions", json=body, timeout=120) as reply:
                reply.raise_for_status()
                for line in reply.iter_lines():
                    if self.stop.is_set():
                        return  # leaving the block closes the connection: the request is cancelled
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[len("data: ") :])["choices"][0]
                    if choice.get("text"):
                        self.tokens += 1
                        self.first_token.set()
                    if choice.get("finish_reason"):
                        break
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.finished.set()


def test_an_ls_request_through_the_gateway_overtakes_a_be_flood_on_its_replica(cluster):
    """Body ``priority: "ls"`` through smg: the replica's policy runs the LS request ahead of the
    BE requests it shares the replica with, which are still running when it finishes."""
    before = [sample(r) for r in cluster.replicas]
    flood = [BeStream(cluster.gateway, n) for n in range(BE_FLOOD)]
    try:
        for n, stream in enumerate(flood):
            wait_for(stream.started, f"BE {n}'s first token", 120)
            assert stream.error is None and not stream.finished.is_set(), (n, stream.error)

        reply = httpx.post(
            f"{cluster.gateway}/v1/completions",
            json={
                "model": "tiny",
                "prompt": "Quick",
                "max_tokens": LS_TOKENS,
                "ignore_eos": True,
                "priority": "ls",
            },
            timeout=120,
        )
        running = [not s.finished.is_set() for s in flood]  # right when the LS reply came back
        during = [sample(r) for r in cluster.replicas]
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == LS_TOKENS
        assert all(running), running  # every BE stream, on both replicas, was still going

        served = [n for n, (b, d) in enumerate(zip(before, during)) if d.ls_done > b.ls_done]
        assert len(served) == 1, (before, during)
        replica = served[0]
        assert during[replica].live_be > 0, during[replica]  # BE work was live beside it
        assert during[replica].be_done == before[replica].be_done  # none of it had finished
    finally:
        for stream in flood:
            stream.stop.set()
        for stream in flood:
            stream.thread.join(120)

    # Closing the streams at the gateway cancels the BE requests on the replicas: they finish as
    # aborted, and the preemptions the LS request caused then count on the replica that served it.
    after: list[Sample] = []

    def flood_done() -> bool:
        after[:] = [sample(r) for r in cluster.replicas]
        return sum(a.be_done - b.be_done for b, a in zip(before, after)) >= BE_FLOOD

    wait_for(flood_done, "the BE flood to end on the replicas", timeout=120)
    assert after[replica].preemptions_be > before[replica].preemptions_be, (before[replica], after[replica])
