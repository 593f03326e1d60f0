"""Top-k selection, merge and finalize: scorer-agnostic NumPy, the analogue of dask's
``chunk.topk``. The same *unsorted* partial top-k (``argpartition``) serves as the per-chunk step
and as the combine step of a tree reduction; only :func:`finalize` sorts, by ``(score, uid)``.
Values travel with their global uids and centres (:data:`RESULT_DTYPE`). Ties are broken by uid;
k beyond the candidates returns them all. Threshold mode carries counts beside the results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESULT_DTYPE = np.dtype([("score", "f8"), ("uid", "u8"), ("lon", "f8"), ("lat", "f8")])


def select(score: np.ndarray, uid: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest ``(score, uid)`` pairs among finite scores, unsorted."""
    finite = np.flatnonzero(np.isfinite(score))
    if len(finite) <= k:
        return finite
    part = finite[np.argpartition(score[finite], k - 1)[:k]]
    threshold = score[part].max()
    cand = finite[score[finite] <= threshold]  # ties at the boundary: decide by uid
    if len(cand) == k:
        return cand
    return cand[np.lexsort((uid[cand], score[cand]))[:k]]


def select_columns(scores: np.ndarray, uid: np.ndarray, k: int) -> list[np.ndarray]:
    """:func:`select` for every column of ``scores`` (n, m), vectorized over the columns.

    One ``argpartition`` along axis 0 serves all queries; a column falls back to the exact
    per-column selection only when it has ties at its k-th value or fewer than k finite rows.
    """
    n, m = scores.shape
    if n <= k:
        return [select(scores[:, j], uid, k) for j in range(m)]
    part = np.argpartition(scores, k - 1, axis=0)[:k]
    kth = np.take_along_axis(scores, part, axis=0).max(axis=0)
    exact = ((scores <= kth).sum(axis=0) == k) & np.isfinite(kth)
    return [part[:, j] if exact[j] else select(scores[:, j], uid, k) for j in range(m)]


def merge_topk(parts: Sequence[list[np.ndarray]], k: int) -> list[np.ndarray]:
    """Combine step: the same unsorted top-k selection over several partial results."""
    merged = []
    for j in range(len(parts[0])):
        cat = np.concatenate([p[j] for p in parts])
        merged.append(cat[select(cat["score"], cat["uid"], k)])
    return merged


def finalize(part: list[np.ndarray]) -> list[np.ndarray]:
    """Sort each column's results by (score, uid)."""
    return [r[np.lexsort((r["uid"], r["score"]))] for r in part]


def empty_results(m: int) -> list[np.ndarray]:
    return [np.empty(0, RESULT_DTYPE) for _ in range(m)]



def merge_threshold(
    parts: Sequence[tuple[list[np.ndarray], np.ndarray]], limit: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Combine step of the threshold collection: the best ``limit`` and the summed counts."""
    return merge_topk([p[0] for p in parts], limit), np.sum([p[1] for p in parts], axis=0)


def finalize_threshold(part: tuple[list[np.ndarray], np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    return finalize(part[0]), part[1]


def empty_threshold(m: int) -> tuple[list[np.ndarray], np.ndarray]:
    return empty_results(m), np.zeros(m, dtype=np.int64)
