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


def build_knn(path: str, k: int, batch: int = 512, runtime: Any = None, device: str = "", dtype: str = "") -> dict:
    """The k-NN graph as derived arrays: every valid tile's ``k`` nearest valid tiles (overlapping
    ones excluded, as in search) by Euclidean distance after the store's post-processing (not
    DBA), with their cosine similarity, found by the search engine itself in batches of
    ``batch`` queries (many queries per pass over the store; memory bounded by the batch), on
    ``device`` in ``dtype`` when given (:mod:`pipeline.search.device`: each batch is one matrix
    product per block on the GPU).
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
    valid = np.flatnonzero(ds["valid"].values)
    if runtime is None:
        index.persist()
    x = index.postprocess.apply(np.asarray(ds["fingerprint"].values, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1)
    z = int(ds["fingerprint"].data.chunksize[0]) or n
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
    seconds = time.perf_counter() - t0
    info = {"k": int(k), "tiles": int(len(valid)), "seconds": round(seconds, 3), **index.index_description()}
    store.write_knn(path, n, k, info, ((a, out_uid[a : a + z], out_sim[a : a + z]) for a in range(0, n, z)))
    return info
