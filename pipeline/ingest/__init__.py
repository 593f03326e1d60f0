"""Ingest: GeoTIFF archive -> tile fingerprints in a Zarr store, in three layers:

- :mod:`pipeline.ingest.plan`: headers against the store's image table; ids, slots, batches.
- :mod:`pipeline.ingest.graph`: the dask graph of one run of images (reads, fingerprints,
  writes). Nothing there computes.
- :mod:`pipeline.ingest.driver`: :func:`ingest`, which computes the batches on a runtime and
  commits them.
"""

from pipeline.ingest.driver import IngestReport, ingest

__all__ = ["IngestReport", "ingest"]
