"""qllm's skinny GEMM: ``x @ w.T`` for a few rows of float32, streaming the weight once.

A decode step multiplies one to a few dozen rows by each weight, so it is bound by how fast the
weights stream from memory, and a general GEMM kernel (MKL, oneDNN) loses part of that speed to
its blocking for many rows. :file:`skinny.c` computes each output as one dot product over the
weight's row as it is stored, a few rows by a few columns at a time, the columns split between
threads, each thread prefetching its next block of weight rows while it computes the current one.
Every row runs the same arithmetic whatever the call's row count, offset and thread count, so it
is batch-invariant without padding (the executor's probe still checks it on each machine). It
needs no packed copy of the weight. Measured on the 2-core EPYC, streamed (docs/architecture.md,
"The skinny kernel"), it reads the weights 1.3-1.6x faster than packed oneDNN at 1-2 rows,
1.03-1.14x at 4-16, and 3-6% slower at 64, where compute bounds it.

The C source is compiled on first use with the machine's C compiler (``$CC``, else ``cc``) for
the machine's own CPU (``-march=native``) and kept in ``$XDG_CACHE_HOME/qllm/``, keyed by the
source, the compiler and the CPU, so a shared home directory never loads code built for another
CPU. It is used by default on x86-64 CPUs with AVX2 and FMA; ``QLLM_SKINNY=0`` turns it off and
``QLLM_SKINNY=1`` tries it on any CPU. Where it is not used, or does not build (no compiler),
:func:`available` is false and :mod:`qllm.models.gemm` runs oneDNN. The kernel is registered as the torch
op ``qllm::skinny_linear``, so the invariance probe traces it like any other GEMM.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qllm import paths
from qllm.logging import get_logger

log = get_logger()

SOURCE = Path(__file__).with_name("skinny.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11", "-ffp-contract=off")
"""``-ffp-contract=off``: the kernel fuses multiply-adds itself, explicitly. Left to fuse them, the compiler fuses
some (into FMAs) and not others (a vectorised remainder loop), and a row's result would depend on
which code path its block took."""
ARCH_FLAGS = ("-march=native",)
"""The machine's own instruction set: built for less, the kernel is slower than oneDNN."""

KERNEL_ID = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
"""The digest of the source and flags, an argument of every call: the invariance probe's cache
keys a GEMM by its arguments, so a changed kernel is probed again."""


