"""Mistral 4: multi-head latent attention (qllm/models/mla.py) whose queries are scaled by a
position-dependent factor (``llama_4_scaling_beta``), a softmax router with grouped top-k,
shared experts and leading dense layers."""

import math

import torch

from qllm.models.mla import LatentAttention


class Mistral4(LatentAttention):
    family = "mistral4"
    model_types = ("mistral4",)

    def scale_query(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rope = self.config.rope_parameters
        beta, length = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
        if beta is None:
            return q
        # Per position in Python: a vectorised log over the batch's positions could round a row
        # differently depending on how many rows share the call.
        scale = [1 + beta * math.log(1 + p // length) for p in positions.tolist()]
        return q * torch.tensor(scale, device=q.device)[:, None, None].to(q.dtype)
