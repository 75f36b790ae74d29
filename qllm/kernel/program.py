"""One request's program: prefill and decode as forward passes and tokens, and a driver that runs
one program alone.

:func:`generation_passes` is what the kernel runs for every request: it yields a
:class:`Forward` for each forward pass it needs and a :class:`~qllm.kernel.runtime.ops.Token` for
each token it produces, and returns why it stopped. :func:`generation_steps` yields each pass's
ops one by one, and :func:`generate` runs one request by itself, computing each op at once.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from qllm.kernel.runtime.ops import MoEGranularity, Op, Token
from qllm.sampling import Sampler, SamplingParams
from qllm.text import TextStream, encode, eos_ids, finish_text

if TYPE_CHECKING:
    from qllm.kernel.runtime.cache import KVCache
    from qllm.models.base import MoEModel


class StopReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached


@dataclass(frozen=True, slots=True)
class Forward:
    """Yielded by :func:`generation_passes`: run a forward pass of ``token_ids`` (1-D) appended to
    the request's cache and send back the last row's logits (None when ``logits`` is False)."""

    token_ids: torch.Tensor
    logits: bool = True


def generation_passes(
    model: MoEModel,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    prefill_chunk: int | None = None,
    cached: int = 0,
) -> Generator[Forward | Token, Any, StopReason]:
    """Prefill then decode one request as forward passes and tokens; returns why it stopped.

    With ``prefill_chunk`` the prompt is prefilled that many tokens per forward pass, which bounds
    how long any single op runs (and so how long an arriving request can wait). The kernel runs the
    passes of many requests together (qllm/kernel/runtime/passes.py). ``cached``: the first tokens
    are in the cache already (a cached prefix, a multiple of ``prefill_chunk`` before the last
    token), so the chunks after them are computed as they would be without it.
    """
    sampler = Sampler(params)
    eos = frozenset() if params.ignore_eos else eos_ids(model)
    generated: list[int] = []
    prompt = torch.tensor(prompt_ids, dtype=torch.long)
    chunk = prefill_chunk or len(prompt_ids)
    if cached and (cached % chunk or cached > len(prompt_ids) - 1):
        raise ValueError(
            f"a cached prefix of {cached} tokens is not a whole number of prefill chunks before the last token"
        )
    for start in range(cached, len(prompt_ids) - chunk, chunk):
        yield Forward(prompt[start : start + chunk], logits=False)
    logits = yield Forward(prompt[(len(prompt_ids) - 1) // chunk * chunk :])
    while True:
        token = sampler(logits)
        generated.append(token)
        stopped = yield Token(token)  # whoever streams the text says whether a stop string ended it
        if token in eos or stopped:
            return StopReason.STOP
        if len(generated) >= params.max_tokens:
            return StopReason.LENGTH
        logits = yield Forward(torch.tensor([token], dtype=torch.long))


def generation_steps(
    model: MoEModel,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    cache: KVCache | None = None,
    *,
    prefill_chunk: int | None = None,
    moe_granularity: MoEGranularity = "expert",
) -> Generator[Op | Token, Any, StopReason]:
    """:func:`generation_passes` with each forward pass's ops yielded one by one (see
    :meth:`MoEModel.forward <qllm.models.base.MoEModel.forward>` for ``moe_granularity``)."""
    cache = cache if cache is not None else model.new_cache()
    passes = generation_passes(model, prompt_ids, params, prefill_chunk=prefill_chunk)
    text = TextStream(model, params.stop)
    result: Any = None
    while True:
        try:
            item = passes.send(result)
        except StopIteration as stop:
            return stop.value
        if isinstance(item, Token):
            yield item
            text.push(item.token_id)
            result = text.stopped
        else:
            result = yield from model.forward(
                cache, item.token_ids, logits=item.logits, moe_granularity=moe_granularity
            )


@dataclass
class Generation:
    """Result of :func:`generate`."""

    token_ids: list[int]
    text: str
    stop_reason: StopReason
    prompt_tokens: int
    ttft_s: float
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token (0 when only one token was produced)."""
        decode_s = self.total_s - self.ttft_s
        return (len(self.token_ids) - 1) / decode_s if len(self.token_ids) > 1 and decode_s > 0 else 0.0


def generate(
    model: MoEModel, prompt: str | Sequence[int], params: SamplingParams | None = None, *, chat: bool = False
) -> Generation:
    """Generate for one request by itself: every op runs as soon as it is yielded."""
    params = params or SamplingParams()
    prompt_ids = encode(model, prompt, chat=chat)
    steps = generation_steps(model, prompt_ids, params)
    start = time.perf_counter()
    first = None
    tokens: list[int] = []
    result: Any = None
    while True:
        try:
            item = steps.send(result)
        except StopIteration as stop:
            reason = stop.value
            break
        if isinstance(item, Token):
            tokens.append(item.token_id)
            first = first or time.perf_counter()
            result = None
        else:
            result = model.run([item])[0]
    end = time.perf_counter()
    return Generation(
        token_ids=tokens,
        text=finish_text(model, tokens, params.stop),
        stop_reason=reason,
        prompt_tokens=len(prompt_ids),
        ttft_s=(first or end) - start,
        total_s=end - start,
    )
