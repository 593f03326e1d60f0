"""Scorers: the seam every way of ranking plugs into. A :class:`Scorer` maps a block (one chunk's
per-tile arrays, :mod:`pipeline.search.kernels`) to an ``(n, m)`` array of scores, one column
per query, *lower is better*; :class:`L2Scorer` (squared Euclidean distance) is the first, and
example sets (:class:`CentroidScorer`, :class:`NearestScorer`), classifiers
(:class:`LinearScorer`) and code scans (:class:`HammingScorer`, :class:`PQScorer`) plug in the
same way. What comes after the scores (masks, the top-k, the reductions) does not know which
scorer made them. NumPy on one block: no dask, no Zarr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from pipeline import codes

Block = dict[str, np.ndarray]


class Scorer(Protocol):
    """Scores of the tiles of a block for ``len(scorer)`` query columns; lower is better."""

    name: ClassVar[str]  # what :meth:`report` returns, as results call it ("distance", "score")
    higher_is_better: ClassVar[bool]  # of the reported value (a probability); scores stay lower-is-better

    def __len__(self) -> int: ...

    def scores(self, block: Block) -> np.ndarray:
        """A fresh, writable ``(n, m)`` float array (the kernel masks it in place)."""
        ...

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        """float64 scores of ``rows`` for column ``j``, as reported (``scores`` may approximate)."""
        ...

    def report(self, score: np.ndarray) -> np.ndarray:
        """The value results show for a score (e.g. the distance for a squared distance)."""
        ...

    def internal(self, value: float) -> float:
        """The score whose reported value is ``value``: a threshold on what results show,
        as the threshold collection applies it."""
        ...


@dataclass(frozen=True)
class L2Scorer:
    """Squared Euclidean distance to each query fingerprint ``queries`` float32 ``(m, dim)``.

    Selection uses the norm expansion ``|x|^2 - 2 x.q + |q|^2``: one float32 matrix product per
    block (BLAS), with the block's precomputed ``sqnorm`` when it has one (+inf for invalid rows,
    so they never make the top-k). The kept rows are recomputed exactly as ``sum((x - q)^2)``
    in float64, since the expansion loses precision near zero. Reported as the distance.
    """

    queries: np.ndarray
    name: ClassVar[str] = "distance"
    higher_is_better: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.queries)

    def scores(self, block: Block) -> np.ndarray:
        sqnorm = block.get("sqnorm")
        q = self.queries
        d2, norms = products(block["fingerprint"], q.T, norms=sqnorm is None)
        if sqnorm is None:
            sqnorm = np.where(block["valid"], norms, np.float32(np.inf))
        d2 *= -2.0
        d2 += sqnorm[:, None]
        d2 += np.einsum("ij,ij->i", q, q)[None, :]
        return d2

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        diff = as_float32(block["fingerprint"][rows]) - self.queries[j]
        return np.einsum("ij,ij->i", diff, diff, dtype=np.float64)

    def report(self, score: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(score, 0.0))

    def internal(self, value: float) -> float:
        return float(value) ** 2


@dataclass(frozen=True)
class CentroidScorer(L2Scorer):
    """An example set's centroid query ``q = mP + w (mP - mN)`` (``queries``, one per set), scored
    by the squared Euclidean distance to it and reported as ``score`` (the distance)."""

    name: ClassVar[str] = "score"


def _sq_dists_from(dots: np.ndarray, sqnorm: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``(n, p)`` squared distances of rows to examples ``e`` by the norm expansion, from the
    rows' products with the examples ``dots`` ``(n, p)`` (overwritten) and their ``sqnorm``."""
    d2 = dots
    d2 *= -2.0
    d2 += sqnorm[:, None]
    d2 += np.einsum("ij,ij->i", e, e)[None, :]
    return np.maximum(d2, 0.0)


