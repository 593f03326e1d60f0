"""The k-NN graph without comparing every pair (NumPy only; no dask, no Zarr): inverted lists over
k-means cells in a PCA-reduced space, then an exact refinement, as ``postprocess --knn K`` builds it.

1. **Reduced space.** The search space's top :data:`DIMS` principal components (fitted on a
   sample of at most :data:`SAMPLE` tiles): candidate distances cost DIMS, not d, per pair.
2. **Cells.** k-means (Lloyd, :func:`kmeans`) with ``C = sqrt(n)`` centroids fitted on the sample;
   every tile goes to its nearest centroid (:func:`assign`).
3. **Candidates.** Each tile probes its own ``nprobe`` nearest cells (:func:`probe_cells`;
   per-query probing: a tile near a cell's edge looks across it). Work runs cell by cell: a
   cell's members against every tile probing it, one dense product per block, and a pair only
   counts when it beats the tile's current ``L``-th candidate (``L = k + EXTRA + OVERLAP``; each
   tile's own cell is scanned first, so that few do), so the selection costs a comparison per
   pair. With :data:`NPROBE` cells of ``sqrt(n)``, ``64 / sqrt(n)`` of the pairs are compared (1M
   tiles: 6 %), at DIMS multiply-adds each.
4. **Exact refinement.** Each tile's ``L`` candidates are re-scored exactly (float64 differences
   in the full space), tiles overlapping it are masked as search masks them
   (:func:`pipeline.search.kernels.overlaps`), and the ``k`` best by (distance, uid) kept; a tile
   whose candidates were all crowded out by overlapping tiles gets an exact scan of its cells.

Recall against the exact graph is measured by ``benchmarks/knn.py`` (1,000 random tiles against
their exact k nearest over the whole store). :func:`update` grows a graph by new tiles at a cost
in proportion to them (their own lists as above, and each old tile in the cells they probe takes
a new tile in when it is nearer than its current k-th neighbour): ``postprocess --knn K`` on a
store grown since its graph was built does that, with the cells kept in the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.search import kernels

SAMPLE = 50_000  # tiles the PCA and k-means are fitted on
DIMS = 64  # principal components the candidates are compared in
ITERATIONS = 10  # Lloyd's iterations
NPROBE = 64  # cells each tile probes: recall@30 0.989 (100k manifold tiles, 316 cells), 0.993 (300k, 547 cells: 82)
EXTRA = 16  # candidates kept beyond k for the exact re-score
OVERLAP = 24  # room for the tiles overlapping a tile (8 of its own image, more across flights)
BLOCK = 8192  # probing tiles scored against one cell at once


@dataclass(frozen=True)
class Tiles:
    """The tiles a graph is over, by slot: the search space ``x`` (n, d) float32 and what overlap
    exclusion needs (uid, lon, lat, valid, and per slot image/row/col; ``half_m`` per image)."""

    x: np.ndarray
    uid: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    valid: np.ndarray
    image: np.ndarray
    row: np.ndarray
    col: np.ndarray
    half_m: np.ndarray


@dataclass(frozen=True)
class Cells:
    """The reduced space and the cells: ``mean`` (d,), ``basis`` (d, r), ``centroids`` (C, r)."""

    mean: np.ndarray
    basis: np.ndarray
    centroids: np.ndarray

    def reduce(self, x: np.ndarray, batch: int = 65536) -> np.ndarray:
        out = np.empty((len(x), self.basis.shape[1]), np.float32)
        for a in range(0, len(x), batch):
            out[a : a + batch] = (np.asarray(x[a : a + batch], np.float32) - self.mean) @ self.basis
        return out

    @property
    def count(self) -> int:
        return len(self.centroids)


def cells_for(n: int) -> int:
    """Cells for ``n`` tiles: ``sqrt(n)``, at least 1."""
    return max(1, int(math.sqrt(n)))


def fit_cells(x: np.ndarray, valid: np.ndarray, seed: int = 0) -> Cells:
    """PCA and k-means fitted on a sample of the valid rows of ``x``."""
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(valid)
    if len(rows) > SAMPLE:
        rows = np.sort(rng.choice(rows, SAMPLE, replace=False))
    s = np.asarray(x[rows], np.float64)
    mean = s.mean(0) if len(s) else np.zeros(x.shape[1])
    r = min(DIMS, x.shape[1], max(1, len(s)))
    _, _, vt = np.linalg.svd(s - mean, full_matrices=False) if len(s) else (None, None, np.eye(x.shape[1]))
    basis = vt[:r].T.astype(np.float32)
    z = ((s - mean) @ basis).astype(np.float32)
    c = min(cells_for(int(valid.sum())), max(1, len(z)))
    return Cells(mean.astype(np.float32), basis, kmeans(z, c, seed=seed) if len(z) else np.zeros((1, r), np.float32))


def kmeans(x: np.ndarray, c: int, iterations: int = ITERATIONS, seed: int = 0) -> np.ndarray:
    """``c`` centroids of rows ``x`` (float32), Lloyd's iterations from a random sample of rows;
    an emptied cell is re-seeded at the row farthest from its centroid."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float32)
    cent = x[rng.choice(len(x), c, replace=False)].copy()
    for _ in range(iterations):
        a, d = assign(x, cent)
        counts = np.bincount(a, minlength=c)
        order = np.argsort(a, kind="stable")
        nonempty = counts > 0
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
        sums = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
        cent[nonempty] = (sums / counts[nonempty, None]).astype(np.float32)
        empty = np.flatnonzero(~nonempty)
        if len(empty):
            cent[empty] = x[np.argsort(-d)[: len(empty)]]
    return cent


