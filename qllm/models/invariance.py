"""Batch invariance established on the running machine, not assumed.

A GEMM kernel may compute a row differently depending on how many rows share the call: BLAS and
oneDNN pick code paths by row count (a ragged tail of rows, a lone row, how OpenMP splits rows
among threads), and which paths they pick depends on the CPU vendor, its instruction set and the
thread count. Padding a call's rows with zeros to a count the kernel treats uniformly makes each
row's result independent of its batch mates; which counts those are is a property of the machine.

So the executor *probes*. At load it traces one short forward pass and records every GEMM each op
kind runs (:func:`trace_gemms`: the real kernel call, its weight, dtype and layout). For each, it
tries paddings from cheapest to dearest (:data:`CANDIDATES`) and keeps the first under which a row
gives bit-identical results at every tested row count and offset (:func:`find_padding`). An op
kind pads to what all its GEMMs need. A GEMM that no candidate makes invariant leaves its op kind
unverified: the executor then does not pad it, warns once, and says so in ``stats()``.

Results are cached per machine (CPU model and features, torch version, thread count) in
``$XDG_CACHE_HOME/qllm/invariance.json``, keyed by each GEMM's signature, so a restart pays only
the trace.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qllm.models.probe import (
    CANDIDATES,
    MAX_PROBE_ROWS,
    NO_PADDING,
    PROBE_FLOPS,
    PROBE_VERSION,
    Gemm,
    Padding,
    coarser,
    combine,
    find_padding,
    is_invariant,
    probe_budget,
    probe_gemm,
    probe_rows,
    trace_gemms,
)

__all__ = [
    "CANDIDATES",
    "MAX_PROBE_ROWS",
    "NO_PADDING",
    "PROBE_FLOPS",
    "PROBE_VERSION",
    "Calibration",
    "Gemm",
    "Padding",
    "ProbeCache",
    "cache_path",
    "calibrate",
    "coarser",
    "combine",
    "find_padding",
    "is_invariant",
    "machine",
    "probe_budget",
    "probe_gemm",
    "probe_rows",
    "trace_gemms",
]


def machine() -> dict[str, Any]:
    """What the cache is keyed on: CPU model and features, torch version and build, threads."""
    cpu, features = platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        info = {}
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu = (
        info.get("model name") or info.get("CPU part") or info.get("Hardware") or platform.processor() or cpu
    )
    features = info.get("flags") or info.get("Features") or ""
    return {
        "cpu": cpu,
        "cpu_features": hashlib.sha256(features.encode()).hexdigest()[:12],
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "onednn": torch.backends.mkldnn.is_available(),
        "threads": torch.get_num_threads(),
        "probe": PROBE_VERSION,
    }


def _device_key(gemm: Gemm) -> str:
    device = gemm.rows_in.device
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}:{torch.version.cuda}"
    return device.type


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qllm" / "invariance.json"


MAX_CACHE_ENTRIES = 4096


class ProbeCache:
    """What probes found on this machine: per GEMM signature, the padding (None where none is
    invariant); per model, the padding of each op kind (so a restart skips the trace as well)."""

    def __init__(self, path: Path | None = None, *, persist: bool = True):
        self.path = path or cache_path()
        self.persist = persist
        self.gemms: dict[str, Padding | None] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if not persist:
            return  # probe afresh, keep nothing
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if (
            isinstance(raw, dict)
            and isinstance(raw.get("gemms"), dict)
            and isinstance(raw.get("models"), dict)
        ):
            self.gemms = {k: _padding_or_none(v) for k, v in raw["gemms"].items()}
            self.models = {k: v for k, v in raw["models"].items() if isinstance(v, dict)}

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def save(self) -> None:
        if not self.dirty or not self.persist:
            return
        raw = {
            "gemms": {k: list(v) if v else None for k, v in list(self.gemms.items())[-MAX_CACHE_ENTRIES:]},
            "models": dict(list(self.models.items())[-MAX_CACHE_ENTRIES:]),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(raw), encoding="utf-8")
            tmp.replace(self.path)
        except OSError:
            pass  # a read-only home: the next start probes again
        self.dirty = False


def _padding_or_none(value: Any) -> Padding | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value):
        return value[0], value[1]
    return None


@dataclass
class Calibration:
    """What the probe established for one executor at one thread count."""

    padding: dict[str, Padding] = field(default_factory=dict)
    """Op kind name -> padding its calls use."""
    unverified: dict[str, list[str]] = field(default_factory=dict)
    """Op kind name -> signatures of its GEMMs that no candidate made invariant."""
    gemms: int = 0
    probed: int = 0
    ops_checked: int = 0
    cached: int = 0
    probe_s: float = 0.0
    """Seconds spent: the trace and the probes, or the cache lookup."""
    threads: int = 0
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return not self.unverified

    def summary(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "verified": self.verified,
            "padding": {kind: list(p) for kind, p in self.padding.items()},
            "unverified": {kind: len(s) for kind, s in self.unverified.items()},
            "gemms": self.gemms,
            "probed": self.probed,
            "ops_checked": self.ops_checked,
            "from_cache": self.cached,
            "probe_s": round(self.probe_s, 4),
            "threads": self.threads,
            "cpu": self.machine.get("cpu"),
        }


def calibrate(
    trace: Callable[[], dict[str, list[Gemm]]],
    model_key: str,
    device: str,
    cache: ProbeCache | None = None,
    probe: Callable[[Gemm], Padding | None] | None = None,
    verify: Callable[[str, Padding], bool] | None = None,
) -> Calibration:
    """Padding per op kind of one model: from the cache, else by tracing its GEMMs (``trace``),
    probing those the cache does not know, then checking each op kind whole (``verify``: its
    other row-wise work, such as an activation over a few columns, may also vary with the row
    count) at that padding or the next coarser one that passes. ``model_key`` identifies the
    model's shapes and layout."""
    cache = cache if cache is not None else ProbeCache()
    probe = probe or probe_gemm
    where = machine()
    result = Calibration(threads=where["threads"], machine=where)
    start = time.perf_counter()
    whole = cache.key(where, device, model_key)
    known = cache.models.get(whole)
    if known is not None:
        result.padding = {k: p for k, v in known.get("padding", {}).items() if (p := _padding_or_none(v))}
        result.unverified = {k: list(v) for k, v in known.get("unverified", {}).items()}
        result.cached = result.gemms = int(known.get("gemms", 0))
        result.probe_s = time.perf_counter() - start
        return result
    for kind, gemms in trace().items():
        found: list[Padding] = []
        for gemm in gemms:
            result.gemms += 1
            key = cache.key(where, _device_key(gemm), gemm.signature())
            if key in cache.gemms:
                padding = cache.gemms[key]
                result.cached += 1
            else:
                padding = probe(gemm)
                cache.gemms[key] = padding
                result.probed += 1
            if padding is None:
                result.unverified.setdefault(kind, []).append(gemm.signature())
            else:
                found.append(padding)
        if kind in result.unverified:
            result.padding[kind] = NO_PADDING
            continue
        result.padding[kind] = combine(found)
        if verify is None:
            continue
        for padding in coarser(result.padding[kind]):
            result.ops_checked += 1
            if verify(kind, padding):
                result.padding[kind] = padding
                break
        else:
            result.unverified[kind] = [f"{kind} op (its row-wise work besides GEMMs)"]
            result.padding[kind] = NO_PADDING
    cache.models[whole] = {
        "padding": {k: list(p) for k, p in result.padding.items()},
        "unverified": result.unverified,
        "gemms": result.gemms,
    }
    cache.dirty = True
    cache.save()
    result.probe_s = time.perf_counter() - start
    return result
