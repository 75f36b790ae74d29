"""LS TTFT through the smg gateway, alone and under a BE flood, with and without body priority.

    QLLM_GATEWAY=.venv-gateway/bin/smg .venv/bin/python scripts/gateway_isolation.py [-n 15] [--out FILE]
    .venv/bin/python scripts/gateway_isolation.py --gateway http://127.0.0.1:8000   # a running gateway

Without ``--gateway`` it starts ``--replicas`` ``qllm serve --model tiny`` processes (one thread
each, ``max_batch`` ``--max-batch``) and smg in front of them with ``--policy round_robin``, as in
docs/scaling.md. It times the first token of ``-n`` short streaming probes sent one at a time:
alone, then while ``--flood`` streaming BE completions of ``--be-tokens`` tokens (``ignore_eos``,
each sent again when it ends) keep the replicas busy. By default the flood fills every replica's
batch (8 streams, 4 on each of 2 replicas at ``max_batch`` 4). Each round sends one probe with body
``"priority": "ls"`` and one with no priority (served as BE: the control). Prints JSON with the
median TTFTs and the ratios flooded/alone for both; ``--out`` writes it to a file too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import serve_process

from qllm.paths import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def cluster(args: argparse.Namespace) -> Iterator[str]:
    """``args.replicas`` replicas and smg in front of them; yields the gateway's URL."""
    smg = shutil.which(args.gateway_bin)
    if smg is None:
        raise SystemExit(
            f"no gateway at {args.gateway_bin}: run `make gateway`, set QLLM_GATEWAY or pass --gateway"
        )
    engine = f"[engine]\nmax_batch = {args.max_batch}\n" if args.max_batch else ""  # 0: qllm's default
    with ExitStack() as stack:
        workers = []
        for _ in range(args.replicas):
            port = free_port()
            config = f"{engine}[server]\nhttp_listen = '127.0.0.1:{port}'"
            stack.enter_context(serve_process(Path(tempfile.mkdtemp(prefix="qllm-replica-")), config))
            workers.append(f"http://127.0.0.1:{port}")
        port, metrics_port = free_port(), free_port()
        argv = [smg, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
                "--policy", "round_robin", "--disable-tokenizer-autoload",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), "--log-level", "warn"]  # fmt: skip
        gateway = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while not ready(url, args.replicas):
                if gateway.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the gateway did not register the replicas")
                time.sleep(0.2)
            yield url
        finally:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()


def ready(url: str, replicas: int) -> bool:
    try:
        workers = httpx.get(f"{url}/workers", timeout=5).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return len(workers) == replicas and all(w["is_healthy"] and w["status"] == "ready" for w in workers)


def body(args: argparse.Namespace, prompt: str, max_tokens: int, priority: str | None) -> dict:
    request = {
        "model": args.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    if priority is not None:
        request["priority"] = priority
    return request


def ttft(client: httpx.Client, url: str, request: dict) -> float:
    """Seconds from sending the request to its first token; reads the stream to its end."""
    started = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/completions", json=request) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if (
                first is None
                and line.startswith("data: {")
                and json.loads(line[6:])["choices"][0].get("text")
            ):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("a probe streamed no token")
    return first


