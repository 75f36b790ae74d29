"""What a frame too large to read whole still tells: its ``id``, from its first bytes.

A peer that refuses an oversized frame skips its payload (:func:`skip_payload`) and, when the
frame's leading pairs name a request (:func:`frame_id`), fails only that request.
"""

from __future__ import annotations

import asyncio
from typing import Any

PREFIX_BYTES = 64  # enough for the ``type`` and ``id`` a server writes first in every frame


def frame_id(prefix: bytes) -> int | None:
    """The ``id`` of a frame from the first bytes of its payload, or None if they do not show one.

    Reads a map's leading pairs while keys are strings and values are scalars (the server writes
    ``type`` then ``id`` first), so the id of a frame too large to read whole is still known.
    """
    try:
        at, pairs = _map_header(prefix)
        for _ in range(pairs):
            at, key = _scalar(prefix, at)
            at, value = _scalar(prefix, at)
            if key == "id":
                return value if isinstance(value, int) and not isinstance(value, bool) else None
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    return None


def _map_header(b: bytes) -> tuple[int, int]:
    lead = b[0]
    if 0x80 <= lead <= 0x8F:
        return 1, lead & 0x0F
    if lead == 0xDE:
        return 3, int.from_bytes(b[1:3], "big")
    if lead == 0xDF:
        return 5, int.from_bytes(b[1:5], "big")
    raise ValueError("not a map")


_SIZED = {0xD9: 1, 0xDA: 2, 0xDB: 4}  # str 8/16/32: bytes of the length
_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_INT = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}


def _need(b: bytes, end: int) -> None:
    if end > len(b):
        raise ValueError("truncated")


def _scalar(b: bytes, at: int) -> tuple[int, Any]:
    """One str, int, bool or nil at ``at``: (the offset after it, its value)."""
    lead = b[at]
    if lead <= 0x7F or lead >= 0xE0:
        return at + 1, lead if lead <= 0x7F else lead - 0x100
    if 0xA0 <= lead <= 0xBF or lead in _SIZED:
        width = _SIZED.get(lead, 0)
        start = at + 1 + width
        size = lead & 0x1F if not width else int.from_bytes(b[at + 1 : start], "big")
        _need(b, start + size)
        return start + size, b[start : start + size].decode()
    if lead in _UINT or lead in _INT:
        width = _UINT.get(lead) or _INT[lead]
        _need(b, at + 1 + width)
        return at + 1 + width, int.from_bytes(b[at + 1 : at + 1 + width], "big", signed=lead in _INT)
    if lead in (0xC0, 0xC2, 0xC3):
        return at + 1, {0xC0: None, 0xC2: False, 0xC3: True}[lead]
    raise ValueError("not a scalar")


async def skip_payload(reader: asyncio.StreamReader, size: int) -> bytes:
    """Read and discard a payload of ``size`` bytes; returns its first :data:`PREFIX_BYTES`."""
    prefix = await reader.readexactly(min(size, PREFIX_BYTES))
    left = size - len(prefix)
    while left:
        left -= len(await reader.readexactly(min(left, 1 << 16)))
    return prefix
