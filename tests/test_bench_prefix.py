"""qllm bench prefix: the workload of shared system prompts and chats, and a run of both sides."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter

import pytest

from qllm.bench import prefix


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prefix.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_workload_shares_system_prompts_by_popularity():
    chats = prefix.workload(args("--conversations", "400", "--prompts", "3", "--share", "0.9"), vocab=500)
    assert chats == prefix.workload(args("--conversations", "400", "--prompts", "3", "--share", "0.9"), 500)
    counts = Counter(c.system for c in chats).most_common()
    shared = [n for _, n in counts[:3]]
    assert sum(shared) == pytest.approx(0.9 * 400, abs=30)  # the rest have prompts of their own
    assert shared[0] > shared[1] > shared[2]  # Zipf: the first prompt is the most popular
    assert all(n == 1 for _, n in counts[3:])
    assert all(len(c.system) == 256 and len(c.messages) == 2 for c in chats)
    assert [c.start for c in chats] == sorted(c.start for c in chats)


def test_both_sides_get_the_same_tokens_and_caching_computes_less(tiny):
    import uvloop

    report = uvloop.run(
        prefix.measure(
            tiny,
            args(
                "--conversations", "4", "--prompts", "1", "--prompt-tokens", "24", "--prefill-chunk", "8",
                "--kv-block-size", "4", "--user-tokens", "10", "--output-tokens", "3", "--rate", "50",
                "--think", "0",
            ),
        )
    )  # fmt: skip
    on, off = report["on"], report["off"]
    assert report["headline"]["tokens_equal"]
    assert off["prefill_tokens_computed"] == off["prefill_tokens_submitted"] == on["prefill_tokens_submitted"]
    assert on["prefill_tokens_computed"] < on["prefill_tokens_submitted"]
    assert on["prefix"]["tokens_hit"] == on["prefill_tokens_submitted"] - on["prefill_tokens_computed"]
    assert off["prefix"] == {"enabled": False}
    assert report["headline"]["computed_over_submitted_on"] == on["computed_over_submitted"] < 1


def test_the_command_is_listed_and_checks_its_options():
    out = subprocess.run(
        [sys.executable, "-m", "qllm.bench", "prefix", "--model", "tiny", "--rounds", "0"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "--rounds must be at least 1" in out.stderr
