"""Where graphs run: the only module that creates a dask Client or cluster.

:func:`runtime` turns a :class:`~pipeline.config.ClusterConfig` into a :class:`Runtime`, a
context manager that owns the scheduler for the duration of a command and computes collections
on it with a progress display.

Threads: on the CPU, dask threads x torch threads must not exceed the cores, or the two thread
pools fight and throughput halves. The runtime therefore decides both numbers together: for the
local schedulers it passes the torch thread count to the model (``ModelSpec.torch_threads``);
on a distributed cluster a worker plugin (:class:`~pipeline.cluster.plugin.TorchThreads`) sizes
each worker process to its own cores divided by its dask threads when the worker starts.
distributed itself is imported only when a cluster or client is made (the plugin lives in
:mod:`pipeline.cluster.plugin`), so the threaded runtime of a quick command never loads it.

Memory: every process that runs tasks keeps its freed memory for reuse
(:func:`~pipeline.resources.keep_freed_memory`): this one when the threaded runtime starts,
workers this module spawns through their environment, and any worker through the plugin.

Errors (a cluster package missing, no GPU, an unreachable scheduler) are
:class:`~pipeline.errors.ClusterError`, which the CLI reports in one line.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ClusterConfig
from pipeline.errors import ClusterError
from pipeline.resources import (
    blas_threads,
    cpu_count,
    keep_freed_memory,
    malloc_env,
    threads_per_task,
    torch_threads_for,
)


@dataclass
class Event:
    """One step of :meth:`Runtime.stream`: a finished part of ``item`` (``part`` its index,
    ``result`` its value), or, with ``part`` None, the item itself finished (``result`` the list
    of part results) or failed (``error``)."""

    item: Any
    part: int | None
    result: Any = None
    error: BaseException | None = None


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

    def compute(self, *collections: Any, tasks: int | None = None) -> tuple[Any, ...]:
        """Compute dask collections on this runtime, showing progress when enabled. On the
        threaded scheduler NumPy's BLAS gets the cores shared by the tasks running at once
        (``tasks``: how many the graph can run in parallel, if fewer than the threads)."""
        import dask

        if self.client is None:
            with contextlib.ExitStack() as stack:
                stack.enter_context(blas_threads(threads_per_task(self.dask_threads, tasks)))
                if self.progress and sys.stderr.isatty():
                    from dask.diagnostics import ProgressBar

                    stack.enter_context(ProgressBar(out=sys.stderr))
                return dask.compute(*collections, scheduler=local_get(self.kind), num_workers=self.dask_threads)
        futures = self.client.compute(list(collections))
        if self.progress and sys.stderr.isatty():
            from distributed import progress

            progress(futures)
        return tuple(self.client.gather(futures))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, on the cluster's workers when there is one (each
        item a batch of work, e.g. a few hundred header reads), else in this process."""
        if self.client is None or len(items) <= 1:
            return [fn(item) for item in items]
        return self.client.gather(self.client.map(fn, list(items), pure=False))

    def stream(self, todo: deque, build: Callable[[Any], Sequence[Any]], in_flight: int = 2) -> Iterator[Event]:
        """Compute work items from ``todo`` with at most ``in_flight`` of them at once, yielding
        an :class:`Event` as each part of an item finishes and once per finished (or failed)
        item, in completion order. No barrier: the next item starts as soon as one ends.

        ``build(item)`` returns the item's parts, delayed objects computed together (shared
        tasks once); it is called only when the item is started, so at most ``in_flight``
        graphs exist at a time. The caller may append to ``todo`` while iterating (a retry) or
        clear it (stop: items in flight still finish and are yielded).
        """
        if self.client is None:
            yield from self._stream_local(todo, build, in_flight)
        else:
            yield from self._stream_distributed(todo, build, in_flight)

    def _stream_local(self, todo: deque, build: Callable, in_flight: int) -> Iterator[Event]:
        import dask

        events: queue.Queue[Event] = queue.Queue()
        # One task pool shared by every item in flight: the items interleave their tasks on the
        # same dask_threads threads instead of each bringing a pool of its own.
        tasks = ThreadPoolExecutor(self.dask_threads, thread_name_prefix="aerial-search-task")
        drivers = ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="aerial-search-item")
        scheduler = local_get(self.kind)

        def run(item: Any, parts: Sequence[Any]) -> None:
            index = {part.key: i for i, part in enumerate(parts)}

            def posttask(key, result, dsk, state, worker_id) -> None:
                if key in index:
                    events.put(Event(item, index[key], result))

            try:
                extra = {"pool": tasks} if self.kind != "sync" else {}
                results = dask.compute(*parts, scheduler=scheduler, callbacks=[(None, None, None, posttask, None)],
                                       **extra)  # fmt: skip
                events.put(Event(item, None, list(results)))
            except BaseException as e:  # reported to the consumer, who decides
                events.put(Event(item, None, error=e))

        running = 0
        try:
            while todo or running:
                while todo and running < in_flight:
                    item = todo.popleft()
                    drivers.submit(run, item, build(item))
                    running += 1
                event = events.get()
                if event.part is None:
                    running -= 1
                yield event
        finally:
            drivers.shutdown(wait=True)
            tasks.shutdown(wait=True)

    def _stream_distributed(self, todo: deque, build: Callable, in_flight: int) -> Iterator[Event]:
        from distributed import wait

        owner: dict[Any, tuple[int, int]] = {}  # future -> (item id, part index)
        items: dict[int, list] = {}  # item id -> [item, futures, results, parts still to come]
        try:
            while todo or items:
                while todo and len(items) < in_flight:
                    item = todo.popleft()
                    futures = self.client.compute(list(build(item)))
                    items[id(item)] = [item, futures, [None] * len(futures), len(futures)]
                    owner.update({f: (id(item), i) for i, f in enumerate(futures)})
                    if not futures:
                        del items[id(item)]
                        yield Event(item, None, [])
                if not owner:
                    break
                with self.client.as_current():  # wait() asks for the default client: this one, not another
                    done, _ = wait(list(owner), return_when="FIRST_COMPLETED")
                for f in done:
                    key, i = owner.pop(f)
                    entry = items.get(key)
                    if entry is None:
                        continue  # the item already failed
                    item, futures, results, _ = entry
                    if f.status == "error":
                        for other in futures:
                            owner.pop(other, None)
                            other.cancel()
                        del items[key]
                        yield Event(item, None, error=f.exception())
                        continue
                    results[i] = f.result()
                    entry[3] -= 1
                    yield Event(item, i, results[i])
                    # Counted, not asked of the futures: a part's result may be lost with a worker
                    # after it arrived (its write is done by then), and must not hold the item back.
                    if entry[3] == 0:
                        del items[key]
                        yield Event(item, None, results)
        finally:
            for f in owner:
                f.cancel()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def runtime(cfg: ClusterConfig, client: Any = None) -> Runtime:
    """Start (or attach to) the scheduler ``cfg`` names.

    - ``threads``: the local threaded scheduler (default). ``cfg.threads`` dask threads
      (0: as many as cores) and ``cores // threads`` torch threads each. While the runtime is
      open, dask computes that name no scheduler run on those threads (:func:`local_scheduler`,
      a process-wide dask setting, restored on close).
    - ``sync``: everything in the calling thread (debugging).
    - ``local``, ``local-cuda``, ``kubernetes``, ``slurm``, ``pbs``: a cluster from
      :func:`make_cluster` and a Client on it, both closed with the runtime.
    - ``tcp://host:port`` (any address with ``://``): connect to a running scheduler; workers
      size their torch threads to their own cores.

    ``client``: an existing ``distributed.Client`` to use instead (notebooks); not closed here.
    """
    cores = cpu_count()
    if client is not None:
        size_workers(client)
        return Runtime("client", client=client, torch_threads=0, progress=cfg.progress)
    if cfg.scheduler in ("threads", "sync"):
        keep_freed_memory()  # before the task threads exist: they then share the arena it tunes
        threads = 1 if cfg.scheduler == "sync" else (cfg.threads or cores)
        rt = Runtime(
            cfg.scheduler, dask_threads=threads, torch_threads=torch_threads_for(threads, cores), progress=cfg.progress
        )
        rt._stack.enter_context(local_scheduler(threads, cfg.scheduler))
        return rt
    from distributed import Client

    rt = Runtime(cfg.scheduler, progress=cfg.progress)
    try:
        if "://" in cfg.scheduler:
            try:
                rt.client = rt._stack.enter_context(Client(cfg.scheduler, timeout="30s"))
            except OSError as e:
                raise ClusterError(
                    f"cannot reach the dask scheduler at {cfg.scheduler} ({e}); start one with "
                    f"`dask scheduler` and workers with `dask worker {cfg.scheduler}`, or use --scheduler threads"
                ) from e
            rt.torch_threads = 0
        else:
            cluster, rt.dask_threads, rt.torch_threads = make_cluster(cfg)
            rt._stack.enter_context(cluster)
            rt.client = rt._stack.enter_context(Client(cluster))
        size_workers(rt.client)
    except BaseException:
        rt.close()
        raise
    if cfg.progress:
        print(f"dask dashboard: {rt.client.dashboard_link}", file=sys.stderr)
    return rt


