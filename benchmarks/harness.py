"""The one benchmark harness: timing with warm-ups and medians, commit trees to compare, fresh
child processes, and the JSON record every result file carries.

Every script in ``benchmarks/`` imports it (``python benchmarks/NAME.py`` puts this folder on
``sys.path``; the package comes from the installed ``pipeline``, or from an older commit's tree
through :func:`worktree` and :func:`child`).

The record (:func:`record`), under ``"record"`` in each JSON::

    {"commit": "f470bc8...", "dirty": false, "date": "2026-12-04T19:30:00+00:00",
     "machine": {"cores": 2, "memory_gib": 23.5, "cpu": "...", "system": "Linux-..."},
     "versions": {"python": "3.11.7", "numpy": "2.3.1", "torch": "2.14.1", ...}}

``dirty`` says whether the tree had uncommitted changes when the figures were measured: a
figure claimed by a commit should come from a clean tree at that commit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("numpy", "dask", "distributed", "zarr", "xarray", "rasterio", "torch", "torchvision", "scipy", "faiss-cpu")


# --------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed run (after the warm-ups) and the last run's return value."""

    runs: tuple[float, ...]
    value: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)


def timed(fn: Callable[[], Any], repeat: int = 3, warmup: int = 0) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed (``perf_counter``)."""
    for _ in range(warmup):
        fn()
    runs, value = [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        value = fn()
        runs.append(time.perf_counter() - t0)
    return Timing(tuple(runs), value)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def alternate(contenders: dict[str, Callable[[], Any]], rounds: int = 3) -> dict[str, Timing]:
    """Time each contender once per round, in turn, so that machine drift (these machines are
    noisy) hits all of them alike; one :class:`Timing` per contender."""
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    last: dict[str, Any] = {}
    for _ in range(max(1, rounds)):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            last[name] = fn()
            runs[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(r), last[name]) for name, r in runs.items()}


def timed_ingest(sources: Sequence[str], work: Path, name: str, cfg: Any, repeat: int = 3) -> Timing:
    """Whole ingests of ``sources`` (the API call: planning to the last commit, process start
    excluded), each into a fresh store ``work/NAME-K.zarr``, warnings silenced; the value is the
    last run's ``IngestReport``."""
    import itertools
    import warnings

    from pipeline import ingest

    k = itertools.count()

    def one() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ingest(list(sources), Path(work) / f"{name}-{next(k)}.zarr", cfg, overwrite=True)

    return timed(one, repeat)


# --------------------------------------------------------------------------------------------
# Trees and child processes


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def worktree(rev: str, work: Path) -> Path:
    """A checkout of commit ``rev`` under ``work`` (made once), to run an older commit's code
    beside this tree's in the same benchmark run."""
    sha = git("rev-parse", "--short=10", rev)
    tree = Path(work) / f"tree-{sha}"
    if not (tree / "pipeline").is_dir():
        Path(work).mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), sha], check=True,
                       capture_output=True)  # fmt: skip
    return tree


def tree_env(tree: Path | str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child that imports ``pipeline`` from ``tree`` (default: the installed
    package, this tree in a development install). The child must also run in ``tree``
    (:func:`child` and :func:`wall` do): ``python -c`` puts its working directory before
    ``PYTHONPATH``, so a child started in another checkout would import that one's package."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    return env


def child(
    code: str, tree: Path | str | None = None, args: Sequence[str] = (), timeout: float | None = None, **env: str
) -> Any:  # fmt: skip
    """Run ``code`` in a fresh Python process (importing ``pipeline`` from ``tree``; ``args`` as its
    ``sys.argv[1:]``) and return the JSON value its last stdout line prints."""
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         env=tree_env(tree, **env), timeout=timeout, cwd=tree)  # fmt: skip
    if res.returncode:
        raise RuntimeError(f"benchmark child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def wall(
    argv: Sequence[str], tree: Path | str | None = None, env: dict[str, str] | None = None, check: bool = False,
    cwd: Path | str | None = None,
) -> tuple[float, subprocess.CompletedProcess]:  # fmt: skip
    """Seconds a whole command takes, process start included, and its result (``check``: a
    failure raises with the command's stderr)."""
    t0 = time.perf_counter()
    res = subprocess.run(list(argv), capture_output=True, text=True, env=tree_env(tree, **(env or {})),
                         cwd=cwd if cwd is not None else tree)  # fmt: skip
    seconds = time.perf_counter() - t0
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return seconds, res


# --------------------------------------------------------------------------------------------
# The record


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "memory_gib": memory, "cpu": cpu, "system": platform.platform()}


def record(**extra: Any) -> dict[str, Any]:
    """Commit, dirty flag, date, machine and package versions of a benchmark run."""
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    versions = {"python": platform.python_version(), "aerial-search": _version("aerial-search")}
    versions |= {name: v for name in PACKAGES if (v := _version(name))}
    return {
        "commit": commit,
        "dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions,
        **extra,
    }


def write(path: Path | str, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Write ``results`` with a fresh :func:`record` (plus ``extra``) as JSON; returns the document."""
    doc = {"record": record(**extra), **results}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def update(path: Path | str, key: str, value: Any, **extra: Any) -> dict[str, Any]:
    """Replace one section of an existing result file (a partial re-run), giving the section its
    own record; the rest keeps the records it was measured with."""
    p = Path(path)
    doc = json.loads(p.read_text()) if p.is_file() else {}
    doc[key] = {"record": record(**extra), **value} if isinstance(value, dict) else value
    p.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def show(row: dict[str, Any]) -> None:
    """One progress line (JSON, floats rounded) on stdout, flushed."""
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
