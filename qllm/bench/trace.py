"""Workloads for ``qllm bench``: Poisson arrivals with ShareGPT-like lengths, or a replayed trace.

A workload is a list of :class:`Item` (arrival time, class, prompt, output length), the same for
every system measured at one rate. Generated workloads use common random numbers: one seeded
sequence of unit-rate inter-arrival gaps, classes and lengths is drawn once, and the workload at
rate ``r`` is that sequence with its gaps divided by ``r``. So every rate replays the same requests,
only faster, and the same seed always gives the same workload (stdlib ``random``, no torch).

Lengths (``ShareGPT`` below): log-normal, with the means of the ShareGPT conversations as reported
by the vLLM paper (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023, Fig. 11: input 161.31 and output 337.99 tokens on average). The paper
gives the means and histograms, not a fitted law: the log-normal shape and its sigma (1.0, a long
right tail like those histograms) are our assumption. ``scale`` multiplies both means so that the
workload fits a small model or a slow machine; ``max_prompt`` / ``max_output`` cap the draws.

A trace is JSON Lines, one request per line: ``arrival_s`` (seconds from the start), ``class``
(``ls`` or ``be``), ``prompt`` (text) or ``prompt_len`` (tokens), and ``output_len``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

SHAREGPT_PROMPT_MEAN = 161.31
"""Mean ShareGPT prompt length in tokens (vLLM paper, SOSP 2023, Fig. 11)."""
SHAREGPT_OUTPUT_MEAN = 337.99
"""Mean ShareGPT output length in tokens (same source)."""
LENGTH_SIGMA = 1.0
"""Sigma of the log-normal length laws (our assumption; the source gives means and histograms)."""

PROMPT_VOCAB = 256
"""Generated prompts draw token ids from ``[FIRST_ID, FIRST_ID + PROMPT_VOCAB)``: valid for every
model (the smallest vocabulary we serve has 512 tokens), so socket and in-process runs send the
same ids. Compute does not depend on which ids they are."""
FIRST_ID = 3  # skip the ids that tokenizers reserve for special tokens


@dataclass(frozen=True)
class Item:
    """One request of a workload. ``prompt`` is text or token ids; ``prompt_len`` its length."""

    arrival_s: float
    cls: str  # "ls" | "be"
    prompt_len: int
    output_len: int
    prompt: str | tuple[int, ...] | None = None


@dataclass(frozen=True)
class Lengths:
    """Log-normal prompt and output lengths with the given means, scaled and capped."""

    prompt_mean: float = SHAREGPT_PROMPT_MEAN
    output_mean: float = SHAREGPT_OUTPUT_MEAN
    sigma: float = LENGTH_SIGMA
    scale: float = 1.0
    max_prompt: int = 2048
    max_output: int = 2048

    def __post_init__(self) -> None:
        if not self.scale > 0 or self.prompt_mean <= 0 or self.output_mean <= 0 or self.sigma < 0:
            raise ValueError("length means, scale must be > 0 and sigma >= 0")
        if self.max_prompt < 1 or self.max_output < 1:
            raise ValueError("max_prompt and max_output must be >= 1")

    def draw(self, rng: random.Random) -> tuple[int, int]:
        return (
            self._one(rng, self.prompt_mean, self.max_prompt),
            self._one(rng, self.output_mean, self.max_output),
        )

    def _one(self, rng: random.Random, mean: float, cap: int) -> int:
        # E[lognormal(mu, s)] = exp(mu + s^2 / 2): choose mu so that the mean is ``scale * mean``.
        mu = math.log(mean * self.scale) - self.sigma**2 / 2
        return max(1, min(cap, round(rng.lognormvariate(mu, self.sigma))))

    @classmethod
    def for_context(
        cls, context: int, scale: float = 1.0, max_prompt: int | None = None, max_output: int | None = None
    ):
        """Lengths that fit a model with ``context`` positions: prompt <= half, prompt + output <= all."""
        max_prompt = max_prompt or max(1, context // 2)
        max_output = max_output or max(1, context - max_prompt)
        if max_prompt + max_output > context:
            raise ValueError(
                f"max prompt {max_prompt} + max output {max_output} exceed the model's context {context}"
            )
        return cls(scale=scale, max_prompt=max_prompt, max_output=max_output)


def _base(seed: int, ls_share: float, lengths: Lengths) -> Iterator[Item]:
    """The endless unit-rate sequence of a seed: arrival_s is in units of mean gaps."""
    if not 0 <= ls_share <= 1:
        raise ValueError("ls_share must be in [0, 1]")
    rng = random.Random(f"qllm-workload:{seed}")
    t = 0.0
    while True:
        t += rng.expovariate(1.0)
        cls = "ls" if rng.random() < ls_share else "be"
        prompt_len, output_len = lengths.draw(rng)
        ids = tuple(FIRST_ID + rng.randrange(PROMPT_VOCAB) for _ in range(prompt_len))
        yield Item(t, cls, prompt_len, output_len, ids)


def poisson(
    rate: float,
    *,
    requests: int | None = None,
    duration: float | None = None,
    ls_share: float = 0.2,
    lengths: Lengths | None = None,
    seed: int = 0,
) -> list[Item]:
    """Poisson arrivals at ``rate`` req/s: the first ``requests`` of them, or those before ``duration`` s."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if (requests is None) == (duration is None):
        raise ValueError("give exactly one of requests or duration")
    items: list[Item] = []
    for item in _base(seed, ls_share, lengths or Lengths()):
        scaled = replace(item, arrival_s=item.arrival_s / rate)
        if requests is not None and len(items) >= requests:
            break
        if duration is not None and scaled.arrival_s >= duration:
            break
        items.append(scaled)
    return items


