"""Machine resources: cores, torch threads, the cache folder. A leaf module: it imports nothing of
ours, so that the kernels, the model code and the cluster code can all ask it without cycles.

Threads: on the CPU, dask threads x torch threads must not exceed the cores, or the two thread
pools fight and throughput halves (measured in ``benchmarks/ingest.py``). :func:`torch_threads_for`
gives the torch share; :func:`set_torch_threads` applies it to this process.

Memory: :func:`keep_freed_memory` stops glibc's malloc from handing a CNN batch's activations back
to the kernel after every batch (see there).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from pathlib import Path

# glibc malloc, as :func:`keep_freed_memory` sets it: one arena (a thread's own arena cannot hold a
# buffer over 64 MB, so each such buffer was a fresh mmap), and freed memory up to 1 GiB kept for
# reuse instead of unmapped (buffers over 32 MB) or trimmed (dask's workers trim at 64 KB).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
_MALLOPT = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}  # M_* of malloc.h


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads_for(dask_threads: int, cores: int | None = None) -> int:
    """Torch intra-op threads for a process running ``dask_threads`` tasks at once."""
    return max(1, (cores or cpu_count()) // max(1, dask_threads))


def set_torch_threads(n: int) -> None:
    """Size torch's intra-op pool of this process to ``n`` threads (``n <= 0``: leave it).

    Before torch is imported the setting goes through ``OMP_NUM_THREADS``, so that a worker that
    never runs the model does not pay torch's import for it.
    """
    if n <= 0:
        return
    if "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(n)
        return
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@functools.cache
def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc (:data:`MALLOC_ENV`, through ``mallopt``) so that memory
    freed by one CNN batch serves the next; True when applied.

    With glibc's defaults every CPU batch's activations (hundreds of MB at batch 64) were mapped
    afresh and given back when freed, and the kernel zeroed each page again: 20-40 % of an
    ingest's CPU time on 2 cores; kept, ingest runs 1.24-1.59x faster for a peak RSS 0.5 GiB
    higher (``benchmarks/malloc.py``). Applied once per process, before its task threads first
    allocate (threads that already hold an arena of their own keep it): by the CLI, by the
    threaded runtime and by the worker plugin. Only on glibc; ``AERIAL_SEARCH_MALLOC=system``
    leaves malloc as it is.
    """
    if _system_malloc() or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = [mallopt(_MALLOPT[k], int(v)) == 1 for k, v in MALLOC_ENV.items()]  # each, whatever the others do
    return all(applied)


def malloc_env() -> dict[str, str]:
    """Environment for worker processes this package spawns: :data:`MALLOC_ENV` (glibc reads it at
    start, before any thread), unless ``AERIAL_SEARCH_MALLOC=system``."""
    return {} if _system_malloc() else dict(MALLOC_ENV)


def _system_malloc() -> bool:
    """The user opted out: ``AERIAL_SEARCH_MALLOC=system``."""
    return os.environ.get("AERIAL_SEARCH_MALLOC", "keep") == "system"


def cache_dir() -> Path:
    """Where downloaded sample imagery and built weights live (``$AERIAL_SEARCH_CACHE`` or
    ``~/.cache/aerial-search``)."""
    return Path(os.environ.get("AERIAL_SEARCH_CACHE", Path.home() / ".cache" / "aerial-search"))
