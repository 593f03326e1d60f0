"""Process resources: glibc malloc keeps freed memory for reuse (the kernel's page-fault counter
is the oracle), in this process and in the workers the cluster code spawns."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from pipeline.resources import MALLOC_ENV

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A 200 MB buffer allocated, written and freed 4 times by a thread (as a CNN batch's activations
# are by a task thread); the minor page faults of each round.
# The CLI sets malloc first thing, whatever the command (here one that fails at once).
CHILD = r"""
import ctypes, json, resource, threading
from pipeline.cli import main
from pipeline.resources import keep_freed_memory
assert main(["info", "--store", "/nonexistent/s.zarr"]) == 2
assert keep_freed_memory.cache_info().currsize == 1  # called by main
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def rounds():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(200 << 20)
        ctypes.memset(p, 1, 200 << 20)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=rounds)
t.start()
t.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _rounds(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["AERIAL_SEARCH_MALLOC"] = setting
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_freed_memory_is_reused_by_a_thread_instead_of_faulted_in_again():
    system, keep = _rounds("system"), _rounds("keep")
    pages = (200 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert not system["applied"] and keep["applied"]
    # glibc's defaults map a buffer this size afresh every round: every page faults again
    assert all(f >= 0.9 * pages for f in system["faults"]), system
    # kept: the first round faults the pages in, the next three reuse them
    assert keep["faults"][0] >= 0.9 * pages and sum(keep["faults"][1:]) < 0.01 * pages, keep


def test_local_workers_start_with_the_malloc_settings_and_the_plugin_applies_them(monkeypatch):
    from pipeline import resources
    from pipeline.cluster import runtime
    from pipeline.config import ClusterConfig

    # as a cluster made earlier in this process leaves it (each Nanny writes dask's settings here)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("AERIAL_SEARCH_MALLOC", raising=False)  # the default
    with runtime(ClusterConfig(scheduler="local", n_workers=1, progress=False)) as rt:
        env = rt.client.run(lambda: {k: os.environ.get(k) for k in MALLOC_ENV})
        applied = rt.client.run(lambda: resources.keep_freed_memory.cache_info().currsize)
    # dask's own default for workers (MALLOC_TRIM_THRESHOLD_=65536) is overridden
    assert list(env.values()) == [MALLOC_ENV], env
    assert list(applied.values()) == [1]  # called by the worker plugin before any task
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536" and "MALLOC_ARENA_MAX" not in os.environ  # restored
