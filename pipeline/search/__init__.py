"""Exact k-nearest-neighbour search over a fingerprint store, in three layers:

- :mod:`pipeline.search.kernels`: NumPy on one block of tiles. Scorers (``(n, m)`` scores,
  lower is better; :class:`~pipeline.search.kernels.L2Scorer` first), filters and overlap
  exclusion, and the scorer-agnostic unsorted top-k select / merge / finalize.
- :mod:`pipeline.search.graph`: dask graphs only: store blocks, the per-chunk map and the tree
  reduction. Nothing there computes.
- :mod:`pipeline.search.index`: :class:`SearchIndex`, the driver that opens, persists and
  computes, and turns uids and places into queries.

:mod:`pipeline.search.results` holds the results and their table / JSON formats.
"""

from pipeline.errors import SearchError
from pipeline.search.index import SearchIndex
from pipeline.search.kernels import Exclusions, Filters, L2Scorer, Queries, Scorer
from pipeline.search.results import Result

__all__ = ["Exclusions", "Filters", "L2Scorer", "Queries", "Result", "Scorer", "SearchError", "SearchIndex"]
