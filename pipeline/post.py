"""Fingerprint post-processing kernels: methods fitted once and applied to stored and query
fingerprints at search time (the store keeps raw fingerprints), and query expansion. Pure NumPy:
fitting a store and building its DBA array is driver code (:mod:`pipeline.derived`); saving and
loading one is the store's (:func:`pipeline.store.save_postprocess`).

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

from pipeline.errors import PostprocessError

METHODS = ("none", "l2", "hellinger", "pca")


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows divided by their norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@dataclass(frozen=True)
class PostProcess:
    """A fitted post-processing: ``apply`` maps raw ``(n, d)`` to ``(n, d_out)``."""

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
        raise PostprocessError(f"unknown post-processing {self.method!r}; choose one of {METHODS}")

    @property
    def dims(self) -> int | None:
        return None if self.projection is None else int(self.projection.shape[1])


def fit(method: str, x: np.ndarray, dims: int = 128, eps: float = 1e-6) -> PostProcess:
    """Fit ``method`` on raw fingerprints ``x`` (n, d)."""
    if method not in METHODS:
        raise PostprocessError(f"unknown post-processing {method!r}; choose one of {METHODS}")
    if method != "pca":
        return PostProcess(method)
    x = np.asarray(x, dtype=np.float64)
    if not 1 <= dims <= min(x.shape):
        raise PostprocessError(
            f"pca needs 1 <= --dims <= min(tiles to fit on, fingerprint dimension) = {min(x.shape)}, got {dims}; "
            f"pass --dims {max(1, min(x.shape))} or fewer, or fit on a store with more tiles"
        )
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:dims]
    projection = eigvec[:, order] / np.sqrt(eigval[order] + eps)
    return PostProcess("pca", mean.astype(np.float32), projection.astype(np.float32))


def expand_queries(q: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-QE: ``q`` (m, d) and the fingerprints of each query's top results ``(m, depth, d)``,
    all already post-processed -> new L2-normalized queries (m, d)."""
    qn = l2n(q)
    nb = np.stack([l2n(n) for n in neighbours]) if len(neighbours) else np.zeros((0, 0, q.shape[1]), np.float32)
    sim = np.einsum("md,mkd->mk", qn, nb)
    w = np.maximum(sim, 0.0) ** alpha
    return l2n(qn + np.einsum("mk,mkd->md", w, nb))
