"""Diffusion on a k-nearest-neighbour graph (NumPy + scipy.sparse; no dask, no Zarr).

Manifold ranking (Zhou et al. 2004; Iscen et al., CVPR 2017): with ``A`` the affinities of a
mutual k-NN graph, ``S = D^-1/2 A D^-1/2`` and a query's initial scores ``y``, the ranking is
``f = (I - alpha S)^-1 y``, found here by conjugate gradient (``I - alpha S`` is symmetric
positive definite for ``0 <= alpha < 1``), never by a dense inverse.

Definitions (what the tests' closed form recomputes independently):

- nodes: the query's exact top-R tiles (the seeds, search's filters and exclusions applied);
- edges: ``i - j`` when each is among the other's first ``k`` stored neighbours (``knn_uid``)
  and both are nodes; affinity ``max(0, knn_sim)^3`` (cosine similarity cubed);
- ``y_i = max(0, cos(query, x_i))^3`` for the query's ``k`` nearest nodes (the first seeds),
  0 for the others: the query joins the graph as a node linked to its k nearest tiles, and the
  ranking is its row of ``(I - alpha S)^-1`` (Iscen et al.'s new-query case).

The cost per query is bounded by R and k (a graph of R nodes and at most R k edges), not by the
store's size.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import SearchError

POWER = 3  # affinity = max(0, cosine) ** POWER


def affinity(sim: np.ndarray) -> np.ndarray:
    return np.maximum(np.nan_to_num(np.asarray(sim, dtype=np.float64), nan=0.0), 0.0) ** POWER


def subgraph(nodes: np.ndarray, knn_uid: np.ndarray, knn_sim: np.ndarray, k: int):
    """The mutual k-NN affinity matrix (scipy CSR, symmetric, ``len(nodes)`` square) among
    ``nodes`` (uids), from their stored neighbour rows ``knn_uid`` / ``knn_sim`` (len(nodes), K)."""
    from scipy import sparse

    n = len(nodes)
    if k > knn_uid.shape[1]:
        raise SearchError(
            f"--diffusion-k {k} exceeds the {knn_uid.shape[1]} neighbours stored per tile; rebuild with "
            f"`aerial-search postprocess --store STORE --knn {k}` or use a smaller --diffusion-k"
        )
    order = np.argsort(nodes, kind="stable")
    sorted_nodes = nodes[order]
    nb = knn_uid[:, :k]
    pos = np.searchsorted(sorted_nodes, nb).clip(0, max(n - 1, 0))
    inside = (sorted_nodes[pos] == nb) & np.isfinite(knn_sim[:, :k]) if n else np.zeros(nb.shape, bool)
    rows = np.repeat(np.arange(n), k).reshape(n, k)[inside]
    cols = order[pos[inside]]
    w = affinity(knn_sim[:, :k][inside])
    directed = sparse.csr_matrix((w, (rows, cols)), shape=(n, n))
    mutual = directed.minimum(directed.T)  # both directions present (and their common weight)
    mutual.setdiag(0)
    mutual.eliminate_zeros()
    return mutual


def diffuse(a, y: np.ndarray, alpha: float, tol: float = 1e-10, maxiter: int = 500) -> np.ndarray:
    """``f`` solving ``(I - alpha S) f = y`` with ``S = D^-1/2 A D^-1/2`` (isolated nodes keep
    ``f_i = y_i``), by conjugate gradient."""
    from scipy import sparse
    from scipy.sparse.linalg import LinearOperator, cg

    if not 0.0 <= alpha < 1.0:
        raise SearchError(f"--alpha for diffusion must be in [0, 1), got {alpha}")
    n = a.shape[0]
    d = np.asarray(a.sum(axis=1)).ravel()
    inv = np.zeros(n)
    inv[d > 0] = 1.0 / np.sqrt(d[d > 0])
    s = sparse.diags(inv) @ a @ sparse.diags(inv)
    op = LinearOperator((n, n), matvec=lambda v: v - alpha * (s @ v), dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not n:
        return y
    f, info = cg(op, y, rtol=tol, atol=0.0, maxiter=maxiter)
    if info > 0:  # not converged: say so rather than rank by an unfinished solve
        raise SearchError(f"diffusion did not converge in {maxiter} conjugate-gradient steps (alpha {alpha})")
    return f


def initial(q: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """``y``: the affinity of query ``q`` to its ``k`` nearest seeds (the first ``k`` rows of
    ``x``, which come nearest first), 0 for the rest."""
    y = affinity(cosines(q, x))
    y[k:] = 0.0
    return y


def cosines(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cosine similarity of one query ``q`` (d,) to rows ``x`` (n, d), float64."""
    q = np.asarray(q, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(q)
    return np.divide(x @ q, den, out=np.zeros(len(x)), where=den > 0)
