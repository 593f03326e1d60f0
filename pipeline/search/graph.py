"""Search graphs: dask graphs of the per-chunk map and the tree reduction. Nothing here computes.

- :func:`store_blocks`: one delayed block (:func:`pipeline.search.kernels.make_block`) per chunk
  of a store opened as an ``xarray.Dataset``, with deterministic names (two opens of an
  unchanged store give the same keys).
- :func:`topk_graph`: one :func:`~pipeline.search.kernels.chunk_topk` task per block, combined
  ``split_every`` at a time by :func:`~pipeline.search.topk.merge_topk` until one remains,
  then :func:`~pipeline.search.topk.finalize`.
- :func:`nearest_centre_graph`: the valid tile whose centre is nearest a lon/lat point.

With ``on_device`` the map runs :mod:`pipeline.search.device`'s kernels over the device blocks of
a persisted index (:meth:`pipeline.search.index.SearchIndex.persist` with ``device``) instead of
the NumPy ones; the reductions are the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from pipeline.errors import SearchError
from pipeline.geo import local_metres
from pipeline.search import device, kernels, topk
from pipeline.search.kernels import BLOCK_VARS, CODE_BLOCK_VARS, Exclusions, Filters
from pipeline.search.scorers import Scorer


def store_blocks(
    ds: Any,
    with_norms: bool = False,
    rows: int | None = None,
    postprocess: Any = None,
    use_dba: bool = False,
    codes: str = "",
    code_kind: str = "binary",
) -> list[Delayed]:
    """One delayed block dict per ``rows`` tiles (default: per Zarr chunk), lazy.

    ``postprocess`` post-processes the raw fingerprints in each block; with ``use_dba`` the blocks
    hold the store's ``fingerprint_dba`` instead, which is already post-processed. ``codes``:
    ``"only"``: the blocks hold the store's ``codes`` instead of fingerprints (a codes scan reads
    nothing else); ``"also"``: both (a persisted index that scans codes and re-ranks from memory).
    ``code_kind``: the store's codes kind (the layout a persisted block keeps them in).
    """
    names = CODE_BLOCK_VARS if codes == "only" else (*BLOCK_VARS, "codes") if codes == "also" else BLOCK_VARS
    arrays = [ds[name].data for name in names]
    if use_dba and codes != "only":
        arrays[0] = ds["fingerprint_dba"].data
        postprocess = None
    if codes == "only":
        postprocess = None
    arrays[0] = arrays[0].rechunk({1: -1})
    if codes == "also":
        arrays[-1] = arrays[-1].rechunk({1: -1})
    # Small per-tile arrays are stored in larger chunks (store.META_CHUNK_FACTOR): slice them
    # to the fingerprint chunks so that each is read once and shared by the tasks that need it.
    rows = rows or arrays[0].chunks[0]
    arrays = [a.rechunk({0: rows}) for a in arrays]
    per_var = [a.to_delayed().ravel() for a in arrays]
    name = "store-block-" + tokenize([a.name for a in arrays], with_norms, postprocess, names, code_kind)
    make = dask.delayed(kernels.make_block, pure=True)
    return [
        make(
            *parts,
            with_norms=with_norms,
            postprocess=postprocess,
            names=names,
            code_kind=code_kind,
            dask_key_name=(name, i),
        )  # fmt: skip
        for i, parts in enumerate(zip(*per_var))
    ]


def topk_graph(
    blocks: Sequence[Delayed],
    scorer: Scorer,
    k: int,
    filters: Filters,
    exclude: Exclusions,
    half_m: np.ndarray,
    split_every: int = 8,
    usable: np.ndarray | None = None,
    on_device: bool = False,
) -> Delayed:
    """The per-chunk map and the tree reduction to the global top-k, as one ``Delayed``
    yielding ``len(scorer)`` sorted RESULT_DTYPE arrays.

    The layer is written as a plain task dict: building it costs microseconds per chunk, not a
    tokenization of every argument, which matters when a persisted index answers queries at
    memory speed. Its name is random: each search is a new computation.
    """
    if split_every < 2:
        raise SearchError(f"split_every must be >= 2 (the fan-in of the top-k tree), got {split_every}")
    name = f"topk-{uuid.uuid4().hex}"
    leaves = {i: (_map(on_device).chunk_topk, b.key, scorer, k, filters, exclude, half_m, usable) for i, b in enumerate(blocks)}
    return _topk_tree(name, leaves, k, len(scorer), split_every, list(blocks))


def _map(on_device: bool) -> Any:
    """The module of the per-block map: the device kernels or the NumPy ones (same signatures)."""
    return device if on_device else kernels


def _topk_tree(name: str, leaves: dict[int, tuple], k: int, m: int, split_every: int, deps: list) -> Delayed:
    """``leaves`` (one partial top-k task each) merged ``split_every`` at a time by
    :func:`~pipeline.search.topk.merge_topk` until one remains, then finalized."""
    merge = (topk.merge_topk, k)
    return _tree(name, leaves, merge, topk.finalize, (topk.empty_results, m), split_every, deps)


def _tree(
    name: str, leaves: dict[int, tuple], merge: tuple, finalize: Any, empty: tuple, split_every: int, deps: list
) -> Delayed:
    """The reduction tree: ``leaves`` (task tuples), combined ``split_every`` at a time by
    ``merge[0](parts, *merge[1:])`` until one remains, then ``finalize(it)`` (``empty`` as the
    task when there is no leaf)."""
    dsk: dict[Any, Any] = {}
    level = []
    for i, task in sorted(leaves.items()):
        dsk[(name, 0, i)] = task
        level.append((name, 0, i))
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for s in range(0, len(level), split_every):
            dsk[(name, depth, s)] = (merge[0], list(level[s : s + split_every]), *merge[1:])
            nxt.append((name, depth, s))
        level = nxt
    final = (name, "final")
    dsk[final] = (finalize, level[0]) if level else empty
    return Delayed(final, HighLevelGraph.from_collections(name, dsk, dependencies=deps), layer=name)


def rerank_graph(
    blocks: Sequence[Delayed],
    candidates: dict[int, tuple[np.ndarray, np.ndarray]],
    scorer: Scorer,
    k: int,
    split_every: int = 8,
    on_device: bool = False,
) -> Delayed:
    """The exact second pass of a codes search: one :func:`~pipeline.search.kernels.rerank_block`
    task per block that holds candidates (``candidates[i] = (rows, member)``), reduced like
    :func:`topk_graph`. Blocks without candidates are not in the graph, so they are not read."""
    name = f"rerank-{uuid.uuid4().hex}"
    leaves = {
        i: (_map(on_device).rerank_block, blocks[i].key, rows, member, scorer, k) for i, (rows, member) in candidates.items()
    }
    return _topk_tree(name, leaves, k, len(scorer), split_every, [blocks[i] for i in sorted(candidates)])


def threshold_graph(
    blocks: Sequence[Delayed],
    scorer: Scorer,
    max_score: float,
    limit: int,
    filters: Filters,
    exclude: Exclusions,
    half_m: np.ndarray,
    split_every: int = 8,
    usable: np.ndarray | None = None,
    on_device: bool = False,
) -> Delayed:
    """Every tile scoring at most ``max_score``, per column: a ``Delayed`` of (the best ``limit``,
    sorted; how many passed in all). The same map and tree as :func:`topk_graph`, with the
    threshold filter in the map and a concatenating, counting reduction."""
    if split_every < 2:
        raise SearchError(f"split_every must be >= 2 (the fan-in of the reduction tree), got {split_every}")
    name = f"threshold-{uuid.uuid4().hex}"
    leaves = {i: (_map(on_device).chunk_threshold, b.key, scorer, max_score, limit, filters, exclude, half_m, usable)
              for i, b in enumerate(blocks)}  # fmt: skip
    return _tree(name, leaves, (topk.merge_threshold, limit), topk.finalize_threshold,
                 (topk.empty_threshold, len(scorer)), split_every, list(blocks))  # fmt: skip


def nearest_centre_graph(ds: Any, lon: float, lat: float, usable: np.ndarray | None) -> tuple[Any, Any]:
    """Lazy ``(slot, metres)``: the valid, searchable tile whose centre is nearest ``(lon, lat)``
    and its distance in metres (``inf`` when no tile has lon/lat)."""
    lons, lats, valid = ds["lon"].data, ds["lat"].data, ds["valid"].data
    dx, dy = local_metres(lons, lats, lon, lat)
    ok = valid & da.isfinite(lons)
    if usable is not None and not usable.all():
        ok = ok & da.from_array(usable)[ds["image"].data.clip(0)]
    dist = da.where(ok, da.sqrt(dx * dx + dy * dy), np.inf)
    slot = dist.argmin()
    return slot, dist.min()


def pair_blocks(
    ds: Any, blocks: Sequence[Delayed], block_rows: int, slots: np.ndarray, partner: np.ndarray, space: str,
    postprocess: Any,
) -> dict[int, Delayed]:  # fmt: skip
    """The blocks holding tiles with a partner (``aerial-search changes``: the pairs' after
    ``slots``, ascending, and their ``partner`` slots), each with its partners' rows gathered
    from the store (``space``: the fingerprint variable searched) by
    :func:`~pipeline.search.kernels.attach_partners`: only the Zarr chunks that hold partners
    are read, and blocks without partners are not in the graph."""
    arr = ds[space].data
    n = int(arr.shape[0])
    out: dict[int, Delayed] = {}
    attach = dask.delayed(kernels.attach_partners, pure=True)
    for i, block in enumerate(blocks):
        lo, hi = np.searchsorted(slots, [i * block_rows, (i + 1) * block_rows])
        if lo == hi:
            continue
        paired = np.zeros(min(block_rows, n - i * block_rows), bool)
        paired[slots[lo:hi] - i * block_rows] = True
        need, pos = np.unique(partner[lo:hi], return_inverse=True)
        rows = arr[need].rechunk({0: -1, 1: -1})
        key = "pair-block-" + tokenize(block.key, need, pos, postprocess)
        out[i] = attach(block, rows, paired, pos, postprocess, dask_key_name=key)
    return out
