"""Machine resources: cores, torch threads, the cache folder. A leaf module: it imports nothing of
ours, so that the kernels, the model code and the cluster code can all ask it without cycles.

Threads: on the CPU, dask threads x torch threads must not exceed the cores, or the two thread
pools fight and throughput halves (measured in ``benchmarks/ingest.py``). :func:`torch_threads_for`
gives the torch share; :func:`set_torch_threads` applies it to this process.

Memory: :func:`keep_freed_memory` stops glibc's malloc from handing a CNN batch's activations back
to the kernel after every batch (see there).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def threads_per_task(dask_threads: int, tasks: int | None = None, cores: int | None = None) -> int:
    """Library threads (BLAS, torch) for each of the tasks a threaded compute runs at once: the
    cores shared by ``min(dask_threads, tasks)`` of them (``tasks`` None: as many as threads)."""
    running = min(max(1, dask_threads), max(1, tasks)) if tasks else max(1, dask_threads)
    return max(1, (cores or cpu_count()) // running)


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's handle on NumPy's BLAS (a wheel's bundled copy, found by its path; else
    every BLAS loaded now), or None without threadpoolctl. SciPy's own copy, which the search
    kernels do not call, keeps its setting."""
    try:
        import numpy  # noqa: F401  (its BLAS must be loaded to be seen)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    ctl = ThreadpoolController().select(user_api="blas")
    mine = [c for c in ctl.lib_controllers if "numpy" in Path(c.filepath).parent.name]
    if mine:
        ctl = ctl.select(filepath=[c.filepath for c in mine])
    return ctl if ctl.lib_controllers else None


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with NumPy's BLAS limited to ``n`` threads (``n <= 0``: as it is).

    Tasks of the threaded scheduler that each call a multi-threaded BLAS oversubscribe the
    cores: a search's matrix products over 1M x 512 in two blocks on 2 cores took 107 ms with
    OpenBLAS's 2 threads per block and 68 ms with one, NumPy's single product 73 ms
    (``benchmarks/search.py``). Worker processes of a cluster already start with one BLAS
    thread (dask's ``distributed.nanny.pre-spawn-environ``). The limit is process-wide while
    the block runs (threadpoolctl; without it, nothing changes)."""
    ctl = _blas_controller() if n > 0 else None
    if ctl is None:
        yield
        return
    global _blas_users
    with _blas_lock:  # overlapping blocks in several threads: the last one out restores the setting
        if _blas_users == 0:
            _blas_saved[:] = [c.get_num_threads() for c in ctl.lib_controllers]
        _blas_users += 1
        _set_blas_threads(ctl, [n] * len(ctl.lib_controllers))
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _set_blas_threads(ctl, _blas_saved)


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: list[int] = []


def _set_blas_threads(ctl: Any, counts: list[int]) -> None:
    """Set each library's thread count from whichever thread asks. threadpoolctl (3.6+) lets only
    the one Python thread that first limited OpenBLAS change it until that thread's own ``with``
    block ends, and ignores the others: a server's searches run on whatever thread the request
    got, so that rule would leave some searches unlimited, or a limit in place for good. The
    reference count above serializes the changes instead."""
    for c, k in zip(ctl.lib_controllers, counts):
        getattr(c, "_real_set_num_threads", c.set_num_threads)(k)


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
