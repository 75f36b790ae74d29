"""Tiny random models of every supported family, and drivers that run an executor's op streams.

Shared by the exactness, batch-invariance and loading tests. Each case is a transformers config
small enough to build in well under a second, with weights drawn from a fixed seed; the sizes
exercise grouped-query attention, top-2 routing and the family's own features (shared experts,
dense layers, sliding windows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import torch

from qllm.kernel.program import generation_steps
from qllm.kernel.runtime.ops import Op, OpKind, Token
from qllm.models.base import MoEModel
from qllm.spec import SamplingParams

Key = tuple[int, int, int]
"""An op's :attr:`~qllm.kernel.runtime.ops.Op.key`."""

SIZES = dict(
    vocab_size=192,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per KV head
    max_position_embeddings=512,
    initializer_range=0.1,  # larger than the default so routing and logits are far from uniform
    bos_token_id=None,
    eos_token_id=None,  # generate() must not stop early: every step is compared
    pad_token_id=None,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One tiny model: ``model_type``, config overrides, and op kinds its forward pass must yield."""

    name: str
    model_type: str
    config: dict[str, Any]
    kinds: frozenset[OpKind] = frozenset({OpKind.ATTENTION, OpKind.ROUTER, OpKind.EXPERT, OpKind.HEAD})
    model_class: str | None = None
    """transformers class to build, where ``AutoModelForCausalLM`` does not map the model type."""

    def build(self, seed: int = 0) -> Any:
        """The transformers ``*ForCausalLM`` with weights drawn from ``seed``, in eval mode, fp32."""
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(self.model_type, **{**SIZES, **self.config})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.model_class is None:
                model = AutoModelForCausalLM.from_config(config)
            else:
                model = getattr(transformers, self.model_class)(config)
            with torch.no_grad():
                for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                    # Biases start at zero: make them matter.
                    if name.endswith(("e_score_correction_bias", "expert_bias")):
                        tensor.copy_(torch.rand_like(tensor) * 0.2)
                    elif name.endswith((".bias", "proj_bias")):
                        tensor.copy_(torch.randn_like(tensor) * 0.1)
        return model.eval()


# Sigmoid router with a score-correction bias, group-limited top-k and scaled weights, plus one
# shared expert (DeepSeek-V3 style; the bias is randomised by Case.build).
DEEPSEEK_ROUTING = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
)
# Multi-head latent attention: low-rank queries, a 24-wide latent and an 8-wide shared rotary key
# (every query head has its own expanded key and value: no grouping).
LATENT_ATTENTION = dict(
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
)
# Hybrid linear attention: 2 key heads, 4 value heads (grouped), a 4-wide causal convolution;
# Qwen-style routing with a gated shared expert and one dense layer.
GATED_DELTANET = dict(
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    mlp_only_layers=[2],
)
GRANITE_MULTIPLIERS = dict(
    embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0
)
ROUTED = frozenset({OpKind.ATTENTION, OpKind.ROUTER, OpKind.EXPERT, OpKind.HEAD})
CASES = [
    Case("mixtral", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # A window shorter than prompt + decode: older keys must drop out of attention.
    Case("mixtral-sliding", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
    Case(
        "qwen3_moe",
        "qwen3_moe",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, mlp_only_layers=[1]
        ),
        ROUTED | {OpKind.MLP},
    ),
    Case(
        "qwen2_moe",
        "qwen2_moe",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
        ),
        ROUTED | {OpKind.SHARED},
    ),
    Case("olmoe", "olmoe", dict(num_experts=8, num_experts_per_tok=2, num_key_value_heads=4, clip_qkv=1.0)),
    Case(
        "glm4_moe",
        "glm4_moe",
        dict(**DEEPSEEK_ROUTING, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "dots1",
        "dots1",
        dict(**DEEPSEEK_ROUTING, first_k_dense_replace=1, sliding_window=6, max_window_layers=1),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "ernie4_5_moe",
        "ernie4_5_moe",
        dict(
            moe_num_experts=8,
            moe_k=2,
            moe_intermediate_size=32,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            use_bias=True,
            tie_word_embeddings=True,
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case("solar_open", "solar_open", dict(**DEEPSEEK_ROUTING, head_dim=16), ROUTED | {OpKind.SHARED}),
    Case(
        "exaone_moe",
        "exaone_moe",
        # Layers 0 and 2 slide with rotary, layer 1 attends globally without position embedding.
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            num_shared_experts=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            sliding_window=6,
            sliding_window_pattern=2,
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "minimax_m2",
        "minimax_m2",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
    ),
    Case(
        "phimoe",
        "phimoe",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            attention_bias=True,
            lm_head_bias=True,
            sliding_window=6,
        ),
    ),
    Case(
        "kolibri1",
        "kolibri1",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            head_dim=16,
            norm_topk_prob=True,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        ROUTED | {OpKind.SHARED},
    ),
    Case("flex_olmo", "flex_olmo", dict(num_experts=8, num_experts_per_tok=2, attention_bias=True)),
    Case(
        "afmoe",
        "afmoe",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            num_shared_experts=1,
            num_dense_layers=1,
            head_dim=16,
            route_scale=2.5,
            sliding_window=6,
            global_attn_every_n_layers=2,
            mup_enabled=True,
            attention_bias=True,
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "mellum",
        "mellum",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            head_dim=16,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
            rope_parameters={
                "full_attention": dict(rope_type="default", rope_theta=500000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            },
        ),
        ROUTED | {OpKind.MLP},
    ),
    Case(
        "laguna",
        "laguna",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            head_dim=16,
            num_attention_heads_per_layer=[4, 2, 4],
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            moe_routed_scaling_factor=2.5,
            moe_router_logit_softcapping=3.0,
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "laguna-channel-gate",
        "laguna",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, gating="per-channel"
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "cohere2_moe",
        "cohere2_moe",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            num_shared_experts=1,
            first_k_dense_replace=1,
            prefix_dense_intermediate_size=64,
            sliding_window=6,
            sliding_window_pattern=2,
            logit_scale=0.5,
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "cohere2_moe-sigmoid",
        "cohere2_moe",
        dict(num_experts=8, num_experts_per_tok=2, expert_selection_fn="sigmoid", rms_norm_eps=1e-6),
    ),
    Case(
        "hy_v3",
        "hy_v3",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            num_shared_experts=1,
            head_dim=16,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case("granitemoe", "granitemoe", dict(num_local_experts=8, num_experts_per_tok=2, **GRANITE_MULTIPLIERS)),
    Case(
        "granitemoeshared",
        "granitemoeshared",
        dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=64, **GRANITE_MULTIPLIERS),
        ROUTED | {OpKind.SHARED},
    ),
    Case(
        "gpt_oss",
        "gpt_oss",
        # Layers alternate sliding (window 6) and full attention, both with sinks.
        # A low swiglu_limit makes the clamps bite.
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=32,
            head_dim=16,
            sliding_window=6,
            swiglu_limit=0.5,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=150000.0, factor=32.0, original_max_position_embeddings=16
            ),
        ),
    ),
    Case(
        "dbrx",
        "dbrx",
        dict(
            d_model=48,
            n_heads=4,
            n_layers=3,
            attn_config=dict(kv_n_heads=2, clip_qkv=1.0, rope_theta=10000.0),
            ffn_config=dict(
                ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0
            ),
        ),
    ),
    Case(
        "deepseek_v3",
        "deepseek_v3",
        dict(**DEEPSEEK_ROUTING, **LATENT_ATTENTION, first_k_dense_replace=1),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "deepseek_v2",
        "deepseek_v2",
        # Full-rank queries (V2-Lite), softmax routing limited to the best group.
        dict(
            **{**DEEPSEEK_ROUTING, "n_shared_experts": 2},
            **{**LATENT_ATTENTION, "q_lora_rank": None},
            topk_method="group_limited_greedy",
            first_k_dense_replace=1,
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "glm4_moe_lite",
        "glm4_moe_lite",
        dict(**DEEPSEEK_ROUTING, **LATENT_ATTENTION, mlp_layer_types=["sparse", "dense", "sparse"]),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "mistral4",
        "mistral4",
        # Non-interleaved rotary; queries scaled from position 4 on (llama_4_scaling_beta).
        dict(
            **DEEPSEEK_ROUTING,
            **LATENT_ATTENTION,
            first_k_dense_replace=1,
            rope_interleave=False,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=128.0,
                original_max_position_embeddings=4,
                mscale_all_dim=1.0,
                mscale=1.0,
                llama_4_scaling_beta=0.5,
            ),
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
        model_class="Mistral4ForCausalLM",
    ),
    Case(
        "qwen3_next",
        "qwen3_next",
        # Gated DeltaNet, full attention, gated DeltaNet (dense MLP in the last layer).
        dict(**GATED_DELTANET, layer_types=["linear_attention", "full_attention", "linear_attention"]),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "qwen3_5_moe_text",
        "qwen3_5_moe_text",
        # Every layer is MoE (Qwen3.5 has no mlp_only_layers).
        dict(**GATED_DELTANET, layer_types=["linear_attention", "full_attention", "linear_attention"]),
        ROUTED | {OpKind.SHARED},
    ),
    Case(
        "granitemoe_swa",
        "granitemoe_swa",
        # Sinks on every layer; layer 0 slides with rotary, 1 is global NoPE, 2 global with rotary.
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=64,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            layer_rope_theta=[10000.0, 0, 500000.0],
            **GRANITE_MULTIPLIERS,
        ),
        ROUTED | {OpKind.SHARED},
    ),
    Case(
        "sarvam_moe",
        "sarvam_moe",
        dict(**DEEPSEEK_ROUTING, first_k_dense_replace=1),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "sarvam_mla",
        "sarvam_mla",
        dict(**DEEPSEEK_ROUTING, **LATENT_ATTENTION, first_k_dense_replace=1),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
    Case(
        "mimo_v2_flash",
        "mimo_v2_flash",
        # Layers 0 and 2 slide (window 6) with sinks and 4 KV heads; layer 1 is global with 2.
        dict(
            **{**DEEPSEEK_ROUTING, "n_shared_experts": None},
            head_dim=16,
            v_head_dim=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
            sliding_window=6,
            attention_value_scale=0.7,
        ),
        ROUTED | {OpKind.MLP},
    ),
    Case(
        "hunyuan_v1_moe",
        "hunyuan_v1_moe",
        dict(num_experts=8, moe_topk=2, head_dim=12),
        ROUTED | {OpKind.SHARED},
    ),
    Case(
        "llama4_text",
        "llama4_text",
        # Layers 0 and 2: chunked attention (chunks of 5) with rotary and L2 q/k norm; layer 1:
        # global NoPE attention with the query temperature. Layers 0 and 2 are MoE, 1 dense.
        dict(
            num_local_experts=8,
            num_experts_per_tok=1,
            intermediate_size=32,
            intermediate_size_mlp=64,
            head_dim=16,
            no_rope_layers=[1, 0, 1],
            attention_chunk_size=5,
            moe_layers=[0, 2],
            floor_scale=4,
            attn_scale=0.5,
        ),
        ROUTED | {OpKind.SHARED, OpKind.MLP},
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads. Tiny models gain nothing from threads, and on a busy
    2-core machine OpenMP's spinning threads make each small matmul many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- drivers
def run_forward(
    model: MoEModel, cache: Any, token_ids: Sequence[int], seen: set[OpKind] | None = None
) -> torch.Tensor:
    """One forward pass with every op run at once, alone; returns the last row's logits."""
    steps = model.forward(cache, torch.tensor(list(token_ids), dtype=torch.long))
    result = None
    while True:
        try:
            op = steps.send(result)
        except StopIteration as stop:
            return stop.value
        if seen is not None:
            seen.add(op.kind)
        result = model.run([op])[0]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@dataclasses.dataclass
class Trace:
    """What one request produced under a driver: its tokens and every op result, in order."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    results: list[tuple[Key, Any]] = dataclasses.field(default_factory=list)


def run_alone(model: MoEModel, prompt: Sequence[int], params: SamplingParams) -> Trace:
    """One request's :func:`generation_steps`, each op run by itself as soon as it is yielded."""
    return run_together(model, [prompt], params)[0]


def run_together(
    model: MoEModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    join_after: Sequence[int] | None = None,
    choose: Callable[[list[Key]], Key] = min,
    subset: Callable[[list[int]], list[int]] = lambda ids: ids,
    calls: list[tuple[OpKind, list[int]]] | None = None,
) -> list[Trace]:
    """Drive several requests' op streams at once, running ops with equal keys as one batched call.

    Request ``i`` joins once request 0 has produced ``join_after[i]`` tokens (all at once by
    default), so a late prefill meets the others' decode steps. Each call runs one key: ``choose``
    picks it among the pending ops' keys and ``subset`` picks which of the requests waiting on it
    run now (all by default). ``calls`` receives each batched call's kind and row counts.
    """
    join_after = list(join_after) if join_after is not None else [0] * len(prompts)
    traces = [Trace() for _ in prompts]
    gens: dict[int, Generator[Op | Token, Any, Any]] = {}
    pending: dict[int, Op] = {}

    def advance(i: int, result: Any) -> None:
        while True:
            try:
                item = gens[i].send(result)
            except StopIteration:
                return
            if isinstance(item, Token):
                traces[i].tokens.append(item.token_id)
                result = None
                continue
            pending[i] = item
            return

    while True:
        for i, after in enumerate(join_after):
            if i not in gens and (i == 0 or len(traces[0].tokens) >= after):
                gens[i] = generation_steps(model, prompts[i], params)
                advance(i, None)
        if not pending:
            if len(gens) < len(prompts):
                raise ValueError(f"request 0 finished before requests could join after {join_after}")
            return traces
        key = choose(sorted({op.key for op in pending.values()}))
        ids = subset(sorted(i for i, op in pending.items() if op.key == key))
        ops = [pending.pop(i) for i in ids]
        results = model.run(ops)
        if calls is not None:
            calls.append((ops[0].kind, [op.rows for op in ops]))
        for i, op, result in zip(ids, ops, results):
            traces[i].results.append((op.key, result))
            advance(i, result)


def layer_major(keys: list[Key]) -> Key:
    """The pending key earliest in the forward pass (lowest layer, then op kind): keeps requests in step."""
    return min(keys, key=lambda k: (k[1], k[0], k[2]))


def random_choice(rng: random.Random) -> tuple[Callable[[list[Key]], Key], Callable[[list[int]], list[int]]]:
    """A ``choose``/``subset`` pair that picks keys and batch members at random."""

    def choose(keys: list[Key]) -> Key:
        return rng.choice(keys)

    def subset(ids: list[int]) -> list[int]:
        picked = [i for i in ids if rng.random() < 0.7]
        return picked or [rng.choice(ids)]

    return choose, subset