def local_get(kind: str = "threads") -> Callable[..., Any]:
    """dask's local scheduler function for ``kind`` (``threads``, or ``sync``: the calling
    thread). Given to dask as a function, not a name: dask resolves a scheduler *name*, and a
    compute that names none, by importing distributed first to look for a client (0.1-0.5 s),
    which the quick commands (``info``, ``search --uid``) must not pay."""
    if kind == "sync":
        from dask.local import get_sync

        return get_sync
    from dask.threaded import get

    return get


@contextlib.contextmanager
def local_scheduler(threads: int = 0, kind: str = "threads") -> Iterator[None]:
    """dask computes that name no scheduler (``xarray``'s ``.values`` of a lazy store) run on
    :func:`local_get` while inside, with ``threads`` workers (0: dask's default); rechunking
    builds its plain task graph (what dask picks without a client, but only after importing
    distributed to ask)."""
    import dask

    settings: dict[str, Any] = {"scheduler": local_get(kind), "array.rechunk.method": "tasks"}
    if threads:
        settings["num_workers"] = threads
    with dask.config.set(settings):
        yield


@contextlib.contextmanager
def spawn_env() -> Iterator[None]:
    """Worker processes started inside get :func:`~pipeline.resources.malloc_env` in their
    environment from their first instruction (dask's ``distributed.nanny.pre-spawn-environ``,
    which a Nanny reads once, so it also holds for the workers it restarts).

    A Nanny lets this process's environment override that setting, and every Nanny writes its
    own into the environment (dask's ``MALLOC_TRIM_THRESHOLD_=65536`` after a cluster made
    elsewhere), so the environment holds these values too while the cluster starts."""
    import dask

    env, key = malloc_env(), "distributed.nanny.pre-spawn-environ"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with dask.config.set({key: {**dask.config.get(key, {}), **env}}):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_cluster(cfg: ClusterConfig) -> tuple[Any, int, int]:
    """Build the cluster ``cfg.scheduler`` names: ``(cluster, dask threads per worker, torch threads)``.

    Optional packages are imported only for the kind chosen, with an install hint when missing.
    Local worker processes start with :func:`spawn_env`.
    """
    with spawn_env():
        return _make_cluster(cfg)


