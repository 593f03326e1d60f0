"""Where graphs run: the only module that creates a dask Client or cluster.

:func:`runtime` turns a :class:`~pipeline.config.ClusterConfig` into a :class:`Runtime`, a
context manager that owns the scheduler for the duration of a command and computes collections
on it with a progress display.

Threads: on the CPU, dask threads x torch threads must not exceed the cores, or the two thread
pools fight and throughput halves. The runtime therefore decides both numbers together and
passes the torch thread count to the model (see ``ModelSpec.torch_threads``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ClusterConfig


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Runtime:
    """An active scheduler. ``client`` is None for the threaded and synchronous schedulers."""

    kind: str
    client: Any = None
    dask_threads: int = 1  # threads per process that run tasks
    torch_threads: int = 0  # 0: the worker decides (remote clusters)
    progress: bool = True
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def describe(self) -> str:
        if self.client is None:
            return f"{self.kind} scheduler: {self.dask_threads} dask thread(s) x {self.torch_threads} torch thread(s)"
        link = getattr(self.client, "dashboard_link", "")
        return f"dask cluster {self.client.scheduler.address} ({self.kind}); dashboard: {link}"

    def compute(self, *collections: Any) -> tuple[Any, ...]:
        """Compute dask collections on this runtime, showing progress when enabled."""
        import dask

        if self.client is None:
            with contextlib.ExitStack() as stack:
                if self.progress and sys.stderr.isatty():
                    from dask.diagnostics import ProgressBar

                    stack.enter_context(ProgressBar(out=sys.stderr))
                scheduler = "sync" if self.kind == "sync" else "threads"
                return dask.compute(*collections, scheduler=scheduler, num_workers=self.dask_threads)
        futures = self.client.compute(list(collections))
        if self.progress and sys.stderr.isatty():
            from distributed import progress

            progress(futures)
        return tuple(self.client.gather(futures))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def runtime(cfg: ClusterConfig, client: Any = None) -> Runtime:
    """Start (or attach to) the scheduler ``cfg`` names.

    - ``threads``: the local threaded scheduler (default). ``cfg.threads`` dask threads
      (0: as many as cores) and ``cores // threads`` torch threads each.
    - ``sync``: everything in the calling thread (debugging).
    - ``local``: a ``distributed.LocalCluster`` of ``cfg.n_workers`` processes with
      ``cfg.threads`` threads each (0: 1), torch threads sharing the remaining cores.
    - ``tcp://host:port`` (any address with ``://``): connect to a running scheduler; workers
      size their torch threads to their own cores.

    ``client``: an existing ``distributed.Client`` to use instead (notebooks); not closed here.
    """
    cores = cpu_count()
    if client is not None:
        return Runtime("client", client=client, torch_threads=0, progress=cfg.progress)
    if cfg.scheduler in ("threads", "sync"):
        threads = 1 if cfg.scheduler == "sync" else (cfg.threads or cores)
        return Runtime(
            cfg.scheduler, dask_threads=threads, torch_threads=max(1, cores // threads), progress=cfg.progress
        )
    from distributed import Client, LocalCluster

    rt = Runtime(cfg.scheduler, progress=cfg.progress)
    if cfg.scheduler == "local":
        n_workers = cfg.n_workers or max(1, min(2, cores))
        threads = cfg.threads or 1
        cluster = rt._stack.enter_context(
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads,
                processes=True,
                dashboard_address=":0",
                silence_logs=40,
            )
        )
        rt.client = rt._stack.enter_context(Client(cluster))
        rt.dask_threads = threads
        rt.torch_threads = max(1, cores // (n_workers * threads))
    else:
        try:
            rt.client = rt._stack.enter_context(Client(cfg.scheduler, timeout="30s"))
        except OSError as e:
            raise RuntimeError(
                f"cannot reach the dask scheduler at {cfg.scheduler} ({e}); start one with "
                f"`dask scheduler` and workers with `dask worker {cfg.scheduler}`, or use --scheduler threads"
            ) from e
        rt.torch_threads = 0
    if cfg.progress:
        print(f"dask dashboard: {rt.client.dashboard_link}", file=sys.stderr)
    return rt


def worker_torch_threads() -> int:
    """Torch threads for a task running in a distributed worker: its cores / its dask threads."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return 0
    return max(1, cpu_count() // max(1, worker.state.nthreads))
