"""Ingest: GeoTIFF archive -> tile fingerprints in a Zarr store, in three layers:

- :mod:`pipeline.ingest.plan`: headers against the store's image table; ids, slots, batches.
- :mod:`pipeline.ingest.graph`: the dask graph of one run of images (reads, fingerprints,
  writes). Nothing there computes.
- :mod:`pipeline.ingest.driver`: :func:`ingest`, which computes the batches on a runtime and
  commits them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.ingest.driver import IngestReport, ingest

__all__ = ["IngestReport", "ingest"]


def __getattr__(name: str) -> Any:
    """``IngestReport`` and ``ingest`` load the driver (dask, the model code) on first use."""
    if name not in __all__:
        raise AttributeError(f"module 'pipeline.ingest' has no attribute {name!r}")
    from pipeline.ingest import driver

    return getattr(driver, name)