def assign(x: np.ndarray, cent: np.ndarray, batch: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid (int32) and its squared distance."""
    cc = (cent.astype(np.float32) ** 2).sum(1)
    out = np.empty(len(x), np.int32)
    dist = np.empty(len(x), np.float32)
    for a in range(0, len(x), batch):
        xb = np.asarray(x[a : a + batch], dtype=np.float32)
        d = cc[None, :] - 2 * xb @ cent.T
        out[a : a + len(xb)] = np.argmin(d, axis=1)
        dist[a : a + len(xb)] = d[np.arange(len(xb)), out[a : a + len(xb)]] + (xb * xb).sum(1)
    return out, dist


def probe_cells(z: np.ndarray, cent: np.ndarray, nprobe: int, batch: int = 16384) -> np.ndarray:
    """Each row's ``nprobe`` nearest cells: int32 ``(n, nprobe)``, in no particular order."""
    nprobe = min(nprobe, len(cent))
    cc = (cent ** 2).sum(1)
    out = np.empty((len(z), nprobe), np.int32)
    for a in range(0, len(z), batch):
        d = cc[None, :] - 2 * z[a : a + batch] @ cent.T
        out[a : a + len(d)] = np.argpartition(d, nprobe - 1, axis=1)[:, :nprobe] if nprobe < len(cent) else np.arange(len(cent))
    return out


def nprobe_for(cells: int) -> int:
    """Cells each tile probes: :data:`NPROBE` (all of them in stores of fewer cells)."""
    return max(1, min(cells, NPROBE))


def _members(cell: np.ndarray, keep: np.ndarray, c: int) -> list[np.ndarray]:
    """The slots of each of ``c`` cells among ``keep`` (bool), ascending."""
    order = np.argsort(cell, kind="stable")
    order = order[keep[order]]
    bounds = np.searchsorted(cell[order], np.arange(c + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(c)]


def candidates(z: np.ndarray, queries: np.ndarray, targets: np.ndarray, cell: np.ndarray, probe: np.ndarray,
               c: int, width: int, progress: Callable[[int], None] | None = None) -> np.ndarray:  # fmt: skip
    """For each slot of ``queries``, its ``width`` nearest ``targets`` (bool masks over slots) in
    the reduced space ``z`` among the cells it probes (``probe``, rows of ``queries`` in order):
    int64 ``(len(queries), width)``, -1 where fewer (a query may be among its own: the exact
    refinement drops it)."""
    zz = (z.astype(np.float32) ** 2).sum(1)
    best_i = np.full((len(queries), width), -1, np.int64)
    best_d = np.full((len(queries), width), np.inf, np.float32)
    members = _members(cell, targets, c)
    # first each query's own cell, whole: its list starts full, so that a pair of the other
    # cells only counts when it beats the list's last (few do)
    own = cell[queries]
    by_own = _members(own, np.ones(len(queries), bool), c)
    for cc in range(c):
        m, rows = members[cc], by_own[cc]
        if not len(m) or not len(rows):
            continue
        for a in range(0, len(rows), BLOCK):
            r = rows[a : a + BLOCK]
            q = queries[r]
            d = zz[m][None, :] - 2 * (z[q] @ z[m].T) + zz[q][:, None]
            t = min(width, len(m))
            part = np.argpartition(d, t - 1, axis=1)[:, :t] if t < len(m) else np.tile(np.arange(len(m)), (len(r), 1))
            pd = np.take_along_axis(d, part, 1)
            srt = np.argsort(pd, axis=1, kind="stable")
            best_i[r, :t] = m[np.take_along_axis(part, srt, 1)]
            best_d[r, :t] = np.take_along_axis(pd, srt, 1)
    probe = np.where(probe == own[:, None], -1, probe)  # the own cell is done
    z1 = np.concatenate([z, np.ones((len(z), 1), np.float32)], 1)
    flat = probe.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(c + 1))  # entries of -1 sort first, before cell 0's
    who = order // probe.shape[1]  # query row (of ``queries``) per probe entry, grouped by cell
    for cc in range(c):
        m = members[cc]
        qrows = who[bounds[cc] : bounds[cc + 1]]
        if not len(m) or not len(qrows):
            continue
        # |m|^2 - 2 q.m as one product: [q, 1] . [-2 m, |m|^2] (|q|^2 goes to the threshold)
        zm2 = np.concatenate([-2.0 * z[m], zz[m][:, None]], 1).T
        for a in range(0, len(qrows), BLOCK):
            rows = qrows[a : a + BLOCK]
            q = queries[rows]
            d = z1[q] @ zm2
            tau = best_d[rows, -1] - zz[q]
            hit_r, hit_c = np.nonzero(d < tau[:, None])
            if not len(hit_r):
                continue
            _merge(best_i, best_d, rows, hit_r, m[hit_c], d[hit_r, hit_c] + zz[q[hit_r]])
        if progress is not None:
            progress(len(m))
    return best_i


def _merge(best_i: np.ndarray, best_d: np.ndarray, rows: np.ndarray, hit_r: np.ndarray, ids: np.ndarray,
           dists: np.ndarray) -> None:  # fmt: skip
    """Merge new (row, id, distance) offers into the rows' candidate lists (kept ascending)."""
    touched, inv = np.unique(hit_r, return_inverse=True)
    r = rows[touched]
    width = best_i.shape[1]
    counts = np.bincount(inv, minlength=len(touched))
    most = int(counts.max())
    new_i = np.full((len(touched), most), -1, np.int64)
    new_d = np.full((len(touched), most), np.inf, np.float32)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(inv)) - starts[inv[order]]
    new_i[inv[order], pos] = ids[order]
    new_d[inv[order], pos] = dists[order]
    all_i = np.concatenate([best_i[r], new_i], 1)
    all_d = np.concatenate([best_d[r], new_d], 1)
    keep = np.argsort(all_d, axis=1, kind="stable")[:, :width]  # ascending: the last column is the threshold
    best_i[r] = np.take_along_axis(all_i, keep, 1)
    best_d[r] = np.take_along_axis(all_d, keep, 1)


