"""``qllm demo``: start ``qllm serve``, run a mixed LS/BE workload through the client, stop it.

A batch of best-effort jobs is put in flight; latency-sensitive questions then arrive one at a
time and are streamed back while the batch runs. The server is started as systemd would start a
``Type=notify`` service (the demo waits for ``READY=1``) and stopped with SIGTERM (drain, exit 0).
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
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-moe"
QUESTIONS = (
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colours.",
    "What does a CPU do? Answer in one sentence.",
    "Give me a synonym for 'fast'.",
)
JOBS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms.",
    "Describe a busy market in the morning.",
    "Write a poem about the sea.",
    "Explain what a compiler does.",
    "Describe the life of a honeybee.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain why the sky is blue.",
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="serve a model and run a mixed LS/BE demo through the client", description=__doc__
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"preset name or model directory (default {DEFAULT_MODEL})"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument("--policy", default="cohort", help="scheduling policy (default cohort)")
    p.add_argument("--be", type=int, default=6, help="best-effort jobs in flight (default 6)")
    p.add_argument("--be-tokens", type=int, default=48, help="tokens per best-effort job (default 48)")
    p.add_argument("--ls", type=int, default=3, help="latency-sensitive questions (default 3)")
    p.add_argument("--ls-tokens", type=int, default=32, help="most tokens per answer (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of the transcript")
    return p


def run(args: argparse.Namespace) -> int:
    if args.be < 0 or args.ls < 1:
        raise ValueError("--be must be >= 0 and --ls >= 1")
    return asyncio.run(_demo(args))


def _say(args: argparse.Namespace, text: str = "", end: str = "\n") -> None:
    if not args.json:
        sys.stdout.write(text + end)
        sys.stdout.flush()


async def _wait_ready(notify: socket.socket, server: asyncio.subprocess.Process) -> None:
    """Wait for READY=1 on our sd_notify socket, as systemd does for a Type=notify service."""
    loop = asyncio.get_running_loop()
    exited = asyncio.ensure_future(server.wait())
    try:
        while True:
            received = asyncio.ensure_future(loop.sock_recv(notify, 4096))
            await asyncio.wait([received, exited], return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                received.cancel()
                raise OSError(f"qllm serve exited with status {server.returncode} before it was ready")
            if b"READY=1" in received.result():
                return
    finally:
        exited.cancel()


async def _demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="qllm-demo-") as tmp:
        path, notify_path = Path(tmp) / "qllm.sock", Path(tmp) / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        _say(
            args,
            f"starting qllm serve --model {args.model} --policy {args.policy} (first use of a preset may convert it once) ...",
        )
        started = time.monotonic()
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qllm", "serve", "--socket", str(path), "--model", args.model,
            "--dtype", args.dtype, "--policy", args.policy, "--log-level", "warning",
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        )  # fmt: skip
        try:
            await _wait_ready(notify, server)
            _say(args, f"ready after {time.monotonic() - started:.1f} s on {path}\n")
            report = await _workload(path, args)
        finally:
            if server.returncode is None:
                server.send_signal(signal.SIGTERM)  # drain in-flight work, then exit 0
            code = await server.wait()
            notify.close()
    report["server_exit_code"] = code
    if args.json:
        print(json.dumps(report))
    else:
        _say(args, f"\nserver stopped with SIGTERM, exit code {code}")
        for cls in ("ls", "be"):
            s = report[cls]
            if s["requests"]:
                _say(args, f"  {cls}: {s['requests']} requests, TTFT median {s['ttft_ms_median']} ms, "
                     f"turnaround median {s['turnaround_ms_median']} ms, preemptions {s['preemptions']}")  # fmt: skip
    return 0 if code == 0 else 1


def _summary(results: list) -> dict:
    ttft = [r.timings.ttft for r in results if r.timings.ttft is not None]
    return {
        "requests": len(results),
        "ttft_ms_median": round(statistics.median(ttft) * 1e3, 1) if ttft else None,
        "turnaround_ms_median": round(statistics.median(r.timings.turnaround for r in results) * 1e3, 1)
        if results
        else None,
        "preemptions": sum(r.preemptions for r in results),
        "tokens": sum(len(r.token_ids) for r in results),
    }


async def _workload(path: Path, args: argparse.Namespace) -> dict:
    from qllm.client import AsyncClient
    from qllm.errors import InvalidRequest

    async with AsyncClient(path, timeout=900) as client:
        try:  # instruct models answer best inside their chat template
            await client.generate("hi", max_tokens=1, chat=True)
            chat = True
        except InvalidRequest:
            chat = False
        jobs = [JOBS[i % len(JOBS)] for i in range(args.be)]
        be = [
            asyncio.ensure_future(
                client.generate(job, max_tokens=args.be_tokens, priority="be", ignore_eos=True, chat=chat)
            )
            for job in jobs
        ]
        _say(
            args,
            f"{len(be)} best-effort jobs in flight ({args.be_tokens} tokens each); now the LS questions:",
        )
        await asyncio.sleep(0.5)
        answers = []
        for i in range(args.ls):
            question = QUESTIONS[i % len(QUESTIONS)]
            _say(args, f"\n[ls] {question}\n     ", end="")
            async with client.stream(question, max_tokens=args.ls_tokens, priority="ls", chat=chat) as stream:
                async for chunk in stream:
                    _say(args, chunk.text.replace("\n", " "), end="")
                final = await stream.final()
            answers.append(final)
            _say(
                args,
                f"\n     (first token after {final.timings.ttft * 1e3:.0f} ms, {len(final.token_ids)} tokens)",
            )
        be_results = await asyncio.gather(*be)
        if be_results:
            sample = be_results[0]
            _say(args, f"\n[be] {jobs[0]}\n     {sample.text.strip()[:300]}")
        stats = await client.stats()
    return {
        "model": args.model,
        "policy": args.policy,
        "chat": chat,
        "ls": _summary(answers),
        "be": _summary(be_results),
        "answers": [a.text for a in answers],
        "memory": stats.get("memory"),
    }
