"""Async client: a burst of best-effort work with latency-sensitive requests arriving among it.

    qllm serve --socket /tmp/qllm.sock &          # in another terminal
    python examples/client_async.py /tmp/qllm.sock

All requests share one connection; the server preempts BE work at expert granularity when an LS
request arrives, so LS TTFT stays low while the BE batch runs.
"""

from __future__ import annotations

import asyncio
import statistics
import sys

from qllm.client import AsyncClient


async def main(socket: str | None) -> None:
    async with AsyncClient(socket, timeout=300) as client:
        be = [
            asyncio.ensure_future(client.generate(f"Batch document {i}:", max_tokens=48, priority="be"))
            for i in range(16)
        ]
        await asyncio.sleep(0.2)  # the BE batch is running
        ls = []
        for i in range(4):
            ls.append(await client.generate(f"Quick question {i}?", max_tokens=8, priority="ls"))
            await asyncio.sleep(0.05)
        be_results = await asyncio.gather(*be)

        for name, results in (("ls", ls), ("be", be_results)):
            ttft = [r.timings.ttft * 1e3 for r in results if r.timings.ttft is not None]
            turnaround = [r.timings.turnaround * 1e3 for r in results]
            print(
                f"{name}: {len(results)} requests, ttft median {statistics.median(ttft):.1f} ms, "
                f"turnaround median {statistics.median(turnaround):.1f} ms, "
                f"preemptions {sum(r.preemptions for r in results)}"
            )
        async with client.stream("Streaming:", max_tokens=16, priority="ls") as stream:
            print("stream:", "".join([chunk.text async for chunk in stream]))
        stats = await client.stats()
        print("memory:", stats["memory"])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
