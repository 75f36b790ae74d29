"""The messages between rank 0 and a worker: a fixed-size int64 header on the control group,
then (for an expert call and its reply) the rows on the data group.

A request header is ``[op, layer, expert, rows, cols, dtype, seq, 0]``; its reply header is
``[status, layer, expert, rows, cols, dtype, seq, 0]``. An expert call's reply always carries a
payload of the request's shape (zeros with an error status), so rank 0 can post the receive of
the reply before the worker has computed anything, and every message gets exactly one reply.
"""

from __future__ import annotations

import enum

import torch

HEADER = 8
"""int64 values in a header."""


class Op(enum.IntEnum):
    STOP = 0  # the worker replies and exits
    EXPERT = 1  # compute expert ``expert`` of MoE layer ``layer`` on the payload's rows


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1  # the worker could not compute the call (the payload is zeros); it keeps serving


DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPES.index(dtype)
    except ValueError:
        raise ValueError(
            f"expert parallel exchanges float32, bfloat16 or float16 rows, not {dtype}"
        ) from None


def header(
    op: int, layer: int = 0, expert: int = 0, shape: tuple[int, int] = (0, 0), dtype: int = 0, seq: int = 0
):
    """A header tensor."""
    return torch.tensor([int(op), layer, expert, shape[0], shape[1], dtype, seq, 0], dtype=torch.int64)


def empty_header() -> torch.Tensor:
    return torch.zeros(HEADER, dtype=torch.int64)