@dataclass(frozen=True)
class NearestScorer:
    """Example sets scored by ``min_i |x - P_i| - w min_j |x - N_j|`` (lower is better): close to
    some positive, far from every negative. One column per set: ``positives[c]`` (p, dim) and
    ``negatives[c]`` (n, dim, possibly empty) float32, ``weights[c]`` = w."""

    positives: tuple[np.ndarray, ...]
    negatives: tuple[np.ndarray, ...]
    weights: tuple[float, ...]
    name: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.positives)

    def scores(self, block: Block) -> np.ndarray:
        # every set's examples in one product with the block (one pass over its rows)
        used = [(self.positives[c], self.negatives[c] if len(self.negatives[c]) and self.weights[c] else None)
                for c in range(len(self))]  # fmt: skip
        examples = np.concatenate([e for pair in used for e in pair if e is not None], axis=0).astype(np.float32)
        sqnorm = block.get("sqnorm")
        dots, norms = products(block["fingerprint"], examples.T, norms=sqnorm is None)
        if sqnorm is None:
            sqnorm = np.where(block["valid"], norms, np.float32(np.inf))
        finite = np.where(np.isfinite(sqnorm), sqnorm, 0.0).astype(np.float32)
        cols, at = [], 0
        for c, (pos, neg) in enumerate(used):
            s = np.sqrt(_sq_dists_from(dots[:, at : at + len(pos)], finite, pos).min(axis=1))
            at += len(pos)
            if neg is not None:
                s -= self.weights[c] * np.sqrt(_sq_dists_from(dots[:, at : at + len(neg)], finite, neg).min(axis=1))
                at += len(neg)
            cols.append(s)
        out = np.stack(cols, axis=1)
        out[~np.isfinite(sqnorm)] = np.inf
        return out

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        x = as_float32(block["fingerprint"][rows]).astype(np.float64)

        def nearest(e: np.ndarray) -> np.ndarray:
            # Direct differences, one example at a time: each row's value depends on that row
            # alone (not on which rows are scored together, as a matrix product's blocking
            # would), and an example's own tile is at distance exactly 0.
            best = np.full(len(x), np.inf)
            for ex in e.astype(np.float64):
                diff = x - ex
                np.minimum(best, np.einsum("ij,ij->i", diff, diff), out=best)
            return np.sqrt(best)

        s = nearest(self.positives[j])
        if len(self.negatives[j]) and self.weights[j]:
            s -= self.weights[j] * nearest(self.negatives[j])
        return s

    def report(self, score: np.ndarray) -> np.ndarray:
        return np.asarray(score, dtype=np.float64)

    def internal(self, value: float) -> float:
        return float(value)


@dataclass(frozen=True)
class PQScorer:
    """The asymmetric product-quantization distance between each query (its look-up table,
    ``tables`` float32 ``(m, subspaces, 256)``, :meth:`pipeline.codes.PQCodes.tables`) and the
    block's PQ ``codes``: the first, approximate pass of ``search --codes`` with ``pq`` codes."""

    tables: np.ndarray
    name: ClassVar[str] = "distance"
    higher_is_better: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.tables)

    def scores(self, block: Block) -> np.ndarray:
        cols = block["code_cols"] if "code_cols" in block else codes.columns(block["codes"])
        return codes.adc(cols, self.tables)

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        c = block["code_cols"][:, rows] if "code_cols" in block else codes.columns(block["codes"][rows])
        return codes.adc(c, self.tables[j : j + 1])[:, 0].astype(np.float64)

    def report(self, score: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(score, 0.0))

    def internal(self, value: float) -> float:
        return float(value) ** 2


def code_scorer(encoder: Any, queries: np.ndarray) -> HammingScorer | PQScorer:
    """The first-pass scorer of ``search --codes`` for a store's codes ``encoder``
    (:func:`pipeline.codes.encoder`) and float32 ``queries`` in its search space."""
    if isinstance(encoder, codes.PQCodes):
        return PQScorer(encoder.tables(queries))
    return HammingScorer(encoder.encode(queries))


