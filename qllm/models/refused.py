"""MoE model types that qllm recognises but does not run, each with the reason.

``qllm models`` lists them and loading one fails with its reason, so a user learns which
mechanism is missing rather than a bare "unsupported architecture"."""

REFUSED: dict[str, str] = {
    "kimi_linear": "linear attention of kind KDA (Kimi Delta Attention) not supported",
    "granitemoehybrid": "linear attention of kind mamba2 not supported",
    "lfm2_moe": "linear attention of kind short convolution (LFM2 conv layers) not supported",
    "deepseek_v32": "sparse attention of kind DSA (a lightning indexer picks each query's keys) not supported",
    "glm_moe_dsa": "sparse attention of kind DSA (a lightning indexer picks each query's keys) not supported",
    "deepseek_v4": "sparse attention with an indexer over shared-KV multi-query attention not supported",
    "longcat_flash": (
        "two latent-attention blocks per layer with a shortcut-connected MoE and zero-computation experts "
        "not supported"
    ),
    "jetmoe": "mixture of attention heads (MoA, experts inside attention) not supported",
}
"""``config.json`` ``model_type`` -> why qllm refuses it."""
