"""One request's generation as an op stream, and a driver that runs it alone.

:func:`generation_steps` is prefill followed by decode steps for one request: it yields every op
of every forward pass (see :mod:`qllm.ops`) and a :class:`~qllm.ops.Token` for each token it
produces, and returns why it stopped. The kernel interleaves many of these; :func:`generate`
runs one by itself, computing each op at once.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qllm.cache import KVCache
from qllm.models.base import MoEModel
from qllm.ops import Op, Token
from qllm.sampling import Sampler, SamplingParams


class StopReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached


def eos_ids(model: MoEModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model.hf, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    tok = model.tokenizer
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.add(tok.eos_token_id)
    return frozenset(ids)


def encode(
    model: MoEModel, prompt: str | Sequence[int], *, chat: bool = False, tokenizer: Any = None
) -> list[int]:
    """Token ids of ``prompt`` (text through the model's tokenizer, or ids checked against the vocab).

    With ``chat``, text is a user message wrapped in the tokenizer's chat template (with the
    assistant's turn opened), as instruct models expect. ``tokenizer`` replaces the model's (a
    copy owned by another thread).
    """
    if isinstance(prompt, str):
        tok = model.tokenizer if tokenizer is None else tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        if chat:
            return encode_chat(model, [{"role": "user", "content": prompt}], tokenizer=tok)
        ids = tok.encode(prompt, add_special_tokens=False)
    else:
        if chat:
            raise ValueError("chat needs a text prompt, not token ids")
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {model.vocab_size}): {bad[:5]}")
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def encode_chat(model: MoEModel, messages: Sequence[dict[str, str]], *, tokenizer: Any = None) -> list[int]:
    """Token ids of a conversation (``{"role", "content"}`` dicts) through the tokenizer's chat
    template, with the assistant's turn opened."""
    tok = model.tokenizer if tokenizer is None else tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer; pass token ids instead of text")
    if not getattr(tok, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; send the prompt without chat")
    if not messages:
        raise ValueError("the conversation has no messages")
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def decode(model: MoEModel, ids: Sequence[int]) -> str:
    """Text of ``ids``; ids the tokenizer does not know (random presets) are left out."""
    tok = model.tokenizer
    if tok is None:
        return ""
    known = [t for t in ids if t < len(tok)]
    return tok.decode(known, skip_special_tokens=True)


class TextDecoder:
    """The text of a growing sequence of token ids, equal to :func:`decode` of all of them, at a
    cost per token that does not grow with the sequence.

    Decoding the whole output at every token costs time in its length (about 0.2 ms at 500 tokens
    and 0.9 ms at 2000 for the tiny preset's tokenizer), so a stream of n tokens cost O(n^2). Here
    each token decodes a short window: the tokens since the text was last settled, plus those of
    the two settlements before (so that a tokenizer that treats a sequence's first token
    specially, such as one that drops a leading space, sees the context it sees in the whole
    sequence). The window's text past its settled part is the new text. It stays provisional
    while it ends in an incomplete character (U+FFFD) or adds nothing. Where the window decodes
    differently from its parts, the whole sequence is decoded once instead. A tokenizer that
    cleans up spaces around punctuation (word-piece decoders, ``clean_up_tokenization_spaces``)
    rewrites text across more tokens than a window sees: its whole sequence is decoded every time.
    """

    CONTEXT = 3
    """Settlements the window reaches back (the current one included)."""

    def __init__(self, model: MoEModel):
        tok = model.tokenizer
        self._tok = tok
        self._vocab = 0 if tok is None else len(tok)
        self._whole = tok is not None and _cleans_up(tok)
        self._ids: list[int] = []  # the ids the tokenizer knows (as decode keeps them)
        self._settled = ""  # the text of ids[:read]
        self._marks: deque[int] = deque([0], maxlen=self.CONTEXT)  # where the last settlements ended
        self._known: str | None = None  # the text of the window's settled part (None: not decoded yet)
        self._tail = ""  # the provisional text of ids[read:]

    @property
    def text(self) -> str:
        return self._settled + self._tail

    def push(self, token_id: int) -> str:
        """Append ``token_id``; the text of every id so far (what :func:`decode` gives)."""
        if self._tok is None or token_id >= self._vocab:
            return self.text
        ids = self._ids
        ids.append(token_id)
        if self._whole:
            self._settled = self._decode(ids)
            return self._settled
        start, read = self._marks[0], self._marks[-1]
        if self._known is None:  # the window moved: its settled part is decoded once per settlement
            self._known = self._decode(ids[start:read])
        window, known = self._decode(ids[start:]), self._known
        if window.startswith(known):
            tail = window[len(known) :]
        else:  # the window decodes differently from its parts: decode it all, once
            whole = self._decode(ids)
            if not whole.startswith(self._settled):  # settled text changed: settle again from here
                self._settled = ""
                self._marks.clear()
                self._marks.append(0)
                self._known = None
            tail = whole[len(self._settled) :]
        if not tail or tail.endswith("\ufffd"):
            self._tail = tail
            return self.text
        self._settled += tail
        self._tail = ""
        self._marks.append(len(ids))
        self._known = None
        return self._settled

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if ids else ""


def _cleans_up(tok: Any) -> bool:
    """Whether ``tok``'s decoding rewrites spaces around punctuation across tokens."""
    if getattr(tok, "clean_up_tokenization_spaces", False):
        return True
    decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    return bool(getattr(decoder, "cleanup", False))


def stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


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
) -> Generator[Forward | Token, Any, StopReason]:
    """Prefill then decode one request as forward passes and tokens; returns why it stopped.

    With ``prefill_chunk`` the prompt is prefilled that many tokens per forward pass, which bounds
    how long any single op runs (and so how long an arriving request can wait). The kernel runs the
    passes of many requests together (qllm/models/passes.py).
    """
    sampler = Sampler(params)
    eos = frozenset() if params.ignore_eos else eos_ids(model)
    generated: list[int] = []
    text = TextDecoder(model)
    prompt = torch.tensor(prompt_ids, dtype=torch.long)
    chunk = prefill_chunk or len(prompt_ids)
    for start in range(0, len(prompt_ids) - chunk, chunk):
        yield Forward(prompt[start : start + chunk], logits=False)
    logits = yield Forward(prompt[(len(prompt_ids) - 1) // chunk * chunk :])
    while True:
        token = sampler(logits)
        generated.append(token)
        so_far = text.push(token)
        yield Token(token, so_far)
        if token in eos:
            return StopReason.STOP
        if params.stop and stop_index(so_far, params.stop) is not None:
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
    moe: str = "expert",
) -> Generator[Op | Token, Any, StopReason]:
    """:func:`generation_passes` with each forward pass's ops yielded one by one (see
    :meth:`MoEModel.forward <qllm.models.base.MoEModel.forward>` for ``moe``)."""
    cache = cache if cache is not None else model.new_cache()
    passes = generation_passes(model, prompt_ids, params, prefill_chunk=prefill_chunk)
    result: Any = None
    while True:
        try:
            item = passes.send(result)
        except StopIteration as stop:
            return stop.value
        if isinstance(item, Token):
            yield item
            result = None
        else:
            result = yield from model.forward(cache, item.token_ids, logits=item.logits, moe=moe)


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


def finish_text(model: MoEModel, ids: Sequence[int], stops: Sequence[str]) -> str:
    text = decode(model, ids)
    cut = stop_index(text, stops) if stops else None
    return text if cut is None else text[:cut]


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