@dataclass(frozen=True)
class LinearScorer:
    """A linear classifier ``p = sigmoid(x . coef + intercept)`` on (post-processed) fingerprints,
    one column per model: ``coef`` (m, dim) float32, ``intercept`` (m,). The score is the negated
    logit (lower is better, monotone in -p); results report the probability."""

    coef: np.ndarray
    intercept: np.ndarray
    name: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True

    def __len__(self) -> int:
        return len(self.coef)

    def scores(self, block: Block) -> np.ndarray:
        s, _ = products(block["fingerprint"], -self.coef.T)
        s -= self.intercept[None, :].astype(np.float32)
        return s

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        x = as_float32(block["fingerprint"][rows]).astype(np.float64)
        # einsum, not a matrix product: each row's value independent of the rows scored with it
        return -(np.einsum("ij,j->i", x, self.coef[j].astype(np.float64)) + float(self.intercept[j]))

    def report(self, score: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(np.asarray(score, dtype=np.float64)))  # sigmoid(-score)

    def internal(self, value: float) -> float:
        """The score at or below which a tile's probability is at least ``value``."""
        p = min(max(float(value), 1e-12), 1 - 1e-12)
        return -float(np.log(p / (1 - p)))


@dataclass(frozen=True)
class HammingScorer:
    """The Hamming distance between each query's binary code ``codes`` uint8 ``(m, B)`` and the
    block's ``codes`` (:mod:`pipeline.codes`): the first, approximate pass of ``search --codes``,
    whose candidates are then re-ranked exactly (:func:`rerank_block`)."""

    codes: np.ndarray
    name: ClassVar[str] = "hamming"
    higher_is_better: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.codes)

    def scores(self, block: Block) -> np.ndarray:
        if "code_words" in block:
            return codes.hamming_words(block["code_words"], self.codes, dtype=np.float32)
        return codes.hamming(block["codes"], self.codes).astype(np.float32)

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        c = codes.rows_of_words(block["code_words"], rows) if "code_words" in block else block["codes"][rows]
        return codes.hamming(c, self.codes[j : j + 1])[:, 0].astype(np.float64)

    def candidates(self, scores: np.ndarray, k: int) -> list[np.ndarray]:
        """Per column, rows that hold its ``k`` best (masked rows are +inf): a counting
        selection over the small integer distances, then the exact selection on those."""
        bits = 8 * self.codes.shape[1]
        return [codes.smallest_masked(scores[:, j], k, bits) for j in range(scores.shape[1])]

    def report(self, score: np.ndarray) -> np.ndarray:
        return np.asarray(score, dtype=np.float64)

    def internal(self, value: float) -> float:
        return float(value)



@dataclass(frozen=True)
class RankedScorer:
    """A ranking computed elsewhere, per slot of the store: ``keys`` float64 ``(n_slots, m)``,
    lower is better, read through the block's ``slot`` column (whole-graph diffusion,
    :func:`pipeline.diffusion.rank_key`: ``-f`` where the diffusion reached a tile, the squeezed
    distance elsewhere). Reported as the diffusion score ``f`` (0 where unreached). The masks,
    the top-k and the ties by uid are the engine's."""

    keys: np.ndarray
    name: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True

    def __len__(self) -> int:
        return self.keys.shape[1]

    def scores(self, block: Block) -> np.ndarray:
        return self.keys[block["slot"]]  # fancy indexing: a fresh copy

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        return self.keys[block["slot"][rows], j]

    def report(self, score: np.ndarray) -> np.ndarray:
        return np.maximum(-np.asarray(score, dtype=np.float64), 0.0)

    def internal(self, value: float) -> float:
        return -float(value)


def as_float32(x: np.ndarray) -> np.ndarray:
    """float32 view or copy (exact for float16). float16 goes through torch's vectorized
    conversion when this process has already imported torch (measured on 2 cores, 8,192 x 512
    blocks: 1.1 ms against NumPy's 4.7 ms), else through NumPy: importing torch costs 1-2 s,
    more than a one-off search of a few million tiles saves. A persisted float16 index imports
    it (:meth:`pipeline.search.index.SearchIndex.persist`), since each of its queries pays the
    conversion again. Both give the same values."""
    if x.dtype == np.float32:
        return x
    if x.dtype == np.float16 and "torch" in sys.modules:
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
    return x.astype(np.float32)


