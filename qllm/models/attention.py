"""Softmax attention of one request's queries over its keys and values, as the executor runs it.

Each request attends by itself (its own causal mask, window, chunk and sinks), so its output does
not depend on which requests share the op; tests/test_attention_invariance.py checks it against a
reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SERIAL_ATTENTION_MACS = 1 << 21
"""A request's attention with at most this many multiply-adds (queries x keys x query heads x
head dim; 2M is a decode step of 16 heads of 64 over 2048 keys) runs on one thread."""


def small_attention(q: torch.Tensor, keys: int) -> bool:
    """Whether the attention of queries ``q`` ``[n, Hq, D]`` over ``keys`` keys is small enough to
    compute on one thread: a parallel region costs tens of microseconds on idle cores and up to a
    scheduler time slice (milliseconds) when another process holds one, far more than the second
    thread saves on a decode step. Depends only on the request's own shapes (and device: the
    thread count only concerns CPU kernels)."""
    return q.device.type == "cpu" and q.shape[0] * q.shape[1] * q.shape[2] * keys <= SERIAL_ATTENTION_MACS


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    *,
    chunk: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one request's query rows ``q`` ``[n, Hq, D]`` over its keys/values
    ``[Hkv, T, D]``: each row's heads' outputs ``[n, Hkv, Hq // Hkv, Dv]``, grouped by KV head.

    ``window``: a query sees only its last ``window`` keys; ``chunk``: only keys of its own
    ``chunk``-long block of positions; ``sinks`` ``[Hq]``: one extra logit per head in the softmax,
    whose probability mass is dropped (attends to nothing)."""
    n, total, kv_heads = q.shape[0], k.shape[1], k.shape[0]
    past = total - n
    mask = None
    causal = False
    limited = (window is not None and total > window) or (chunk is not None and total > chunk)
    if (n > 1 and past > 0) or limited or (sinks is not None and n > 1):
        qpos = torch.arange(past, total, device=q.device)[:, None]
        kpos = torch.arange(total, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        if chunk is not None:
            mask &= kpos // chunk == qpos // chunk
    elif n > 1:
        causal = True
    if n == 1:
        # A decode step: the query heads that share a KV head attend as the rows of one query
        # block ([1, Hkv, group, D]; the mask, one row, applies to each), so the kernel runs one
        # work item and one small GEMM per KV head rather than one per query head.
        q = q.reshape(1, kv_heads, -1, q.shape[-1])
    else:
        q = q.transpose(0, 1)[None]  # [1, Hq, n, D]
    if sinks is not None:
        out = attend_with_sinks(q[0], k, v, scale, mask, sinks)[None]
    else:
        out = F.scaled_dot_product_attention(
            q,
            k[None],
            v[None],
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=q.shape[1] != kv_heads,
        )
    if n == 1:
        return out  # [1, Hkv, group, Dv]
    return out[0].transpose(0, 1).view(n, kv_heads, -1, out.shape[-1])


def attend_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """:func:`attend` with sink logits: q ``[Hq, n, D]``, or for one query ``[Hkv, group, D]``
    (each KV head's query heads as rows); returns q's shape with v's width."""
    group = q.shape[0] // k.shape[0]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    logits = torch.matmul(q, k.transpose(1, 2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    # Per head: [Hq, 1, 1] broadcast over a head's queries, or [Hkv, group, 1] for grouped rows.
    sink = sinks.to(logits.dtype).view(q.shape[0], -1, 1).expand(-1, q.shape[1], 1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
