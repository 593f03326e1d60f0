"""Driver code that builds a store's derived data (``aerial-search postprocess``): the fitted
post-processing, and database-side augmentation (DBA) as the ``fingerprint_dba``
array. The methods themselves are kernels in :mod:`pipeline.post`; the arrays and attributes
are written by :mod:`pipeline.store`. Everything here is rebuilt from the raw fingerprints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import codes, post, store
from pipeline.errors import SearchError
from pipeline.search import Filters, L2Scorer, Queries, SearchIndex


def fit_store(path: str, method: str, dims: int = 128, sample: int = 200_000, seed: int = 0) -> post.PostProcess:
    """Fit ``method`` on (a sample of) a store's valid raw fingerprints and save it there."""
    ds = store.open_store(path)
    valid = np.flatnonzero(ds["valid"].values)
    if method == "pca" and len(valid) > sample:
        valid = np.sort(np.random.default_rng(seed).choice(valid, sample, replace=False))
    x = ds["fingerprint"].data[valid].compute() if method == "pca" else np.zeros((0, ds.sizes["feature"]), np.float32)
    t = post.fit(method, x, dims)
    store.save_postprocess(path, t, len(valid))
    return t


def augment_store(path: str, depth: int, alpha: float = 1.0, batch: int = 256, runtime: Any = None, device: str = "",
                  dtype: str = "") -> int:  # fmt: skip
    """Database-side augmentation: write ``fingerprint_dba`` (tile, post_feature), each valid
    tile's post-processed fingerprint alpha-QE-expanded with its ``depth`` nearest tiles
    (overlapping tiles excluded, as in search), through the search engine in batches of
    ``batch`` queries (on ``device`` in ``dtype`` when given, as :meth:`SearchIndex.persist` holds
    them). Returns the number of tiles augmented. Search uses the array in place of
    the post-processed raw fingerprints while it is current; adding images marks it stale."""
    index = SearchIndex.open(path, runtime)
    index.device, index.dtype = device, dtype
    index.use_dba = False  # neighbours come from the post-processed raw fingerprints, never an old DBA
    ds = index.ds
    valid = np.flatnonzero(ds["valid"].values)
    uids = ds["uid"].values
    if runtime is None:
        index.persist()
    x = index.postprocess.apply(ds["fingerprint"].values)
    out = np.zeros_like(x)
    slot_of = {int(uids[i]): int(i) for i in valid}  # padding slots repeat uid 0: never map them
    for s in range(0, len(valid), batch):
        rows = valid[s : s + batch]
        queries, _ = index.queries_from_uids([int(uids[r]) for r in rows])
        results = index.search(queries, depth)
        nb = np.zeros((len(rows), depth, x.shape[1]), np.float32)
        for i, res in enumerate(results):
            idx = [slot_of[int(u)] for u in res.uid]
            nb[i, : len(idx)] = x[idx]
        out[rows] = post.expand_queries(x[rows], nb, alpha)
    store.write_dba(path, out, depth, alpha, len(valid))
    return len(valid)