def refine(tiles: Tiles, slots: np.ndarray, cand: np.ndarray, k: int, fallback: Callable[[int], np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Exact: each slot's candidates re-scored in the full space, overlapping tiles masked, the
    ``k`` best by (distance, uid); ``fallback(slot)`` gives a wider candidate set when too few
    remain. Slots int64 ``(len(slots), k)`` (-1: none) and distances float64 (inf: none)."""
    rows = np.full((len(slots), k), -1, np.int64)
    dist = np.full((len(slots), k), np.inf)
    for j, s in enumerate(slots):
        pick = cand[j][cand[j] >= 0]
        order, exact = _exact(tiles, s, pick, k)
        if len(order) < k and len(pick) == cand.shape[1]:  # crowded out by overlapping tiles
            pick = fallback(int(s))
            order, exact = _exact(tiles, s, pick, k)
        rows[j, : len(order)] = pick[order]
        dist[j, : len(order)] = exact[order]
    return rows, dist


def _exact(tiles: Tiles, s: int, pick: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    diff = tiles.x[pick].astype(np.float64) - tiles.x[s].astype(np.float64)
    exact = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    exact[_overlapping(tiles, s, pick) | (pick == s)] = np.inf
    order = np.lexsort((tiles.uid[pick], exact))[:k]
    return order[np.isfinite(exact[order])], exact


def _overlapping(tiles: Tiles, s: int, slots: np.ndarray) -> np.ndarray:
    """bool: which of ``slots`` overlap tile ``s`` (pixels of the same image, or ground footprints
    across images), as search's overlap exclusion decides (:func:`pipeline.search.kernels.overlaps`)."""
    im = tiles.image[slots]
    return kernels.overlaps(im, tiles.row[slots], tiles.col[slots], tiles.lon[slots], tiles.lat[slots],
                            tiles.half_m[im], tiles.image[s], tiles.row[s], tiles.col[s], tiles.lon[s],
                            tiles.lat[s], tiles.half_m[tiles.image[s]])  # fmt: skip


def build(tiles: Tiles, k: int, cells: Cells | None = None, cell: np.ndarray | None = None,
          progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, Cells, np.ndarray]:  # fmt: skip
    """The whole graph: neighbour slots ``(n, k)`` (-1: none), exact distances, the cells and each
    slot's cell (-1: not valid)."""
    cells = cells or fit_cells(tiles.x, tiles.valid)
    z = cells.reduce(tiles.x)
    if cell is None:
        cell = np.full(len(z), -1, np.int32)
        cell[tiles.valid] = assign(z[tiles.valid], cells.centroids)[0]
    queries = np.flatnonzero(tiles.valid)
    nb, dist = _lists(tiles, z, k, cells, cell, queries, tiles.valid, progress)
    return nb, dist, cells, cell


def _lists(tiles: Tiles, z: np.ndarray, k: int, cells: Cells, cell: np.ndarray, queries: np.ndarray,
           targets: np.ndarray, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    n = len(tiles.x)
    nprobe = nprobe_for(cells.count)
    probe = probe_cells(z[queries], cells.centroids, nprobe)
    width = k + EXTRA + OVERLAP
    cand = candidates(z, queries, targets, cell, probe, cells.count, width, progress)
    members = _members(cell, targets, cells.count)

    def fallback(s: int) -> np.ndarray:
        row = int(np.searchsorted(queries, s))
        return np.concatenate([members[c] for c in probe[row]])

    rows, d = refine(tiles, queries, cand, k, fallback)
    nb = np.full((n, k), -1, np.int64)
    dist = np.full((n, k), np.inf)
    nb[queries], dist[queries] = rows, d
    return nb, dist


def update(tiles: Tiles, k: int, nb: np.ndarray, dist: np.ndarray, new: np.ndarray, cells: Cells,
           cell: np.ndarray, redo: np.ndarray = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The graph ``(nb, dist)`` grown by the slots ``new`` (valid tiles without a list): their
    own lists (against every valid tile), and each old tile in a cell a new tile probes that is
    nearer to it than its current k-th neighbour takes it in; ``redo`` (tiles that lost
    neighbours) get new lists too. Returns the lists and the cells."""
    nb, dist, cell = nb.copy(), dist.copy(), cell.copy()
    z = cells.reduce(tiles.x)
    new = np.asarray(new, np.int64)
    if len(new):
        cell[new] = assign(z[new], cells.centroids)[0]
    ask = np.union1d(new, np.asarray(redo, np.int64))
    if len(ask):
        got_nb, got_d = _lists(tiles, z, k, cells, cell, ask, tiles.valid)
        nb[ask], dist[ask] = got_nb[ask], got_d[ask]
    is_new = np.zeros(len(tiles.x), bool)
    is_new[new] = True
    old_valid = tiles.valid & ~is_new
    members = _members(cell, old_valid, cells.count)
    probe = probe_cells(z[new], cells.centroids, nprobe_for(cells.count)) if len(new) else np.zeros((0, 1), np.int32)
    offers: dict[int, list[tuple[float, int]]] = {}
    x = tiles.x
    for j, s in enumerate(new):
        old = np.concatenate([members[c] for c in probe[j]]) if len(probe[j]) else np.zeros(0, np.int64)
        if not len(old):
            continue
        diff = x[old].astype(np.float64) - x[s].astype(np.float64)
        d = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        d[_overlapping(tiles, int(s), old)] = np.inf
        hit = np.flatnonzero(d < dist[old, -1])
        for h in hit:
            offers.setdefault(int(old[h]), []).append((float(d[h]), int(s)))
    for o, got in offers.items():
        have = nb[o] >= 0
        cand = np.concatenate([nb[o][have], [s for _, s in got]])
        dd = np.concatenate([dist[o][have], [v for v, _ in got]])
        order = np.lexsort((tiles.uid[cand], dd))[:k]
        nb[o], dist[o] = -1, np.inf
        nb[o, : len(order)], dist[o, : len(order)] = cand[order], dd[order]
    return nb, dist, cell
