"""Diffusion on a k-nearest-neighbour graph (NumPy + scipy.sparse; no dask, no Zarr).

Manifold ranking (Zhou et al. 2004; Iscen et al., CVPR 2017): with ``A`` the affinities of a
mutual k-NN graph, ``S = D^-1/2 A D^-1/2`` and a query's initial scores ``y``, the ranking is
``f = (I - alpha S)^-1 y``, found here by conjugate gradient (``I - alpha S`` is symmetric
positive definite for ``0 <= alpha < 1``), never by a dense inverse.

Definitions (what the tests' closed form recomputes independently):

- edges: ``i - j`` when each is among the other's first ``k`` stored neighbours (``knn_uid``);
  affinity ``max(0, knn_sim)^3`` (cosine similarity cubed);
- **whole graph** (the default): the nodes are every tile of the store. A query that is a tile
  of the archive diffuses from its own node (``y = e_q``); an outside query (an image, a place
  without a tile) joins the graph as a node linked to its ``k`` nearest tiles,
  ``y_i = max(0, cos(query, x_i))^3`` for those and 0 elsewhere (Iscen et al.'s new-query
  case). :func:`mutual_graph` builds ``A`` once, :func:`solve` runs one conjugate gradient per
  query, all queries of a call at once (a sparse-dense product per step): a query costs
  O(tiles x k) per step, linear in the store (no n^2 anywhere). Tiles the query does not
  reach (other components of the graph) have ``f = 0``; they follow the reached ones in exact
  distance order (:func:`rank_key`).
- **seeds** (``--diffusion-seeds R``, ``+seedsR``): the nodes are the query's exact top-R tiles
  only (search's filters and exclusions applied) and the query joins them through ``y`` as an
  outside query does; the rest of the store follows in exact order. A query then costs O(R k),
  whatever the store's size; ranking quality drops where classes are larger than R.
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


def mutual_graph(neighbours: np.ndarray, sims: np.ndarray, k: int):
    """The mutual k-NN affinity matrix (scipy CSR, symmetric, ``n`` square) of ``n`` nodes from
    each node's neighbour rows ``neighbours`` int ``(n, K)`` (row indices; negative: none) and
    their cosines ``sims`` (NaN: none), using the first ``k`` of each row."""
    from scipy import sparse

    neighbours = np.asarray(neighbours, dtype=np.int64)
    n = len(neighbours)
    if k > neighbours.shape[1]:
        raise SearchError(
            f"--diffusion-k {k} exceeds the {neighbours.shape[1]} neighbours stored per tile; rebuild with "
            f"`aerial-search postprocess --store STORE --knn {k}` or use a smaller --diffusion-k"
        )
    nb, sim = neighbours[:, :k], np.asarray(sims, dtype=np.float64)[:, :k]
    ok = (nb >= 0) & (nb < n) & np.isfinite(sim)
    rows = np.repeat(np.arange(n), k).reshape(n, k)[ok]
    directed = sparse.csr_matrix((affinity(sim[ok]), (rows, nb[ok])), shape=(n, n))
    mutual = directed.minimum(directed.T)
    mutual.setdiag(0)
    mutual.eliminate_zeros()
    return mutual


def normalized(a):
    """``S = D^-1/2 A D^-1/2`` (CSR); isolated nodes keep zero rows."""
    from scipy import sparse

    d = np.asarray(a.sum(axis=1)).ravel()
    inv = np.zeros(len(d))
    inv[d > 0] = 1.0 / np.sqrt(d[d > 0])
    return (sparse.diags(inv) @ a @ sparse.diags(inv)).tocsr()


def solve(s, y: np.ndarray, alpha: float, tol: float = 1e-8, maxiter: int = 1000) -> np.ndarray:
    """``F`` solving ``(I - alpha S) F = Y`` for every column of ``y`` ``(n, m)`` at once:
    conjugate gradient run column by column in lockstep (one sparse-dense product per step for
    all queries). ``tol``: relative residual per column."""
    if not 0.0 <= alpha < 1.0:
        raise SearchError(f"--alpha for diffusion must be in [0, 1), got {alpha}")
    y = np.asarray(y, dtype=np.float64)
    vector = y.ndim == 1
    b = y[:, None] if vector else y
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = (r * r).sum(0)
    stop = (tol * np.sqrt((b * b).sum(0))) ** 2
    for _ in range(maxiter):
        active = rr > stop
        if not active.any():
            break
        ap = p - alpha * (s @ p)
        pap = (p * ap).sum(0)
        step = np.divide(rr, pap, out=np.zeros_like(rr), where=active & (pap > 0))
        x += step * p
        r -= step * ap
        rr_new = (r * r).sum(0)
        beta = np.divide(rr_new, rr, out=np.zeros_like(rr), where=active & (rr > 0))
        p = r + beta * p
        rr = rr_new
    else:
        if (rr > stop).any():
            raise SearchError(f"diffusion did not converge in {maxiter} conjugate-gradient steps (alpha {alpha})")
    return x[:, 0] if vector else x


def rank_key(f: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Lower is better: ``-f`` where the diffusion reached a tile (``f > 0``), else the exact
    distance squeezed into ``[0, 1)`` (``d / (1 + d)``): unreached tiles follow in distance order."""
    f = np.asarray(f, dtype=np.float64)
    d = np.maximum(np.asarray(distance, dtype=np.float64), 0.0)
    return np.where(f > 0, -f, d / (1.0 + d))
