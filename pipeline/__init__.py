"""aerial-search: visual search over aerial imagery with CNN fingerprints, on Dask.

Python API (mirrors the CLI)::

    from pipeline import Config, ingest, open_store
    from pipeline.search import SearchIndex
    report = ingest(["imagery/"], "tiles.zarr", Config().override(**{"model.weights": "random"}))
    ds = open_store("tiles.zarr")          # lazy xarray.Dataset
    index = SearchIndex.open("tiles.zarr").persist()

Layout: kernels (NumPy / torch on one chunk: ``grid``, ``geo``, ``tiles``, ``embed``, ``post``,
``search.kernels``) under graph builders (dask graphs, never computed there: ``ingest.graph``,
``search.graph``) under drivers (``ingest.driver``, ``search.index``, ``derived``, ``evaluate``,
``demo``) under the CLI (``cli`` + one module per command in ``commands``). ``store`` owns the
Zarr schema, ``cluster`` creates every client, ``resources`` and ``errors`` are leaves. The
contracts are checked by import-linter (``pyproject.toml``) in the test suite.
"""

from pipeline.config import Config, load_config
from pipeline.errors import AerialSearchError
from pipeline.ingest import IngestReport, ingest
from pipeline.store import open_store, summarize
from pipeline.version import __version__

__all__ = [
    "AerialSearchError", "Config", "IngestReport", "__version__", "ingest", "load_config", "open_store", "summarize",
]  # fmt: skip