def _make_cluster(cfg: ClusterConfig) -> tuple[Any, int, int]:
    cores = cpu_count()
    kind = cfg.scheduler
    if kind == "local":
        from distributed import LocalCluster

        n_workers = cfg.n_workers or max(1, min(2, cores))
        threads = cfg.threads or 1
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=threads, processes=True, dashboard_address=":0", silence_logs=40
        )
        return cluster, threads, max(1, cores // (n_workers * threads))
    if kind == "local-cuda":
        gpus = [g.strip() for g in cfg.gpus.split(",")] if cfg.gpus else visible_gpus()
        if not gpus:
            raise ClusterError(
                "--scheduler local-cuda found no GPU (nvidia-smi and CUDA_VISIBLE_DEVICES); use --scheduler local"
            )
        io = io_threads(cfg, len(gpus), cores)
        torch_threads = max(1, cores // len(gpus) // io)
        try:
            from dask_cuda import LocalCUDACluster

            return (
                LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(gpus), threads_per_worker=io, dashboard_address=":0"),
                io,
                torch_threads,
            )
        except Exception as e:  # not installed, or built against another dask: use the plain equivalent
            if not isinstance(e, ImportError):
                warnings.warn(f"dask_cuda.LocalCUDACluster failed ({e}); using one plain worker per GPU", stacklevel=2)
            return gpu_worker_cluster(gpus, io), io, torch_threads
    if kind == "kubernetes":
        KubeCluster = _optional("dask_kubernetes.operator", "KubeCluster", "dask-kubernetes")
        cluster = KubeCluster(custom_cluster_spec=kubernetes_spec(cfg))
        if cfg.n_workers:
            cluster.scale(cfg.n_workers)
        return cluster, 1, 0
    if kind in ("slurm", "pbs"):
        cluster = jobqueue_cluster(cfg)
        cluster.scale(jobs=cfg.n_workers or 1)
        return cluster, 1, 0
    raise ClusterError(f"unknown cluster kind {kind!r}")


def _optional(module: str, name: str, package: str) -> Any:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ClusterError(f"this cluster kind needs {package}: pip install {package} ({e})") from e


def visible_gpus() -> list[str]:
    """GPU ids this process may use, found without initializing CUDA (workers must do that).

    ``CUDA_VISIBLE_DEVICES`` when set, else one id per line of ``nvidia-smi -L``.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def io_threads(cfg: ClusterConfig, n_gpus: int, cores: int | None = None) -> int:
    """Threads per GPU worker (``cluster.io_threads``; 0: the cores per GPU, at least 2).

    They read, decode and filter chunks while the device, fed by its own thread
    (:func:`pipeline.embed.device_thread`), runs one batch at a time: with one thread, reading and
    inference take turns and a GPU waits for every chunk (``benchmarks/feed.py`` measures how
    many a format needs).
    """
    if cfg.io_threads:
        return cfg.io_threads
    return max(2, (cores or cpu_count()) // max(1, n_gpus))


def gpu_worker_cluster(gpus: list[str], threads: int = 2):
    """One worker process per GPU, each seeing only its GPU as ``cuda:0`` and running ``threads``
    threads (:func:`io_threads`).

    The plain-distributed equivalent of ``dask_cuda.LocalCUDACluster``: Nanny processes are
    spawned (not forked), so CUDA is first initialized inside each worker, on its own device.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"gpu-{g}": {
            "cls": Nanny,
            "options": {"nthreads": threads, "env": {"CUDA_VISIBLE_DEVICES": g}, "silence_logs": 40},
        }
        for g in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="aerial-search-gpus")


