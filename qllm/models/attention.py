"""Softmax attention of one request's queries over its keys and values, as the executor runs it.

Each request attends by itself (its own causal mask, window, chunk and sinks), so its output does
not depend on which requests share the op; tests/test_attention_invariance.py checks it against a
reference.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from qllm.models import gemm, skinny

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


@functools.cache
def _decode_kernel() -> Any:
    long, ptr = ctypes.c_long, ctypes.c_void_p
    arrays = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]  # queries, keys, values (with strides), lengths
    shapes = [long, long, long, long, ctypes.c_float]  # KV heads, group, D, Dv, scale
    return skinny.c_function("qllm_decode_attention", [long, *arrays, *shapes, ptr, ptr, long, ctypes.c_int])


def attend_requests(
    queries: Sequence[torch.Tensor],
    kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    expand_kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
    scale: float,
    window: int | None,
    chunk: int | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Each request's attention: its query rows ``[n, Hq, D]`` over its keys and values ``[Hkv,
    T, D]``; returns the rows' outputs ``[sum n, Hq * Dv]`` in order. ``expand_kv``: the family's
    hook from what the cache holds to what attention reads (None: the cache as it is).

    Requests with one query row and keys the cache holds as they are (a decode step) run together
    in one call of qllm's C kernel (:func:`decodes`); the others one by one (:func:`attend`), each
    on the thread count its own size picks. Which way a request goes depends only on itself, so
    its result is the same in any batch."""
    fast = [
        i
        for i, (qi, (keys, values)) in enumerate(zip(queries, kv))
        if expand_kv is None and decodes(qi, keys, values, window, chunk, sinks)
    ]
    outs: dict[int, torch.Tensor] = {}
    if fast:
        together = attend_decode(torch.cat([queries[i] for i in fast]), [kv[i] for i in fast], scale)
        outs = dict(zip(fast, together.split(1)))
    threads = torch.get_num_threads()
    current = threads
    try:
        for i, (qi, (keys, values)) in enumerate(zip(queries, kv)):
            if i in outs:
                continue
            # The request's own size picks the thread count of all its work (expand_kv may run
            # GEMMs), so it is computed the same way in any batch.
            wanted = 1 if small_attention(qi, keys.shape[1]) else threads
            if wanted != current:
                torch.set_num_threads(wanted)
                current = wanted
            if expand_kv is not None:
                keys, values = expand_kv(keys, values)
            outs[i] = attend(qi, keys, values, scale, window, chunk=chunk, sinks=sinks).reshape(
                qi.shape[0], -1
            )
    finally:
        if current != threads:
            torch.set_num_threads(threads)
    return outs[0] if len(outs) == 1 else torch.cat([outs[i] for i in range(len(queries))])


def decodes(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    window: int | None,
    chunk: int | None,
    sinks: torch.Tensor | None,
) -> bool:
    """Whether :func:`attend_decode` computes this request's attention: one query row, float32 on a
    CPU where qllm's skinny kernel runs, keys every query sees (no window or chunk cutting them),
    no sinks, each key and value row contiguous."""
    total = keys.shape[1]
    return (
        q.shape[0] == 1
        and sinks is None
        and (window is None or total <= window)
        and (chunk is None or total <= chunk)
        and q.dtype == keys.dtype == values.dtype == torch.float32
        and q.device.type == "cpu"
        and keys.stride(2) == 1
        and values.stride(2) == 1
        and q.shape[1] % keys.shape[0] == 0
        and gemm.SKINNY
        and _decode_kernel() is not None
    )


def attend_decode(
    q: torch.Tensor, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float
) -> torch.Tensor:
    """The attention of requests with one query row each, in one call of qllm's C kernel
    (:file:`skinny.c`): query rows ``q`` ``[R, Hq, D]``, each request's keys and values ``[Hkv, T,
    D]`` (:func:`decodes` true for each). Returns ``[R, Hq * Dv]``; each (request, KV head) is
    computed on its own, so a request's output is the same bits in any batch."""
    fn = _decode_kernel()
    q = q.contiguous()
    count, heads, d = q.shape
    kv_heads, dv = kv[0][0].shape[0], kv[0][1].shape[-1]
    out = torch.empty(count, heads * dv, dtype=torch.float32)
    longest = max(1, *(keys.shape[1] for keys, _ in kv))
    threads = torch.get_num_threads()
    scratch = torch.empty(threads, longest, dtype=torch.float32)
    pointers, longs = ctypes.c_void_p * count, ctypes.c_long * count
    fn(
        count, pointers(*(q[i].data_ptr() for i in range(count))),
        pointers(*(k.data_ptr() for k, _ in kv)), longs(*(k.stride(0) for k, _ in kv)),
        longs(*(k.stride(1) for k, _ in kv)),
        pointers(*(v.data_ptr() for _, v in kv)), longs(*(v.stride(0) for _, v in kv)),
        longs(*(v.stride(1) for _, v in kv)), longs(*(k.shape[1] for k, _ in kv)),
        kv_heads, heads // kv_heads, d, dv, float(scale),
        pointers(*(out[i].data_ptr() for i in range(count))), scratch.data_ptr(), longest, threads,
    )  # fmt: skip
    return out
