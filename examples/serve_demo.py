"""Start `qllm serve` on a temporary socket, run a short mixed LS/BE workload through the client,
print a JSON summary, then stop the server with SIGTERM (as systemd would).

    python examples/serve_demo.py                 # the embedded tiny model
    python examples/serve_demo.py --model small-random --policy fcfs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
from pathlib import Path

from qllm.client import AsyncClient


async def wait_ready(notify: socket.socket, server: asyncio.subprocess.Process) -> None:
    """Wait for READY=1 on our sd_notify socket, as systemd does for Type=notify services."""
    loop = asyncio.get_running_loop()
    exited = asyncio.ensure_future(server.wait())
    try:
        while True:
            received = asyncio.ensure_future(loop.sock_recv(notify, 4096))
            await asyncio.wait([received, exited], return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                received.cancel()
                raise SystemExit(f"qllm serve exited with {server.returncode} before it was ready")
            if b"READY=1" in received.result():
                return
    finally:
        exited.cancel()


def summary(results: list) -> dict:
    ttft = [r.timings.ttft for r in results if r.timings.ttft is not None]
    return {
        "requests": len(results),
        "ttft_ms_median": round(statistics.median(ttft) * 1e3, 2),
        "ttft_ms_max": round(max(ttft) * 1e3, 2),
        "turnaround_ms_median": round(statistics.median(r.timings.turnaround for r in results) * 1e3, 2),
        "preemptions": sum(r.preemptions for r in results),
        "tokens": sum(r.usage.completion_tokens for r in results),
    }


async def workload(path: Path, be_requests: int, ls_requests: int) -> dict:
    async with AsyncClient(path, timeout=600) as client:
        be = [
            asyncio.ensure_future(
                client.generate(f"Document {i} says", max_tokens=24, priority="be", ignore_eos=True)
            )
            for i in range(be_requests)
        ]
        ls = []
        for i in range(ls_requests):  # LS requests arrive one by one while the BE batch runs
            ls.append(await client.generate(f"Question {i}:", max_tokens=8, priority="ls", ignore_eos=True))
        be_results = await asyncio.gather(*be)
        async with client.stream("Once upon a time", max_tokens=12, priority="ls") as stream:
            streamed = [chunk.text async for chunk in stream]
        stats = await client.stats()
    return {
        "model": client.welcome.model,
        "policy": client.welcome.policy,
        "ls": summary(ls),
        "be": summary(be_results),
        "stream_chunks": len(streamed),
        "memory": stats["memory"],
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--policy", default="priority-aging")
    parser.add_argument("--be", type=int, default=8, help="best-effort requests (default 8)")
    parser.add_argument("--ls", type=int, default=6, help="latency-sensitive requests (default 6)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qllm-demo-") as tmp:
        path = Path(tmp) / "qllm.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(Path(tmp) / "notify"))
        notify.setblocking(False)
        env = {**os.environ, "NOTIFY_SOCKET": str(Path(tmp) / "notify")}
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qllm", "serve", "--socket", str(path), "--model", args.model,
            "--policy", args.policy, "--log-level", "warning", env=env,
        )  # fmt: skip
        try:
            await wait_ready(notify, server)
            report = await workload(path, args.be, args.ls)
        finally:
            if server.returncode is None:
                server.send_signal(signal.SIGTERM)  # drain, then exit 0
            code = await server.wait()
            notify.close()
    report["server_exit_code"] = code
    print(json.dumps(report, indent=2))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