# Shipped in the package (deploy/kubernetes/ holds the same file for kubectl; a test keeps them equal)
DEFAULT_K8S_SPEC = Path(__file__).resolve().with_name("daskcluster.yaml")


def kubernetes_spec(cfg: ClusterConfig) -> dict[str, Any]:
    """The DaskCluster manifest (dict) that the operator's KubeCluster will create."""
    import yaml

    path = Path(cfg.kubernetes_spec or DEFAULT_K8S_SPEC)
    if not path.is_file():
        raise ClusterError(f"DaskCluster manifest {path} not found; set cluster.kubernetes_spec")
    spec = yaml.safe_load(path.read_text())
    if cfg.n_workers:
        spec["spec"]["worker"]["replicas"] = cfg.n_workers
    return spec


def jobqueue_cluster(cfg: ClusterConfig):
    """SLURMCluster / PBSCluster from ``cfg.jobqueue`` (or dask's jobqueue config); starts no job."""
    name = "SLURMCluster" if cfg.scheduler == "slurm" else "PBSCluster"
    cls = _optional("dask_jobqueue", name, "dask-jobqueue")
    return cls(**cfg.jobqueue)


def size_workers(client: Any) -> None:
    """Register :class:`~pipeline.cluster.plugin.TorchThreads` on ``client``'s cluster (present and
    future workers)."""
    from pipeline.cluster.plugin import TorchThreads

    client.register_plugin(TorchThreads(), name=TorchThreads.name)
