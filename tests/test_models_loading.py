"""Loading models from local directories, and the ``qllm generate`` / ``qllm models`` commands.

A bad ``--model`` must give one :class:`ModelLoadError` that says what is wrong and lists the
supported families; a directory written by ``save_pretrained`` must load and generate exactly what
the in-memory model does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_families import CASES_BY_NAME, SIZES, torch_threads

from qllm.cli import main
from qllm.kernel.program import generate
from qllm.models import FAMILIES, REFUSED, ModelLoadError, load_model, supported_model_types
from qllm.models.presets import PRESETS, tiny_tokenizer
from qllm.spec import SamplingParams

PROMPT = "the quick brown fox"
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny preset's model and tokenizer written with ``save_pretrained``, and the model itself."""
    model, tokenizer = PRESETS["tiny"].build()
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def copy_without(src: Path, dst: Path, *patterns: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*patterns))
    return dst


def assert_load_error(spec, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    for family in supported_model_types():
        assert family in message, f"{family!r} not listed in: {message}"
    return message


def test_missing_directory(tmp_path):
    assert_load_error(tmp_path / "nope", "nope", "neither a preset", "tiny")


def test_file_instead_of_directory(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    assert_load_error(file, "model.safetensors", "not a directory")


def test_directory_without_config(saved, tmp_path):
    assert_load_error(copy_without(saved[0], tmp_path / "m", "config.json"), "no config.json")


def test_config_that_is_not_json(saved, tmp_path):
    path = copy_without(saved[0], tmp_path / "m")
    (path / "config.json").write_text("{not json")
    assert_load_error(path, "config.json", "not valid JSON")


@pytest.mark.parametrize("model_type", ["llama", "bert", None])
def test_unsupported_architecture(saved, tmp_path, model_type):
    path = copy_without(saved[0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config.pop("model_type")
    if model_type is not None:
        config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    assert_load_error(
        path,
        f"model_type={model_type!r} is not one of the MoE families",
        "Mixture-of-Experts",
        "`qllm models`",
    )


def test_a_dense_model_is_named_as_such(saved, tmp_path):
    path = copy_without(saved[0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    dense = {k: v for k, v in config.items() if "expert" not in k} | {"model_type": "llama"}
    (path / "config.json").write_text(json.dumps(dense))
    message = assert_load_error(path, str(path), "model_type='llama' is a dense (non-MoE) model")
    assert "qllm serves Mixture-of-Experts models only" in message and "`qllm models`" in message


def test_directory_without_weights(saved, tmp_path):
    assert_load_error(copy_without(saved[0], tmp_path / "m", "*.safetensors"), "no weights")


def test_directory_without_tokenizer(saved, tmp_path):
    assert_load_error(copy_without(saved[0], tmp_path / "m", "tokenizer*"), "tokenizer")


def test_unknown_dtype(saved):
    with pytest.raises(ModelLoadError, match="float32"):
        load_model(saved[0], dtype="int3")


def test_saved_directory_generates_like_the_model_in_memory(saved):
    path, model, tokenizer = saved
    loaded = load_model(path)

    assert type(loaded).family == "mixtral"
    assert loaded.dtype == torch.float32
    assert (
        generate(loaded, PROMPT, PARAMS).token_ids
        == generate(load_model((model, tokenizer)), PROMPT, PARAMS).token_ids
    )


def test_saved_directory_of_another_family_loads(tmp_path):
    hf = CASES_BY_NAME["qwen2_moe"].build()
    hf.save_pretrained(tmp_path)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    ids = [5, 9, 14]
    expected = generate(load_model((hf, None)), ids, PARAMS).token_ids
    assert type(load_model(tmp_path)).family == "qwen2_moe"
    assert generate(load_model(tmp_path), ids, PARAMS).token_ids == expected


def test_bfloat16_loads_and_generates(saved):
    loaded = load_model(saved[0], dtype="bfloat16")

    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.hf.parameters())
    result = generate(loaded, PROMPT, PARAMS)
    assert len(result.token_ids) == PARAMS.max_tokens
    assert all(0 <= t < loaded.vocab_size for t in result.token_ids)


# ---------------------------------------------------------------------------- CLI
def test_cli_generate_from_directory_prints_the_text(saved, capsys):
    path, model, tokenizer = saved
    expected = generate(load_model((model, tokenizer)), PROMPT, SamplingParams(max_tokens=6))

    assert main(["generate", "--model", str(path), "--max-tokens", "6", PROMPT]) == 0

    assert capsys.readouterr().out == expected.text + "\n"


def test_cli_generate_json(saved, capsys):
    path, model, tokenizer = saved
    expected = generate(load_model((model, tokenizer)), PROMPT, SamplingParams(max_tokens=6))

    assert main(["generate", "--model", str(path), "--max-tokens", "6", "--json", PROMPT]) == 0

    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == expected.token_ids
    assert out["text"] == expected.text
    assert isinstance(out["ttft_s"], float) and out["ttft_s"] > 0
    assert isinstance(out["tokens_per_s"], float) and out["tokens_per_s"] >= 0


def test_cli_generate_json_on_the_tiny_preset(capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny",
                "--max-tokens",
                "4",
                "--json",
                "--temperature",
                "0.8",
                "--seed",
                "3",
                "hi",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {"token_ids", "text", "ttft_s", "tokens_per_s"} <= out.keys()
    assert 1 <= len(out["token_ids"]) <= 4


def test_cli_generate_bad_model_is_one_line_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "neither a preset" in lines[0] and "mixtral" in lines[0]


def test_cli_models_lists_presets_and_families(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in PRESETS:
        assert name in text
    for family in FAMILIES:
        assert family.family in text
        assert all(t in text for t in family.model_types)

    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed["presets"]) == set(PRESETS)
    assert listed["families"] == {f.family: list(f.model_types) for f in FAMILIES}


# Families whose mechanisms came with latent attention, attention sinks, chunked attention and
# non-standard module layouts; each checkpoint is written by save_pretrained and run by the CLI.
SAVED_FAMILIES = [
    *("gpt_oss", "llama4_text", "dbrx", "deepseek_v3", "deepseek_v2", "glm4_moe_lite", "mistral4"),
    *("qwen3_next", "qwen3_5_moe_text", "granitemoe_swa", "sarvam_mla", "sarvam_moe", "mimo_v2_flash"),
]


@pytest.mark.parametrize("name", SAVED_FAMILIES)
def test_cli_generate_json_on_a_saved_checkpoint_returns_transformers_greedy_ids(name, tmp_path, capsys):
    case = CASES_BY_NAME[name]
    tokenizer = tiny_tokenizer()
    hf = dataclasses.replace(case, config={**case.config, "vocab_size": len(tokenizer)}).build()
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    steps = 8
    with torch.no_grad():
        ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        out = hf.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    expected = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in expected:  # qllm stops at the tokenizer's EOS, keeping it
        expected = expected[: expected.index(tokenizer.eos_token_id) + 1]

    assert main(["generate", "--model", str(tmp_path), "--max-tokens", str(steps), "--json", PROMPT]) == 0

    assert json.loads(capsys.readouterr().out)["token_ids"] == expected


# Multimodal checkpoints: AutoModelForCausalLM loads their text model, which qllm runs.
TINY_VISION = {
    "qwen3_5_moe": dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=48),
    "llama4": dict(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=32,
        num_attention_heads=2,
        vision_output_dim=48,
        projector_input_dim=48,
        projector_output_dim=48,
        image_size=28,
        patch_size=14,
    ),
}


@pytest.mark.parametrize(
    ("model_type", "text"), [("qwen3_5_moe", "qwen3_5_moe_text"), ("llama4", "llama4_text")]
)
def test_cli_generate_json_on_a_multimodal_checkpoint_runs_its_text_model(model_type, text, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    tokenizer = tiny_tokenizer()
    text_config = {**SIZES, **CASES_BY_NAME[text].config, "vocab_size": len(tokenizer)}
    config = AutoConfig.for_model(model_type, text_config=text_config, vision_config=TINY_VISION[model_type])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    steps = 8
    with torch.no_grad():
        ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        out = hf.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None)
    expected = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id) + 1]

    assert main(["generate", "--model", str(tmp_path), "--max-tokens", str(steps), "--json", PROMPT]) == 0

    assert json.loads(capsys.readouterr().out)["token_ids"] == expected


@pytest.mark.parametrize("name", SAVED_FAMILIES)
def test_bfloat16_smoke_of_the_new_families(name):
    """Sinks, chunked attention, latent attention and gated DeltaNet state all run in bfloat16."""
    executor = load_model((CASES_BY_NAME[name].build().to(torch.bfloat16), None))

    result = generate(executor, [5, 9, 14, 3, 77], PARAMS)

    assert executor.dtype == torch.bfloat16
    assert len(result.token_ids) == PARAMS.max_tokens
    assert all(0 <= t < executor.vocab_size for t in result.token_ids)


def test_a_checkpoint_quantized_by_another_method_is_refused_by_name(saved, tmp_path):
    path = copy_without(saved[0], tmp_path / "quantized")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(config))

    with pytest.raises(
        ModelLoadError, match=r"quant_method='bitsandbytes'.*mxfp4, fp8 are dequantized on load"
    ):
        load_model(path)


def test_a_refused_family_is_refused_by_name_with_its_reason(saved, tmp_path):
    path = copy_without(saved[0], tmp_path / "kimi")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_linear"}))

    assert_load_error(path, "model_type='kimi_linear'", "linear attention of kind KDA")


def test_a_hybrid_model_with_another_linear_attention_kind_is_refused():
    hf = CASES_BY_NAME["qwen3_next"].build()
    hf.config.layer_types = ["mamba2", "full_attention", "linear_attention"]

    with pytest.raises(ValueError, match="linear attention of kind 'mamba2' not supported"):
        load_model((hf, None))


def test_cli_models_counts_the_model_types_and_lists_the_refused(capsys):
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["model_types"] == len(supported_model_types()) >= 36
    assert listed["refused"] == REFUSED
    assert not set(REFUSED) & set(supported_model_types())
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert f"{len(supported_model_types())} config.json model_types" in text
    assert all(t in text and reason in text for t, reason in REFUSED.items())
