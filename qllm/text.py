"""Text in and out of a model: prompts to token ids (plain or chat), token ids to text, streamed
text that grows at a bounded cost per token, and stop strings."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qllm.models.base import MoEModel


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
        self.rewrites = 0  # times text already returned changed before ``stable`` (rare: see push)

    @property
    def text(self) -> str:
        return self._settled + self._tail

    @property
    def stable(self) -> int:
        """Length of the text's prefix that later tokens leave as it is, unless ``rewrites`` grows.
        0 for a tokenizer whose whole sequence is decoded every time (any of it may change)."""
        return 0 if self._whole else len(self._settled)

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
                self.rewrites += 1
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


def stop_index(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the earliest stop string starts in ``text`` at or after ``start``, or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


class TextStream:
    """One request's output streamed as text: each token in, the text it adds out, up to the
    first stop string.

    The stop-string search is incremental: a token's search starts where a stop string could
    still begin in text that may have changed (the longest stop's length before the decoder's
    stable prefix), so its cost depends on the number of stop strings and their length, not on
    the output's. A token whose text ends in an incomplete UTF-8 sequence adds nothing until the
    next token completes it.
    """

    def __init__(self, model: MoEModel, stops: Sequence[str] = ()):
        self.decoder = TextDecoder(model)
        self.stops = tuple(stops)
        self.streamed = ""  # the text handed out so far
        self.stopped = False  # a stop string has appeared: the output ends with this token
        self._reach = max(map(len, self.stops), default=1)
        self._checked = 0  # a stop string starting before this index would have been found
        self._rewrites = 0
        self._cut = 0  # where the stop string starts, once ``stopped``

    def push(self, token_id: int) -> str:
        """Append ``token_id``; the text it adds to the stream (cut before a stop string)."""
        text = self.decoder.push(token_id)
        cut = self._find_stop(text) if self.stops else None
        if cut is not None:
            self.stopped, self._cut = True, cut
            text = text[:cut]
        elif text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            text = text[: len(self.streamed)]
        delta = text[len(self.streamed) :] if text.startswith(self.streamed) else ""
        self.streamed += delta
        return delta

    @property
    def text(self) -> str:
        """The whole output's text (what :func:`finish_text` gives for the same tokens): up to the
        stop string once ``stopped``, an incomplete last character included otherwise."""
        text = self.decoder.text
        return text[: self._cut] if self.stopped else text

    def _find_stop(self, text: str) -> int | None:
        decoder = self.decoder
        if decoder.rewrites != self._rewrites:  # text before the stable prefix changed: search it all
            self._rewrites, self._checked = decoder.rewrites, 0
        cut = stop_index(text, self.stops, self._checked)
        # A match starting before here lies within the stable prefix, which no later token changes.
        self._checked = max(self._checked, decoder.stable - self._reach + 1)
        return cut


def finish_text(model: MoEModel, ids: Sequence[int], stops: Sequence[str]) -> str:
    text = decode(model, ids)
    cut = stop_index(text, stops) if stops else None
    return text if cut is None else text[:cut]