def read_trace(path: str | Path) -> list[Item]:
    """Requests of a JSON Lines trace, sorted by arrival. Raises ValueError naming a bad line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(_item(json.loads(line)))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
    if not items:
        raise ValueError(f"{path}: no requests in the trace")
    return sorted(items, key=lambda i: i.arrival_s)


def _item(obj: dict) -> Item:
    cls = obj["class"]
    if cls not in ("ls", "be"):
        raise ValueError(f"class must be 'ls' or 'be', got {cls!r}")
    arrival = float(obj["arrival_s"])
    output_len = int(obj["output_len"])
    if arrival < 0 or output_len < 1:
        raise ValueError("arrival_s must be >= 0 and output_len >= 1")
    prompt = obj.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        return Item(arrival, cls, int(obj.get("prompt_len", 0)), output_len, prompt)
    prompt_len = int(obj["prompt_len"])
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1")
    rng = random.Random(f"qllm-trace:{arrival}:{prompt_len}")
    ids = tuple(FIRST_ID + rng.randrange(PROMPT_VOCAB) for _ in range(prompt_len))
    return Item(arrival, cls, prompt_len, output_len, ids)


def write_trace(items: Iterable[Item], path: str | Path) -> None:
    """Write items as a JSON Lines trace (prompt text kept; token-id prompts as ``prompt_len``)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in items:
            obj = {"arrival_s": round(i.arrival_s, 6), "class": i.cls, "output_len": i.output_len}
            if isinstance(i.prompt, str):
                obj["prompt"] = i.prompt
            else:
                obj["prompt_len"] = i.prompt_len
            f.write(json.dumps(obj) + "\n")


def trace_rate(items: list[Item]) -> float:
    """Mean arrival rate of a trace (requests / span of arrivals; one request: 1 req/s)."""
    span = items[-1].arrival_s - items[0].arrival_s if len(items) > 1 else 0.0
    return (len(items) - 1) / span if span > 0 else 1.0


def at_rate(items: list[Item], rate: float) -> list[Item]:
    """A trace replayed at ``rate`` req/s: its arrival times stretched or squeezed, order kept."""
    factor = trace_rate(items) / rate
    return [replace(i, arrival_s=i.arrival_s * factor) for i in items]


def limit(items: list[Item], *, requests: int | None = None, duration: float | None = None) -> list[Item]:
    """The first ``requests`` items, or those arriving before ``duration`` s."""
    if requests is not None:
        items = items[:requests]
    if duration is not None:
        items = [i for i in items if i.arrival_s < duration]
    return items