class Flood:
    """``args.flood`` streaming BE completions, each sent again when it ends, until closed. They run
    in a child process, so that reading them does not hold the probes' interpreter."""

    def __init__(self, args: argparse.Namespace, url: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self.stop = ctx.Event()
        self.tokens = ctx.Array("q", args.flood, lock=False)
        self.requests = ctx.Array("q", args.flood, lock=False)
        self.errors = ctx.Value("q", 0, lock=False)
        self.process = ctx.Process(target=self._run, args=(args, url), daemon=True)
        self.process.start()

    def _run(self, args: argparse.Namespace, url: str) -> None:
        threads = [threading.Thread(target=self._stream, args=(args, url, n)) for n in range(args.flood)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _stream(self, args: argparse.Namespace, url: str, n: int) -> None:
        with httpx.Client(timeout=600) as client:
            while not self.stop.is_set():
                self.requests[n] += 1
                request = body(args, f"Once upon a time {n}", args.be_tokens, None)
                try:
                    with client.stream("POST", f"{url}/v1/completions", json=request) as reply:
                        reply.raise_for_status()
                        for line in reply.iter_lines():
                            if self.stop.is_set():
                                return  # closing the stream cancels the request
                            if line.startswith("data: {"):
                                self.tokens[n] += 1
                except httpx.HTTPError:
                    self.errors.value += 1
                    time.sleep(0.5)

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.tokens):
            if time.monotonic() > deadline or not self.process.is_alive():
                raise SystemExit(
                    f"the flood did not start: tokens {list(self.tokens)}, errors {self.errors.value}"
                )
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()


def probe_rounds(args: argparse.Namespace, url: str, label: str) -> dict[str, list[float]]:
    """``args.n`` rounds of one LS and one BE probe; the order alternates, so that with round
    robin over two replicas each class lands on both."""
    times: dict[str, list[float]] = {"ls": [], "be": []}
    with httpx.Client(timeout=120) as client:
        for n in range(args.n):
            order = ("ls", "be") if n % 2 == 0 else ("be", "ls")
            for cls in order:
                request = body(
                    args, f"Quick question {label} {n}", args.probe_tokens, "ls" if cls == "ls" else None
                )
                times[cls].append(ttft(client, url, request))
                time.sleep(args.pause)
    return times


def measure(args: argparse.Namespace, url: str) -> dict:
    with httpx.Client(timeout=120) as client:
        for n in range(4):  # warm up both replicas and the gateway's connections
            ttft(client, url, body(args, f"warm up {n}", args.probe_tokens, None))
    alone = probe_rounds(args, url, "alone")
    flood = Flood(args, url)
    try:
        flood.wait_started()
        tokens_before = sum(flood.tokens)
        flooded = probe_rounds(args, url, "flooded")
        flood_tokens = sum(flood.tokens) - tokens_before
    finally:
        flood.close()
    median = {cls: {"alone": statistics.median(alone[cls]), "flooded": statistics.median(flooded[cls])}
              for cls in ("ls", "be")}  # fmt: skip
    return {
        "command": " ".join(["scripts/gateway_isolation.py", *sys.argv[1:]]),
        "model": args.model,
        "gateway": args.gateway or f"smg, {args.replicas} replicas, round_robin",
        "max_batch": None if args.gateway else args.max_batch or 32,
        "n": args.n,
        "flood": args.flood,
        "be_tokens": args.be_tokens,
        "probe_tokens": args.probe_tokens,
        "flood_tokens_during_probes": flood_tokens,
        "flood_requests": sum(flood.requests),
        "flood_errors": flood.errors.value,
        "ttft_median_s": median,
        "ratio_flooded_over_alone": {cls: median[cls]["flooded"] / median[cls]["alone"] for cls in median},
        "ttft_s": {"alone": alone, "flooded": flooded},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", help="URL of a running gateway (default: start replicas and smg)")
    parser.add_argument(
        "--gateway-bin", default=os.environ.get("QLLM_GATEWAY") or str(ROOT / ".venv-gateway/bin/smg")
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--max-batch", type=int, default=4, help="the replicas' max_batch (0: qllm's default, 32)"
    )
    parser.add_argument(
        "--model", default="tiny", help="the model name in the requests (replicas serve tiny)"
    )
    parser.add_argument(
        "-n", type=int, default=15, help="probes per class and phase (the median is reported)"
    )
    parser.add_argument("--flood", type=int, default=8, help="concurrent streaming BE completions")
    parser.add_argument("--be-tokens", type=int, default=200, help="max_tokens of each flood request")
    parser.add_argument("--probe-tokens", type=int, default=4, help="max_tokens of each probe")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between probes")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    if args.gateway:
        result = measure(args, args.gateway.rstrip("/"))
    else:
        with cluster(args) as url:
            result = measure(args, url)
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