def encode_store(
    path: str, kind: str = "binary", bits: int | None = None, sample: int = 100_000, seed: int = 0, m: int | None = None
) -> dict:  # fmt: skip
    """Fit ``kind`` codes on a sample of the store's search space (its post-processed
    fingerprints, or its current ``fingerprint_dba``) and write every tile's code
    (:func:`pipeline.store.write_codes`). ``bits`` (binary): default ``min(512, dims)``; ``m``
    (pq, bytes per tile): default 64, or the largest divisor of the dimensions up to 64.
    Returns the ``postprocess.codes`` record."""
    if kind not in codes.KINDS:
        raise ValueError(f"unknown codes kind {kind!r}; choose one of {codes.KINDS}")
    if kind == "pq" and bits is not None:
        raise SearchError("--bits sets binary codes' length; pq codes take --m (bytes per tile)")
    if kind == "binary" and m is not None:
        raise SearchError("--m sets pq codes' bytes per tile; binary codes take --bits")
    index = SearchIndex.open(path)
    ds = index.ds
    source = "fingerprint_dba" if index.uses_dba else "fingerprint"

    def space(sel) -> np.ndarray:
        x = np.asarray(ds[source].data[sel].compute(), dtype=np.float32)
        return x if source == "fingerprint_dba" else index.postprocess.apply(x)

    valid = np.flatnonzero(ds["valid"].values)
    fit_rows = valid
    if len(valid) > sample:
        fit_rows = np.sort(np.random.default_rng(seed).choice(valid, sample, replace=False))
    x = space(fit_rows)
    enc: codes.BinaryCodes | codes.PQCodes
    if kind == "pq":
        m = m or max(d for d in range(1, 65) if x.shape[1] % d == 0)
        enc = codes.PQCodes.fit(x, m, seed=seed)
    else:
        bits = bits or min(512, x.shape[1] // 64 * 64 or 64)
        enc = codes.BinaryCodes.fit(x, bits, seed=seed)
    n = ds.sizes["tile"]
    z = int(ds["fingerprint"].data.chunksize[0]) or n

    def rows():
        for a in range(0, n, z):
            yield a, enc.encode(space(slice(a, min(n, a + z))))

    info = {
        "kind": kind,
        "bits": enc.bits,
        "fitted_on_tiles": int(len(fit_rows)),
        "on": source,
        "tiles": int(len(valid)),
    }
    if kind == "pq":
        info["m"] = enc.m
    store.write_codes(path, n, enc.nbytes, enc.arrays(), info, rows())
    return info


def build_knn(path: str, k: int, batch: int = 512, runtime: Any = None, device: str = "", dtype: str = "",
              progress: Any = None) -> dict:  # fmt: skip
    """The k-NN graph as derived arrays: every valid tile's ``k`` nearest valid tiles (overlapping
    ones excluded, as in search) by Euclidean distance after the store's post-processing (not
    DBA), with their cosine similarity.

    Without a device: inverted lists over k-means cells in a reduced space, refined exactly
    (:mod:`pipeline.knn`; ``method: ivf`` in the record), not a comparison of every pair. A graph
    that went stale because images were added (same ``k``, cells kept in the store) grows: only
    the new tiles get lists, old tiles take them in where nearer (``grown_by`` in the record),
    and tiles whose neighbours were removed are redone. On a ``device``
    (:mod:`pipeline.search.device`): the search engine itself in batches of ``batch`` queries,
    each batch one matrix product per block on the GPU (``method: engine``).
    Written by :func:`pipeline.store.write_knn`; returns the ``postprocess.knn`` record, with the
    time it took."""
    import time

    if k < 1:
        raise ValueError(f"--knn needs at least 1 neighbour, got {k}")
    t0 = time.perf_counter()
    index = SearchIndex.open(path, runtime)
    index.device, index.dtype = device, dtype
    index.use_dba = False
    ds = index.ds
    n = ds.sizes["tile"]
    valid_mask = ds["valid"].values.astype(bool)
    valid = np.flatnonzero(valid_mask)
    x = index.postprocess.apply(np.asarray(ds["fingerprint"].values, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1)
    z = int(ds["fingerprint"].data.chunksize[0]) or n
    if device:
        out_uid, out_sim = _knn_engine(index, x, norms, valid, k, batch, runtime)
        info = {"k": int(k), "tiles": int(len(valid)), "method": "engine", **index.index_description()}
        cells = cell = None
    else:
        from pipeline import knn

        image, row, col = (ds[v].values.astype(np.int64) for v in ("image", "row", "col"))
        uid = ds["uid"].values
        tiles = knn.Tiles(x, uid, ds["lon"].values, ds["lat"].values, valid_mask, image, row, col, index.half_m)
        grown = _grow_knn(index, tiles, k, x) if _can_grow(ds, k) else None
        if grown is not None:
            nb, dist, cells_fit, cell, grown_by = grown
        else:
            nb, dist, cells_fit, cell = knn.build(tiles, k, progress=progress)
            grown_by = 0
        out_uid = np.zeros((n, k), np.uint64)
        out_sim = np.full((n, k), np.nan, np.float32)
        has = nb >= 0
        out_uid[has] = uid[nb[has]]
        rows_i = np.nonzero(has)[0]
        a, b = norms[rows_i].astype(np.float64), norms[nb[has]].astype(np.float64)
        dots = (a * a + b * b - dist[has] ** 2) / 2  # from the exact distances: no (n k, d) gather
        den = a * b
        out_sim[has] = np.divide(dots, den, out=np.zeros(len(dots)), where=den > 0)
        cells = {"knn_mean": cells_fit.mean, "knn_basis": cells_fit.basis, "knn_centroids": cells_fit.centroids}
        info = {"k": int(k), "tiles": int(len(valid)), "method": "ivf", "cells": int(cells_fit.count),
                "nprobe": int(knn.nprobe_for(cells_fit.count)), "dims": int(cells_fit.basis.shape[1])}  # fmt: skip
        if grown_by:
            info["grown_by"] = int(grown_by)
    seconds = time.perf_counter() - t0
    info["seconds"] = round(seconds, 3)
    store.write_knn(path, n, k, info, ((a, out_uid[a : a + z], out_sim[a : a + z]) for a in range(0, n, z)), cells, cell)
    return info


def _knn_engine(index: SearchIndex, x: np.ndarray, norms: np.ndarray, valid: np.ndarray, k: int, batch: int,
                runtime: Any) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Every valid tile's k nearest through the search engine (a device's matrix products)."""
    ds = index.ds
    n = ds.sizes["tile"]
    if runtime is None:
        index.persist()
    out_uid = np.zeros((n, k), np.uint64)
    out_sim = np.full((n, k), np.nan, np.float32)
    image, row, col = (ds[v].values.astype(np.int64) for v in ("image", "row", "col"))
    lon, lat = ds["lon"].values, ds["lat"].values
    half = index.half_m
    for s in range(0, len(valid), batch):
        rows = valid[s : s + batch]  # queries straight from memory: no store reads, no result tables
        queries = Queries(x[rows], image[rows], row[rows], col[rows], lon[rows], lat[rows], half[image[rows]])
        found = index.topk(L2Scorer(queries.fingerprints), k, Filters(), queries.exclusions())
        for r, res in zip(rows, found):
            nb = index.slots_of(res["uid"])
            m = len(nb)
            out_uid[r, :m] = res["uid"]
            den = norms[nb] * norms[r]
            out_sim[r, :m] = np.divide(x[nb] @ x[r], den, out=np.zeros(m, np.float32), where=den > 0)
    return out_uid, out_sim


def _can_grow(ds: Any, k: int) -> bool:
    """Whether the store's graph can grow instead of being rebuilt: an IVF graph of the same k
    with its cells, stale only because the store changed since (images added or removed)."""
    meta = (ds.attrs.get("postprocess") or {}).get("knn") or {}
    return (bool(meta.get("stale")) and meta.get("method") == "ivf" and int(meta.get("k", 0)) == k
            and all(name in ds for name in ("knn_uid", "knn_sim", "knn_cell", "knn_centroids")))  # fmt: skip


def _grow_knn(index: SearchIndex, tiles: Any, k: int, x: np.ndarray) -> tuple | None:
    """The stored graph grown by its new tiles (:func:`pipeline.knn.update`), or None when it
    cannot be (the cells are of another space)."""
    from pipeline import knn

    ds = index.ds
    cells = knn.Cells(ds["knn_mean"].values, ds["knn_basis"].values, ds["knn_centroids"].values)
    if cells.basis.shape[0] != x.shape[1]:
        return None
    cell = ds["knn_cell"].values.astype(np.int32)
    sim = ds["knn_sim"].values
    valid = tiles.valid
    listed = np.isfinite(sim).any(axis=1) & valid & (cell >= 0)
    nb = np.full(sim.shape, -1, np.int64)
    has = np.isfinite(sim) & listed[:, None]
    nb[has] = index.slots_of(ds["knn_uid"].values[has])
    gone = has & ~valid[np.where(has, nb, 0)]  # neighbours removed since: their tiles are redone
    redo = np.flatnonzero(listed & gone.any(axis=1))
    nb[gone] = -1
    dist = np.full(sim.shape, np.inf)
    r, c = np.nonzero(nb >= 0)
    diff = x[r].astype(np.float64) - x[nb[r, c]].astype(np.float64)
    dist[r, c] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    order = np.lexsort((np.where(nb >= 0, tiles.uid[np.maximum(nb, 0)], 0), dist), axis=1)
    nb, dist = np.take_along_axis(nb, order, 1), np.take_along_axis(dist, order, 1)
    new = np.flatnonzero(valid & ~listed)
    cell = np.where(valid, cell, -1).astype(np.int32)
    nb, dist, cell = knn.update(tiles, k, nb, dist, new, cells, cell, redo=redo)
    return nb, dist, cells, cell, len(new)
