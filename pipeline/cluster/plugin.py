"""The worker plugin, apart from :mod:`pipeline.cluster` so that importing the runtime does not
import distributed (a plugin must subclass its ``WorkerPlugin``): only a cluster loads it."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.resources import keep_freed_memory, set_torch_threads, torch_threads_for


class TorchThreads(WorkerPlugin):
    """Worker plugin: size torch's thread pool to the worker's cores / its dask threads, and keep
    freed memory for reuse (:func:`~pipeline.resources.keep_freed_memory`; for the task threads
    not started yet, on workers that were not spawned with it).

    Registered by :func:`pipeline.cluster.size_workers` on every cluster this package computes
    on, so that the model code never needs to know whether it runs in a distributed worker.
    """

    name = "aerial-search-torch-threads"

    def setup(self, worker: Any) -> None:
        keep_freed_memory()
        set_torch_threads(torch_threads_for(worker.state.nthreads))
