"""One OpenMP thread pool in the process while the engine computes.

torch's CPU kernels run their parallel regions on an OpenMP pool that belongs to the thread that
calls them: the event-loop thread gets one when it loads a model (or runs any parallel op), the
compute worker gets its own at its first op. GNU OpenMP (libgomp, the runtime torch's Linux
wheels ship) can let a pool's idle helpers spin between parallel regions, so that the next region
starts at once (its default, about 3 ms; ``OMP_WAIT_POLICY=PASSIVE``, which ``import qllm`` sets
by default, sleeps at once instead: docs/engine.md says when each pays). It spins only while the
helpers of all pools together do not outnumber the CPUs; with a second pool in the process they
spin about a hundred times, then sleep, and every parallel region of the worker waits for a
sleeping helper to wake. On the 2-core machine of docs/benchmarks.md (run Y), with spinning
allowed, one request decoded at 50 tok/s with two pools and at 55-67 tok/s with one.

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
import sys
from collections.abc import Callable

_OMP_PAUSE_SOFT = 1


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
