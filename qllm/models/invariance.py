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
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Padding = tuple[int, int]
"""``(multiple, minimum)``: a call's rows are zero-padded up to a multiple of ``multiple`` and to
at least ``minimum`` rows."""

NO_PADDING: Padding = (1, 1)

CANDIDATES: tuple[Padding, ...] = ((1, 1), (1, 2), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32), (64, 64))
"""Paddings tried, cheapest first. Multiples are powers of two, so the largest multiple an op
kind's GEMMs need is a multiple of every other: padding to it keeps each of them invariant."""

PROBE_FLOPS = 3e8
"""Work allowed per GEMM and candidate (about); bounds the rows probed for large weights."""

PROBE_VERSION = 4
"""Part of the cache key: a change to how probes decide invalidates what older ones found."""

MAX_PROBE_ROWS = 192
"""Row counts are probed up to this (or to twice the candidate multiple, if larger)."""

_GEMMS = {"aten::mm", "aten::addmm", "aten::_addmm_activation", "mkldnn::_linear_pointwise"}


@dataclass
class Gemm:
    """One GEMM call an op runs: the kernel, its arguments, and which argument holds the rows."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    row_arg: int

    @property
    def rows_in(self) -> torch.Tensor:
        return self.args[self.row_arg]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[self.row_arg] = x
        return self.func(*args, **self.kwargs)

    def flops_per_row(self) -> float:
        w = [
            a
            for i, a in enumerate(self.args)
            if isinstance(a, torch.Tensor) and i != self.row_arg and a.dim() == 2
        ]
        return 2.0 * (w[0].numel() if w else self.rows_in.shape[1])

    def signature(self) -> str:
        """What picks the kernel path: the op, and shape, dtype, layout and device of each operand."""
        parts = [str(self.func)]
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                shape = ("N", *a.shape[1:]) if i == self.row_arg else tuple(a.shape)
                layout = a.stride() if a.layout is torch.strided else a.layout  # packed: no strides
                parts.append(f"{shape}:{a.dtype}:{layout}:{a.device.type}")
            else:
                parts.append(repr(a))
        return "|".join(parts)


class _Recorder(TorchDispatchMode):
    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows
        self.gemms: list[Gemm] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in _GEMMS:
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == self.rows:
                    self.gemms.append(Gemm(func, tuple(args), dict(kwargs), i))
                    break
        return func(*args, **kwargs)


def trace_gemms(call: Callable[[], Any], rows: int) -> list[Gemm]:
    """The GEMMs ``call`` runs on its ``rows`` input rows, one per distinct signature."""
    recorder = _Recorder(rows)
    with recorder:
        call()
    unique: dict[str, Gemm] = {}
    for gemm in recorder.gemms:
        unique.setdefault(gemm.signature(), gemm)
    return list(unique.values())


def _counts(padding: Padding, top: int, rng: random.Random) -> list[int]:
    """Row counts to test, smallest first (where ragged tails and lone rows differ), then others."""
    multiple, minimum = padding
    allowed = list(range(max(minimum, multiple), top + 1, multiple))
    rest = allowed[3:]
    rng.shuffle(rest)
    return allowed[:3] + rest


def is_invariant(
    gemm: Callable[[torch.Tensor], torch.Tensor],
    make_rows: Callable[[int], torch.Tensor],
    padding: Padding,
    max_rows: int,
    *,
    budget_rows: int | None = None,
    max_windows: int = 256,
    seed: int = 0,
) -> bool:
    """Whether every row gets the same result at each tested row count and offset under ``padding``.

    A block of random rows (``max_rows``, or two of the padding's multiples if more) is computed at
    once; then windows of it, each a row count the padding allows, placed at random offsets, must
    reproduce the block's rows bit for bit. Blocks and windows are drawn until ``budget_rows`` rows
    (default: three blocks' worth) have been computed or ``max_windows`` windows tested. A cheap
    kernel thus gets many windows: a remainder loop may differ for only a few percent of values.
    """
    multiple, minimum = padding
    top = max(max_rows, 2 * multiple, minimum)
    top -= top % multiple
    budget = budget_rows if budget_rows is not None else 3 * top
    rng = random.Random(seed)
    spent = windows = 0
    while spent < budget and windows < max_windows:
        x = make_rows(top)
        whole = gemm(x)
        spent += top
        for count in _counts(padding, top, rng):
            start = rng.randint(0, top - count)
            if not _same_rows(gemm(x[start : start + count].contiguous()), whole, start, count):
                return False
            spent += count
            windows += 1
            if spent >= budget or windows >= max_windows:
                break
    return True


def _same_rows(part: Any, whole: Any, start: int, count: int) -> bool:
    if isinstance(part, torch.Tensor):
        return torch.equal(part, whole[start : start + count])
    return all(_same_rows(p, w, start, count) for p, w in zip(part, whole, strict=True))


def find_padding(
    gemm: Callable[[torch.Tensor], torch.Tensor],
    make_rows: Callable[[int], torch.Tensor],
    max_rows: int,
    candidates: Iterable[Padding] = CANDIDATES,
    budget_rows: int | None = None,
) -> Padding | None:
    """The cheapest candidate padding under which ``gemm`` is batch-invariant, or None."""
    for padding in candidates:
        if is_invariant(gemm, make_rows, padding, max_rows, budget_rows=budget_rows):
            return padding
    return None


def combine(paddings: Iterable[Padding]) -> Padding:
    """One padding that keeps each of ``paddings``' GEMMs invariant (multiples are powers of two)."""
    multiple, minimum = NO_PADDING
    for m, k in paddings:
        multiple, minimum = max(multiple, m), max(minimum, k)
    return multiple, minimum


def probe_gemm(gemm: Gemm) -> Padding | None:
    """:func:`find_padding` for a traced GEMM, on random rows shaped like its input."""
    x = gemm.rows_in
    gen = torch.Generator().manual_seed(0)
    max_rows = probe_rows(gemm.flops_per_row())

    def make_rows(n: int) -> torch.Tensor:
        rows = torch.randn(n, *x.shape[1:], generator=gen, dtype=torch.float32)
        return rows.to(dtype=x.dtype, device=x.device)

    return find_padding(gemm, make_rows, max_rows, budget_rows=probe_budget(gemm.flops_per_row(), max_rows))


def probe_rows(flops_per_row: float) -> int:
    """Rows in a probe's block: a third of :data:`PROBE_FLOPS` of work, 4 to :data:`MAX_PROBE_ROWS`."""
    return int(max(4, min(MAX_PROBE_ROWS, PROBE_FLOPS / (3 * max(flops_per_row, 1.0)))))


def probe_budget(flops_per_row: float, max_rows: int) -> int:
    """Rows a probe may compute for one candidate: about :data:`PROBE_FLOPS` of work, at least
    three blocks of ``max_rows``."""
    return int(max(3 * max_rows, min(PROBE_FLOPS / max(flops_per_row, 1.0), 1e6)))


# ---------------------------------------------------------------------- machine and cache


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


def coarser(padding: Padding) -> list[Padding]:
    """``padding`` and then each candidate that keeps it (a multiple of it), cheapest first."""
    out = [padding]
    for candidate in CANDIDATES:
        both = combine([padding, candidate])
        if both not in out:
            out.append(both)
    return out


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
