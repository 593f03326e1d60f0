"""Exact k-nearest-neighbour search over a fingerprint store, in three layers:

- kernels, NumPy on one block of tiles: :mod:`pipeline.search.scorers` (``(n, m)`` scores,
  lower is better; :class:`~pipeline.search.scorers.L2Scorer` first), :mod:`pipeline.search.kernels`
  (queries, filters and overlap exclusion, the per-chunk map) and :mod:`pipeline.search.topk`
  (the scorer-agnostic unsorted top-k select / merge / finalize).
- :mod:`pipeline.search.graph`: dask graphs only: store blocks, the per-chunk map and the tree
  reduction. Nothing there computes.
- :mod:`pipeline.search.index`: :class:`SearchIndex`, the driver that opens, persists and
  computes, and turns uids and places into queries.

:mod:`pipeline.search.results` holds the results and their table / JSON formats;
:mod:`pipeline.search.memory` makes in-memory fingerprints searchable without a store.
"""

from pipeline.errors import SearchError
from pipeline.search.index import SearchIndex
from pipeline.search.kernels import Exclusions, Filters, Queries
from pipeline.search.results import Result
from pipeline.search.scorers import L2Scorer, Scorer

__all__ = ["Exclusions", "Filters", "L2Scorer", "Queries", "Result", "Scorer", "SearchError", "SearchIndex"]
