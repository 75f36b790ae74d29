"""Blocking client: one generation, one stream, the server's health.

qllm serve --socket /tmp/qllm.sock &          # in another terminal
python examples/client_sync.py /tmp/qllm.sock
"""

from __future__ import annotations

import sys

from qllm.client import Client


def main(socket: str | None) -> None:
    with Client(socket, timeout=60) as client:
        print(f"connected to {client.path}: model {client.welcome.model}, policy {client.welcome.policy}")
        result = client.generate("The capital of France is", max_tokens=16, priority="ls")
        print(f"[{result.status}] {result.text!r}  ttft {result.timings.ttft * 1e3:.1f} ms")
        with client.stream("Once upon a time", max_tokens=24, priority="be") as stream:
            for chunk in stream:
                print(chunk.text, end="", flush=True)
        print(f"\n[{stream.result.status}] {stream.result.usage.completion_tokens} tokens")
        print(client.health())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
