"""Streamed text: :class:`qllm.kernel.program.TextDecoder` gives, after every token, the text that
decoding the whole output gives, while decoding only a window of recent tokens."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qllm.models.presets import tiny_tokenizer
from qllm.text import TextDecoder, TextStream, decode, finish_text, stop_index


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer: words carry a leading "▁" that decodes to a space, except
    at the start of the text."""
    vocab = {"<unk>": 0, "<s>": 1, "▁hello": 2, "▁world": 3, "!": 4, "▁": 5, "▁a": 6, "b": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def streamed(model, ids: list[int]) -> list[str]:
    text = TextDecoder(model)
    return [text.push(t) for t in ids]


def whole(model, ids: list[int]) -> list[str]:
    return [decode(model, ids[: i + 1]) for i in range(len(ids))]


@pytest.mark.parametrize("seed", range(12))
def test_text_after_every_token_equals_decoding_the_whole_output(seed):
    # Random ids of the byte-level BPE split multi-byte characters between tokens, and the ids
    # past the vocabulary (random presets generate them) are left out by both.
    tok = tiny_tokenizer()
    model = SimpleNamespace(tokenizer=tok)
    rng = random.Random(seed)
    ids = [rng.randrange(len(tok) + 8) for _ in range(300)]
    assert streamed(model, ids) == whole(model, ids)


def test_a_tokenizer_that_drops_the_first_leading_space_keeps_the_spaces_between_words():
    model = SimpleNamespace(tokenizer=metaspace_tokenizer())
    rng = random.Random(0)
    ids = [rng.randrange(8) for _ in range(200)]
    texts = streamed(model, ids)
    assert texts == whole(model, ids)
    assert " world" in texts[-1] or " hello" in texts[-1]  # spaces between words survived


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A word-piece tokenizer whose decoder cleans up spaces around punctuation: "it 's ?"
    decodes as "it's?", rewriting text across tokens."""
    vocab = {"[UNK]": 0, "it": 1, "'s": 2, "n't": 3, ".": 4, "hello": 5, "world": 6, "?": 7, "##s": 8}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_a_tokenizer_that_cleans_up_spaces_across_tokens_gets_the_whole_outputs_text():
    model = SimpleNamespace(tokenizer=wordpiece_tokenizer())
    ids = [5, 6, 4, 1, 2, 7, 1, 3, 4, 5, 8]
    assert decode(model, ids[:6]) == "hello world. it's?"  # the rewrites this test is about
    assert streamed(model, ids) == whole(model, ids)
    rng = random.Random(1)
    ids = [rng.randrange(9) for _ in range(120)]
    assert streamed(model, ids) == whole(model, ids)


def test_without_a_tokenizer_the_text_is_empty():
    assert streamed(SimpleNamespace(tokenizer=None), [1, 2, 3]) == ["", "", ""]


def test_each_token_decodes_a_window_not_the_whole_output():
    tok = tiny_tokenizer()
    calls: list[int] = []
    original = tok.decode

    def counting(ids, **kw):
        calls.append(len(ids))
        return original(ids, **kw)

    tok.decode = counting
    model = SimpleNamespace(tokenizer=tok)
    ids = tok.encode("the quick brown fox jumps over the lazy dog " * 40, add_special_tokens=False)
    assert len(ids) > 300
    text = TextDecoder(model)
    for t in ids:
        text.push(t)
    tok.decode = original
    assert text.text == decode(model, ids)
    assert max(calls) < 16  # ASCII text settles at every token: windows of a token or two


def naive_stream(model, ids: list[int], stops: list[str]) -> tuple[list[str], int | None]:
    """What a stream gives when every token decodes and searches the whole output: the text each
    token adds, and the index of the token after which a stop string appears."""
    out, streamed = [], ""
    for i in range(len(ids)):
        text = decode(model, ids[: i + 1])
        cut = stop_index(text, stops)
        if cut is not None:
            out.append(text[:cut][len(streamed) :] if text[:cut].startswith(streamed) else "")
            return out, i
        if text.endswith("\ufffd"):
            text = streamed
        delta = text[len(streamed) :] if text.startswith(streamed) else ""
        streamed += delta
        out.append(delta)
    return out, None


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("tokenizer", ["bpe", "metaspace", "wordpiece"])
def test_stop_strings_found_incrementally_as_in_the_whole_output(seed, tokenizer):
    tok = {"bpe": tiny_tokenizer, "metaspace": metaspace_tokenizer, "wordpiece": wordpiece_tokenizer}[
        tokenizer
    ]()
    model = SimpleNamespace(tokenizer=tok)
    rng = random.Random(seed)
    ids = [rng.randrange(len(tok)) for _ in range(200)]
    text = decode(model, ids)
    # Stops cut from the output's own text (so that they occur, often late), plus one that never does.
    stops = ["\x00never"]
    for _ in range(rng.randrange(1, 4)):
        if len(text) > 4:
            start = rng.randrange(len(text) // 2, len(text) - 2)
            stops.append(text[start : start + rng.randrange(1, 6)])
    stops = [s for s in stops if s and not s.endswith("\ufffd")]
    stream = TextStream(model, stops)
    deltas = []
    for t in ids:
        deltas.append(stream.push(t))
        if stream.stopped:
            break
    expected, stopped_at = naive_stream(model, ids, stops)
    assert deltas == expected
    assert stream.stopped == (stopped_at is not None)
    assert stream.streamed == "".join(expected)
    generated = ids if stopped_at is None else ids[: stopped_at + 1]
    assert stream.text == finish_text(model, generated, stops)


def test_each_token_searches_only_the_tail_a_stop_string_can_reach():
    # A long output with stops that never occur: the search start follows the stable text, so a
    # token's search covers the longest stop's length and the new text, however long the output.
    tok = tiny_tokenizer()
    model = SimpleNamespace(tokenizer=tok)
    stops = ["\x00a", "\x00bcd"]
    stream = TextStream(model, stops)
    starts = []
    real_find = stop_index

    def spy(text, found_stops, start=0):
        starts.append((len(text), start))
        return real_find(text, found_stops, start)

    import qllm.text as text_module

    text_module.stop_index, saved = spy, text_module.stop_index
    try:
        rng = random.Random(0)
        for _ in range(400):
            stream.push(rng.randrange(len(tok)))
    finally:
        text_module.stop_index = saved
    assert not stream.stopped
    longest = max(map(len, stops))
    tails = [length - start for length, start in starts[100:]]
    assert max(tails) < 64 + longest, "a token's search reaches back past the text it can affect"
    assert starts[-1][0] > 400  # the output itself is long
