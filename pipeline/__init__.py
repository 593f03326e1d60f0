"""aerial-search: visual search over aerial imagery with CNN fingerprints, on Dask.

Python API (mirrors the CLI)::

    from pipeline import Config, ingest, open_store
    from pipeline.search import SearchIndex
    report = ingest(["imagery/"], "tiles.zarr", Config().override(**{"model.weights": "random"}))
    ds = open_store("tiles.zarr")          # lazy xarray.Dataset
    index = SearchIndex.open("tiles.zarr").persist()

The names above are loaded on first use (module ``__getattr__``), so ``import pipeline`` and the
CLI's quick commands pay only for what they touch (the start-up budget: ``--help``, ``info``
and ``search --uid`` import neither torch nor distributed).

Layout: kernels (NumPy / torch on one chunk: ``grid``, ``geo``, ``tiles``, ``embed``, ``post``,
``search.kernels``) under graph builders (dask graphs, never computed there: ``ingest.graph``,
``search.graph``) under drivers (``ingest.driver``, ``search.index``, ``derived``, ``evaluate``,
``demo``) under the CLI (``cli`` + one module per command in ``commands``). ``schema`` is the
store's one table of variables, ``store`` the only code that reads and writes Zarr, ``cluster``
creates every client, ``backbones``, ``resources`` and ``errors`` are leaves. The contracts are
checked by import-linter (``pyproject.toml``) in the test suite.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.version import __version__

# ``pipeline.ingest`` is a subpackage and, in the Python API, the ingest function. Importing the
# subpackage (cheap: its names load lazily) binds the module here, so it is imported now and the
# binding dropped: ``from pipeline import ingest`` then reaches __getattr__ and the function, as
# it always did, whichever of the package's modules were imported first.
importlib.import_module("pipeline.ingest")
del globals()["ingest"]

if TYPE_CHECKING:
    from pipeline.config import Config, load_config
    from pipeline.errors import AerialSearchError
    from pipeline.ingest import IngestReport, ingest
    from pipeline.store import open_store
    from pipeline.summary import summarize

_LAZY = {
    "AerialSearchError": "pipeline.errors",
    "Config": "pipeline.config",
    "IngestReport": "pipeline.ingest",
    "ingest": "pipeline.ingest",
    "load_config": "pipeline.config",
    "open_store": "pipeline.store",
    "summarize": "pipeline.summary",
}

__all__ = ["AerialSearchError", "Config", "IngestReport", "__version__", "ingest", "load_config", "open_store",
           "summarize"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
