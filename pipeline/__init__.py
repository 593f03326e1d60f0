"""aerial-search: visual search over aerial imagery with CNN fingerprints, on Dask.

Python API (mirrors the CLI)::

    from pipeline import Config, ingest, open_store
    report = ingest(["imagery/"], "tiles.zarr", Config().override(**{"model.weights": "random"}))
    ds = open_store("tiles.zarr")          # lazy xarray.Dataset
"""

__version__ = "0.1.0"

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.ingest import IngestReport, ingest  # noqa: E402
from pipeline.store import open_store, summarize  # noqa: E402

__all__ = ["Config", "IngestReport", "__version__", "ingest", "load_config", "open_store", "summarize"]
