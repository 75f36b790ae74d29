"""OpenMP in the process: how idle helper threads wait, and one thread pool while the engine
computes.

**Waiting.** Between parallel regions an OpenMP pool's idle helpers either spin (the next region
starts at once, but a spinning helper holds a core) or sleep (each region wakes them). GNU OpenMP
(libgomp, the runtime torch's Linux wheels ship) reads ``OMP_WAIT_POLICY`` once, when torch loads
it, and by default spins for about 3 ms. :func:`configure_openmp` makes helpers sleep at once
(``OMP_WAIT_POLICY=PASSIVE``) unless the environment already chooses: on a machine that other
processes share, a spinning helper holds a core that the thread it waits for, or another process,
needs. Spinning pays on cores the server has to itself; ``OMP_WAIT_POLICY=ACTIVE
GOMP_SPINCOUNT=300000`` in the environment chooses it there. The ``qllm`` command calls
:func:`configure_openmp` before anything imports torch; ``import qllm`` changes nothing, so a
program that embeds :class:`qllm.Engine` calls it first or sets the variable itself
(docs/engine.md, "OpenMP threads").

**One pool.** torch's CPU kernels run their parallel regions on an OpenMP pool that belongs to the
thread that calls them: the event-loop thread gets one when it loads a model (or runs any parallel
op), the compute worker gets its own at its first op. libgomp lets idle helpers spin only while
the helpers of all pools together do not outnumber the CPUs; with a second pool in the process
they spin about a hundred times, then sleep, and every parallel region of the worker waits for a
sleeping helper to wake. On the 2-core machine of docs/benchmarks.md, with spinning allowed, one
request decoded at 50 tok/s with two pools and at 55-67 tok/s with one.

So the kernel keeps one pool alive: before it hands an op to the worker, the handing thread drops
its own pool, if it has one (``omp_pause_resource_all``, which in libgomp frees only the calling
thread's helpers; they are made again if that thread later runs a parallel op), and when the engine
goes idle the worker drops its pool too, so that an idle engine leaves other torch work in the
process (on any thread) the whole machine. Pools never change results: a parallel region splits
its work by the thread count, not by which threads run it.

Other OpenMP runtimes (LLVM's libomp on macOS, Intel's libiomp) manage idle threads their own way,
and their pause is not documented to free only the calling thread's pool, so :func:`drop_pool`
does nothing there.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

_OMP_PAUSE_SOFT = 1

WAIT_POLICY_DEFAULT = "PASSIVE"
"""What :func:`configure_openmp` sets ``OMP_WAIT_POLICY`` to when the environment leaves it unset."""


def configure_openmp() -> bool:
    """Make idle OpenMP helpers sleep between parallel regions (``OMP_WAIT_POLICY=PASSIVE``) unless
    the environment already sets ``OMP_WAIT_POLICY``. The setting is read when torch loads its
    OpenMP runtime, so this must run before the process imports torch; child processes inherit it.
    Returns whether it can still take effect here (False once torch is imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY_DEFAULT)
    return "torch" not in sys.modules


def _libgomp_pause_functions() -> list[Callable[[int], int]]:
    """``omp_pause_resource_all`` of every libgomp mapped into this process (torch's own copy,
    and the system's where another library loaded it)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        return []
    functions = []
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all  # already loaded: only a handle
        except (OSError, AttributeError):  # gone, or a libgomp older than OpenMP 5.0
            continue
        pause.argtypes = [ctypes.c_int]
        pause.restype = ctypes.c_int
        functions.append(pause)
    return functions


_pauses: list[Callable[[int], int]] | None = None


def drop_pool() -> bool:
    """Free the calling thread's OpenMP helpers (libgomp only); True if a runtime took the call.
    Cheap when the thread has none. Never call it from inside a parallel region."""
    global _pauses
    if _pauses is None:
        import torch  # noqa: F401  (torch loads libgomp; look for it only once torch is in)

        _pauses = _libgomp_pause_functions()
    done = False
    for pause in _pauses:
        done |= pause(_OMP_PAUSE_SOFT) == 0
    return done