# float16 rows converted per step by :func:`products`: the float32 step (1 MiB at 512-d) stays in
# cache while its product is taken; many queries amortize a step's call overhead over more work
PRODUCT_ROWS, PRODUCT_ROWS_MANY = 512, 4096


def products(x: np.ndarray, a: np.ndarray, norms: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``x @ a`` as float32 ``(n, m)`` for rows ``x`` (float32 or float16) and float32 ``a``
    ``(dim, m)``; with ``norms``, also the rows' squared norms ``(n,)`` (else None).

    float32 rows go to BLAS as they are. float16 rows, when torch is loaded (a persisted index
    loads it, :func:`use_torch_conversion`), are converted a step of :data:`PRODUCT_ROWS` at a time
    into one reused float32 buffer and multiplied while it is in cache, instead of converting the
    whole block into a fresh float32 copy first: measured on 500,000 x 512 rows, one query, one
    core, 65 ms against 431 ms (the copy's new pages cost more than its arithmetic), and the
    block never has a float32 twin in memory. Without torch, NumPy converts the whole block (its
    float16 casts are scalar: stepping does not help them). Each row's product is the same
    whatever step it falls in, up to BLAS's summation order."""
    a = np.asarray(a, dtype=np.float32)
    step = PRODUCT_ROWS if a.shape[1] < 32 else PRODUCT_ROWS_MANY
    if x.dtype != np.float16 or "torch" not in sys.modules or len(x) <= step:
        x = as_float32(x)
        return x @ a, (np.einsum("ij,ij->i", x, x) if norms else None)
    import torch

    n = len(x)
    out = np.empty((n, a.shape[1]), dtype=np.float32)
    sq = np.empty(n, dtype=np.float32) if norms else None
    src = torch.from_numpy(np.ascontiguousarray(x))
    buf = torch.empty((step, x.shape[1]), dtype=torch.float32)
    f32 = buf.numpy()
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        part = f32[: hi - lo]
        buf[: hi - lo].copy_(src[lo:hi])
        np.matmul(part, a, out=out[lo:hi])
        if sq is not None:
            np.einsum("ij,ij->i", part, part, out=sq[lo:hi])
    return out, sq


def use_torch_conversion() -> bool:
    """Import torch, when installed, so that :func:`as_float32` converts float16 with it from now
    on; whether it did."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def masked_sqnorm(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Squared norms of the rows of ``x`` (float32), +inf where ``valid`` is False."""
    x = as_float32(x)
    return np.where(valid, np.einsum("ij,ij->i", x, x), np.float32(np.inf))


@dataclass(frozen=True)
class PairScorer:
    """Change between each tile and its partner, the window over the same ground in an earlier
    image (``aerial-search changes``): the block carries the partner's fingerprint row
    (``partner``, post-processed like the block's own) and ``paired`` (False: no partner).
    One column; the squared Euclidean distance negated, so that the largest change ranks first
    through the same lower-is-better top-k and threshold reductions; rows without a partner
    score +inf. Reported as the distance (higher means more change)."""

    name: ClassVar[str] = "distance"
    higher_is_better: ClassVar[bool] = True

    def __len__(self) -> int:
        return 1

    def scores(self, block: Block) -> np.ndarray:
        diff = as_float32(block["fingerprint"]) - block["partner"]
        d2 = np.einsum("ij,ij->i", diff, diff)
        out = np.where(block["paired"], -d2, np.inf).astype(np.float64)
        return out[:, None]

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        diff = as_float32(block["fingerprint"][rows]).astype(np.float64) - block["partner"][rows]
        return -np.einsum("ij,ij->i", diff, diff)

    def report(self, score: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(-np.asarray(score, dtype=np.float64), 0.0))

    def internal(self, value: float) -> float:
        return -float(value) ** 2
