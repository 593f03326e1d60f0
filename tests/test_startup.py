"""The start-up budget: the quick commands import neither torch nor distributed, checked in fresh
processes (what a module imports at start-up cannot be seen from inside this test process,
which has imported everything already); the Python API's names still load on first use."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline import open_store

BANNED = {"torch", "torchvision", "distributed"}
PROBE = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: print('MODULES ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})), "
    "file=sys.stderr))\n"
    "from pipeline.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_cli(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    res = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    line = next(x for x in res.stderr.splitlines() if x.startswith("MODULES "))
    return res, set(json.loads(line[len("MODULES ") :]))


@pytest.fixture(scope="module", params=["float32", "float16"])
def quick_store(request, flights, ingest_store):
    path = ingest_store(flights, model="probe", dtype=request.param)
    ds = open_store(path)
    return path, int(ds["uid"].values[np.flatnonzero(ds["valid"].values)[3]])


def test_help_imports_no_heavy_package():
    res, modules = run_cli("--help")
    assert res.returncode == 0 and "ingest" in res.stdout
    assert not modules & (BANNED | {"dask", "zarr", "xarray"}), modules & (BANNED | {"dask", "zarr", "xarray"})


def test_info_and_uid_search_import_neither_torch_nor_distributed(quick_store):
    path, uid = quick_store
    res, modules = run_cli("info", "--store", str(path))
    assert res.returncode == 0, res.stderr
    assert "tiles" in res.stdout
    assert not modules & BANNED, modules & BANNED
    res, modules = run_cli("search", "--store", str(path), "--uid", str(uid), "-k", "3")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") >= 5  # the table: query, header, 3 results
    assert "zarr" in modules  # it did read the store
    assert not modules & BANNED, modules & BANNED


def test_python_api_names_load_lazily_and_ingest_stays_the_function():
    code = (
        "import sys, json\n"
        "import pipeline\n"
        "before = sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'zarr', 'xarray', 'torch'})\n"
        "import pipeline.ingest.plan\n"
        "from pipeline import Config, ingest, open_store, summarize, IngestReport\n"
        "print(json.dumps([before, callable(ingest), ingest.__module__, Config.__name__, open_store.__module__,\n"
        "                  summarize.__module__, IngestReport.__name__, 'ingest' in dir(pipeline)]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    before, is_callable, module, config, store_mod, summary_mod, report, listed = json.loads(res.stdout)
    assert before == []
    assert is_callable and module == "pipeline.ingest.driver"
    assert (config, store_mod, summary_mod, report, listed) == (
        "Config", "pipeline.store", "pipeline.summary", "IngestReport", True)  # fmt: skip
