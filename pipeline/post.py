"""Fingerprint post-processing: transforms fitted once and applied to stored and query
fingerprints at search time (the store keeps raw fingerprints), and query expansion.

- ``none``: raw pooled features, as in the paper.
- ``l2``: each fingerprint divided by its Euclidean norm.
- ``hellinger``: signed square root, then L2 (the Hellinger kernel for non-negative features).
- ``pca``: centre on the fitting set's mean, project on its top ``dims`` principal axes scaled
  by ``1 / sqrt(eigenvalue + eps)`` (whitening), then L2. Needs a fitting set much larger than
  ``dims``; it must prove itself on held-out data before it becomes a default.

Query expansion (alpha-QE, Radenovic et al.): the new query is the L2-normalized sum of the query
and its top ``depth`` results, each weighted by ``max(similarity, 0) ** alpha`` with similarity
the inner product of L2-normalized vectors (the query weighs 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("none", "l2", "hellinger", "pca")


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows divided by their norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@dataclass(frozen=True)
class Transform:
    """A fitted post-processing transform: ``apply`` maps raw ``(n, d)`` to ``(n, d_out)``."""

    method: str = "none"
    mean: np.ndarray | None = field(default=None, repr=False)  # pca: (d,)
    projection: np.ndarray | None = field(default=None, repr=False)  # pca: (d, d_out), whitening included

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.method == "none":
            return x
        if self.method == "l2":
            return l2n(x)
        if self.method == "hellinger":
            return l2n(np.sign(x) * np.sqrt(np.abs(x)))
        if self.method == "pca":
            return l2n((x - self.mean) @ self.projection)
        raise ValueError(f"unknown post-processing {self.method!r}; choose one of {METHODS}")

    @property
    def dims(self) -> int | None:
        return None if self.projection is None else int(self.projection.shape[1])


def fit(method: str, x: np.ndarray, dims: int = 128, eps: float = 1e-6) -> Transform:
    """Fit ``method`` on raw fingerprints ``x`` (n, d)."""
    if method not in METHODS:
        raise ValueError(f"unknown post-processing {method!r}; choose one of {METHODS}")
    if method != "pca":
        return Transform(method)
    x = np.asarray(x, dtype=np.float64)
    if dims > min(x.shape):
        raise ValueError(f"pca dims {dims} exceeds min(fitting set size, dimension) = {min(x.shape)}")
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:dims]
    projection = eigvec[:, order] / np.sqrt(eigval[order] + eps)
    return Transform("pca", mean.astype(np.float32), projection.astype(np.float32))


def expand_queries(q: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-QE: ``q`` (m, d) and the fingerprints of each query's top results ``(m, depth, d)``,
    all already post-processed -> new L2-normalized queries (m, d)."""
    qn = l2n(q)
    nb = np.stack([l2n(n) for n in neighbours]) if len(neighbours) else np.zeros((0, 0, q.shape[1]), np.float32)
    sim = np.einsum("md,mkd->mk", qn, nb)
    w = np.maximum(sim, 0.0) ** alpha
    return l2n(qn + np.einsum("mk,mkd->md", w, nb))


def load_transform(ds) -> Transform:
    """The transform fitted into a store by :func:`save_transform` (``none`` if there is none)."""
    meta = ds.attrs.get("postprocess")
    if not meta:
        return Transform()
    if meta["method"] != "pca":
        return Transform(meta["method"])
    return Transform("pca", ds["post_mean"].values.astype(np.float32), ds["post_projection"].values.astype(np.float32))


def save_transform(path: str, t: Transform, fitted_on: int) -> None:
    """Write a fitted transform into a store (arrays + attributes); the raw fingerprints stay.
    A previous DBA array is dropped: it was derived under the old transform."""
    import datetime as dt

    import zarr

    g = zarr.open_group(str(path), mode="r+", zarr_format=3)
    for name in ("post_mean", "post_projection", "fingerprint_dba"):
        if name in g:
            del g[name]
    if t.method == "pca":
        m = g.create_array("post_mean", shape=t.mean.shape, dtype="float32", dimension_names=("feature",))
        m[:] = t.mean
        p = g.create_array(
            "post_projection", shape=t.projection.shape, dtype="float32", dimension_names=("feature", "post_feature")
        )
        p[:] = t.projection
    g.attrs["postprocess"] = {
        "method": t.method,
        "dims": t.dims,
        "fitted_on_tiles": int(fitted_on),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def fit_store(path: str, method: str, dims: int = 128, sample: int = 200_000, seed: int = 0) -> Transform:
    """Fit ``method`` on (a sample of) a store's valid raw fingerprints and save it there."""
    from pipeline.store import open_store

    ds = open_store(path)
    valid = np.flatnonzero(ds["valid"].values)
    if method == "pca" and len(valid) > sample:
        valid = np.sort(np.random.default_rng(seed).choice(valid, sample, replace=False))
    x = ds["fingerprint"].data[valid].compute() if method == "pca" else np.zeros((0, ds.sizes["feature"]), np.float32)
    t = fit(method, x, dims)
    save_transform(path, t, len(valid))
    return t


def augment_store(path: str, depth: int, alpha: float = 1.0, batch: int = 256, runtime=None) -> int:
    """Database-side augmentation: write ``fingerprint_dba`` (tile, post_feature), each valid
    tile's post-processed fingerprint alpha-QE-expanded with its ``depth`` nearest tiles
    (overlapping tiles excluded, as in search). A derived array: rebuild it after adding images;
    search uses it in place of the transformed raw fingerprints while it matches the transform."""
    import zarr

    from pipeline.search import SearchIndex

    index = SearchIndex.open(path, runtime)
    ds = index.ds
    valid = np.flatnonzero(ds["valid"].values)
    uids = ds["uid"].values
    if runtime is None:
        index.persist()
    x = index.transform.apply(ds["fingerprint"].values)
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
        out[rows] = expand_queries(x[rows], nb, alpha)
    g = zarr.open_group(str(path), mode="r+", zarr_format=3)
    if "fingerprint_dba" in g:
        del g["fingerprint_dba"]
    chunks = (int(ds["fingerprint"].encoding.get("chunks", (len(x),))[0]), x.shape[1])
    arr = g.create_array(
        "fingerprint_dba", shape=out.shape, chunks=chunks, dtype="float32", dimension_names=("tile", "post_feature")
    )
    arr[:] = out
    meta = dict(g.attrs.get("postprocess") or {"method": "none", "dims": None})
    meta["dba"] = {"depth": depth, "alpha": alpha, "tiles": int(len(valid))}
    g.attrs["postprocess"] = meta
    return len(valid)
