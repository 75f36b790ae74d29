"""Streamed text's cost per token over a long output: decoding the whole output at every token
against the window ``qllm.text.TextDecoder`` decodes.

Prints JSON: microseconds per token for each, at each output length, on the tiny preset's
tokenizer (byte-level BPE), and whether the two texts agree at every token.

    .venv/bin/python scripts/text_decoder_bench.py --tokens 500 2000
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

from qllm.models.presets import tiny_tokenizer
from qllm.text import TextDecoder, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[500, 2000], help="output lengths")
    args = parser.parse_args()
    tok = tiny_tokenizer()
    model = SimpleNamespace(tokenizer=tok)
    text = "The quick brown fox jumps over the lazy dog, said the ünïcödé cat. " * 400
    out = {}
    for n in args.tokens:
        ids = tok.encode(text, add_special_tokens=False)[:n]
        start = time.perf_counter()
        window = TextDecoder(model)
        streamed = [window.push(t) for t in ids]
        window_s = time.perf_counter() - start
        start = time.perf_counter()
        whole = [decode(model, ids[: i + 1]) for i in range(len(ids))]
        whole_s = time.perf_counter() - start
        out[len(ids)] = {
            "window_us_per_token": round(window_s / len(ids) * 1e6, 1),
            "whole_us_per_token": round(whole_s / len(ids) * 1e6, 1),
            "equal_at_every_token": streamed == whole,
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