@functools.cache
def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [
        line
        for line in text.splitlines()
        if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")
    ]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str) -> Path | None:
    """The compiled library, from the cache or built now; None if the compiler fails."""
    flags = (*FLAGS, *ARCH_FLAGS)
    identity = [
        SOURCE.read_bytes(),
        cc,
        _compiler_version(cc),
        " ".join(flags),
        _cpu_identity(),
        platform.machine(),
    ]
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in identity)).hexdigest()
    target = paths.cache_dir() / f"skinny-{key[:24]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run(
                [cc, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                log.info("skinny_build_failed", compiler=cc, flags=" ".join(flags), stderr=done.stderr[-400:])
                return None
            os.replace(out, target)  # atomic: a concurrent build leaves one whole file
        return target
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("skinny_build_failed", compiler=cc, error=str(exc))
        return None


def wanted() -> bool:
    """Whether to build and use the kernel here: ``QLLM_SKINNY=1`` forces it, ``0`` turns it off;
    by default it is used on x86-64 CPUs with AVX2 and FMA (where it was measured faster)."""
    setting = os.environ.get("QLLM_SKINNY", "")
    if setting in ("0", "1"):
        return setting == "1"
    flags = set()
    for line in _cpu_identity().splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= flags


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (this module's GEMM, and the SwiGLU experts of :mod:`qllm.models.swiglu`),
    built on first use; None where the kernel is not wanted or does not build here."""
    if not wanted() or not torch.backends.openmp.is_available():
        return None
    cc = _compiler()
    if cc is None:
        return None
    path = _build(cc)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        log.info("skinny_load_failed", path=str(path), error=str(exc))
        return None


def c_function(name: str, argtypes: list[Any], restype: Any = None) -> Any:
    """Function ``name`` of the compiled :func:`library`, with its argument and result types set;
    None where the library is not built here or lacks it. (Call it under a cache: each call sets
    the types again.)"""
    lib = library()
    if lib is None:
        return None
    fn = getattr(lib, name, None)
    if fn is None:
        log.info("skinny_load_failed", function=name)
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


_library: torch.library.Library | None = None
_defined: set[str] = set()


def define_op(schema: str, impl: Callable[..., Any]) -> None:
    """Define the CPU torch op ``torch.ops.qllm.NAME`` of ``schema`` (``"NAME(args) -> result"``),
    once per process, in qllm's one op library: the kernels here and in qllm/models/swiglu.py."""
    global _library
    name = schema.partition("(")[0]
    if name in _defined:
        return
    if _library is None:
        _library = torch.library.Library("qllm", "FRAGMENT")
    _library.define(schema)
    _library.impl(name, impl, "CPU")
    _defined.add(name)


@functools.cache
def _kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    long, ptr = ctypes.c_long, ctypes.c_void_p
    fn = c_function(
        "qllm_skinny_linear", [ptr, long, ptr, long, ptr, ptr, long, long, long, long, ctypes.c_int]
    )
    if fn is not None:
        define_op("skinny_linear(Tensor x, Tensor weight, Tensor? bias, str kernel) -> Tensor", _run)
    return fn


def available() -> bool:
    """Whether the kernel is built and loaded on this machine (compiled on the first call)."""
    return _kernel() is not None


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> torch.Tensor:
    fn = _kernel()
    if fn is None:
        raise RuntimeError("qllm's skinny GEMM is not available on this machine")
    _check("skinny_linear", x, weight, bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    rows, (cols, k) = x.shape[0], weight.shape
    y = torch.empty(rows, cols, dtype=torch.float32)
    if rows:
        fn(
            x.data_ptr(),
            x.stride(0),
            weight.data_ptr(),
            weight.stride(0),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            cols,
            rows,
            cols,
            k,
            torch.get_num_threads(),
        )
    return y


MAX_MANY = 16
"""The most weights :func:`linear_many` computes in one call."""


@functools.cache
def _many() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    long, ptr = ctypes.c_long, ctypes.c_void_p
    fn = c_function(
        "qllm_skinny_linear_many",
        [ptr, long, long, long, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int],
    )
    if fn is not None:
        define_op(
            "skinny_linear_many(Tensor x, Tensor[] weights, Tensor?[] biases, str kernel) -> Tensor[]",
            _run_many,
        )
    return fn


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """What the kernel computes: 2-D float32 rows and weight, each weight row contiguous, a bias
    of the weight's output size."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op} takes 2-D float32 rows and weights")
    if x.shape[1] != weight.shape[1] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"{op}: rows {tuple(x.shape)} do not fit weight {tuple(weight.shape)}")
    if weight.stride(1) != 1:
        raise ValueError(f"{op} needs each weight row contiguous")


def _run_many(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], kernel: str
) -> list[torch.Tensor]:
    fn = _many()
    if fn is None:
        raise RuntimeError("qllm's skinny GEMM is not available on this machine")
    if not 0 < len(weights) <= MAX_MANY or len(biases) != len(weights):
        raise ValueError(f"skinny_linear_many takes 1 to {MAX_MANY} weights, each with a bias or None")
    for w, b in zip(weights, biases):
        _check("skinny_linear_many", x, w, b)
    if x.stride(1) != 1:
        x = x.contiguous()
    biases = [None if b is None else b.to(torch.float32).contiguous() for b in biases]
    rows, n = x.shape[0], len(weights)
    ys = [torch.empty(rows, w.shape[0], dtype=torch.float32) for w in weights]
    if rows:
        pointers, longs = ctypes.c_void_p * n, ctypes.c_long * n
        fn(
            x.data_ptr(), x.stride(0), rows, x.shape[1], n,
            pointers(*(w.data_ptr() for w in weights)), longs(*(w.stride(0) for w in weights)),
            pointers(*(None if b is None else b.data_ptr() for b in biases)),
            pointers(*(y.data_ptr() for y in ys)), longs(*(y.stride(0) for y in ys)),
            longs(*(w.shape[0] for w in weights)), torch.get_num_threads(),
        )  # fmt: skip
    return ys


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by the skinny kernel; RuntimeError where it is not :func:`available`."""
    if _kernel() is None:
        raise RuntimeError("qllm's skinny GEMM is not available on this machine")
    return torch.ops.qllm.skinny_linear(x, weight, bias, KERNEL_ID)


def linear_many(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """:func:`linear` of ``x`` with each of ``weights`` (at most :data:`MAX_MANY`), in one call:
    one parallel region instead of one per weight, each output the same bits as :func:`linear`."""
    if _kernel() is None or _many() is None:
        raise RuntimeError("qllm's skinny GEMM is not available on this machine")
    return torch.ops.qllm.skinny_linear_many(x, list(weights), list(biases), KERNEL_ID)
