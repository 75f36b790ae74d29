"""What a request with the most stop strings allowed costs another client's concurrent request, on
a live ``qllm serve --model tiny``, over HTTP (loopback TCP) and the native socket.

Each trial times a bystander's request (``--tokens`` tokens, greedy, no EOS) while a neighbour's
longer request runs beside it, the neighbour carrying no stop strings or the maximum (16 strings
of 256 characters that never match); trials alternate between the two, and solo bystander runs
between them. Prints JSON: median seconds of each, and the ratio of the bystander's time beside a
max-stops neighbour to its time beside a neighbour without stops (the cost of the stop search),
per front end.

    .venv/bin/python scripts/stop_cost.py --trials 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import serve_process

from qllm.client import AsyncClient
from qllm.paths import free_port
from qllm.spec import MAX_STOP_CHARS, MAX_STOPS


def max_stops() -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choices(string.ascii_letters, k=MAX_STOP_CHARS)) for _ in range(MAX_STOPS)]


class Http:
    def __init__(self, port: int):
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300)

    async def run(self, prompt: str, tokens: int, stop: list[str]) -> float:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stop": stop}
        start = time.perf_counter()
        response = await self.client.post("/v1/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - start

    async def close(self) -> None:
        await self.client.aclose()


class Native:
    def __init__(self, path: Path):
        self.path = path

    async def run(self, prompt: str, tokens: int, stop: list[str]) -> float:
        async with AsyncClient(self.path, timeout=300) as client:
            start = time.perf_counter()
            await client.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True, stop=stop)
            return time.perf_counter() - start

    async def close(self) -> None:
        pass


async def trial(front: Http | Native, tokens: int, stop: list[str] | None) -> float:
    """The bystander's seconds, beside a neighbour with ``stop`` (None: alone)."""
    if stop is None:
        return await front.run("the bystander asks", tokens, [])
    neighbour = asyncio.ensure_future(front.run("the neighbour asks", tokens * 4, stop))
    await asyncio.sleep(0.05)  # the neighbour is decoding when the bystander arrives
    seconds = await front.run("the bystander asks", tokens, [])
    await neighbour
    return seconds


async def measure(front: Http | Native, args: argparse.Namespace) -> dict[str, float]:
    stops = max_stops()
    times: dict[str, list[float]] = {"solo": [], "beside_no_stops": [], "beside_max_stops": []}
    await front.run("warm up", 4, stops)
    for _ in range(args.trials):
        times["solo"].append(await trial(front, args.tokens, None))
        times["beside_no_stops"].append(await trial(front, args.tokens, []))
        times["beside_max_stops"].append(await trial(front, args.tokens, stops))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        **{f"{name}_s": round(value, 4) for name, value in medians.items()},
        "max_stops_vs_no_stops": round(medians["beside_max_stops"] / medians["beside_no_stops"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    with serve_process(Path(tempfile.mkdtemp()), f"[server]\nhttp_listen = '127.0.0.1:{port}'") as server:

        async def run() -> dict[str, object]:
            result: dict[str, object] = {"tokens": args.tokens, "trials": args.trials, "stops": MAX_STOPS}
            for name, front in (("http", Http(port)), ("native", Native(server.path))):
                try:
                    result[name] = await measure(front, args)
                finally:
                    await front.close()
            return result

        print(json.dumps(asyncio.run(run()), indent=2))


if __name__ == "__main__":
    main()
