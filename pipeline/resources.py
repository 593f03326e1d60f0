"""Machine resources: cores, torch threads, the cache folder. A leaf module: it imports nothing of
ours, so that the kernels, the model code and the cluster code can all ask it without cycles.

Threads: on the CPU, dask threads x torch threads must not exceed the cores, or the two thread
pools fight and throughput halves (measured in ``benchmarks/ingest.py``). :func:`torch_threads_for`
gives the torch share; :func:`set_torch_threads` applies it to this process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


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


def cache_dir() -> Path:
    """Where downloaded sample imagery and built weights live (``$AERIAL_SEARCH_CACHE`` or
    ``~/.cache/aerial-search``)."""
    return Path(os.environ.get("AERIAL_SEARCH_CACHE", Path.home() / ".cache" / "aerial-search"))
