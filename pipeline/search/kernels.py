"""Search kernels: NumPy functions on one block of tiles, no dask, no Zarr.

A *block* is a dict of per-tile arrays of one chunk of the store: ``fingerprint`` (n, dim)
float32|float16 (post-processed when the index applies post-processing), ``valid`` (n,) bool,
``uid`` (n,) uint64, ``lon``/``lat`` (n,) float64, and, in a persisted index, ``sqnorm`` (n,)
float32 (+inf where not valid) and ``image``/``row``/``col`` (otherwise decoded from the uid).

The **scorer seam**: a :class:`Scorer` maps a block to an ``(n, m)`` array of scores, one column
per query, *lower is better*. :class:`L2Scorer` (squared Euclidean distance) is the first;
example sets, classifiers and code scans plug in the same way. Everything after the scores
does not know which scorer made them:

- :func:`chunk_topk`: mask rows that filters, statuses, validity or overlap exclusion rule
  out (score ``+inf``), then keep an *unsorted* partial top-k per column (``argpartition``),
  carrying global uids and centres (:data:`RESULT_DTYPE`).
- :func:`merge_topk`: the same selection over concatenated partial results, so it is also the
  combine step of a tree reduction. Only :func:`finalize` sorts, by ``(score, uid)``.

Ties are broken by uid; k beyond the candidates returns them all.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from pipeline import codes, grid
from pipeline.errors import SearchError
from pipeline.geo import local_metres

RESULT_DTYPE = np.dtype([("score", "f8"), ("uid", "u8"), ("lon", "f8"), ("lat", "f8")])
BLOCK_VARS = ("fingerprint", "valid", "uid", "lon", "lat")  # what a block is read from
CODE_BLOCK_VARS = ("codes", "valid", "uid", "lon", "lat")  # what a codes scan reads instead

Block = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Queries, exclusions and filters


@dataclass(frozen=True)
class Exclusions:
    """Tiles whose footprint rules out overlapping candidates for one query column each.

    One row per excluded tile: ``column`` (the query it applies to), ``image``/``row``/``col``
    (-1 when the tile is not of this store) and ``lon``/``lat``/``half_m`` (NaN when unknown).
    """

    column: np.ndarray
    image: np.ndarray
    row: np.ndarray
    col: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    half_m: np.ndarray

    def __len__(self) -> int:
        return len(self.column)

    @classmethod
    def none(cls) -> Exclusions:
        """No tile excluded (a classifier, or a query from outside the store)."""
        i, f = np.zeros(0, np.int64), np.zeros(0)
        return cls(i, i, i, i, f, f, f)


@dataclass(frozen=True)
class Queries:
    """A batch of ``m`` queries: fingerprints and what exclusion needs to know of each.

    ``fingerprints`` float32 ``(m, dim)``. ``image``/``row``/``col`` locate a query tile of this
    store (-1 for queries from elsewhere); ``lon``/``lat`` (NaN if unknown) and ``half_m`` (half
    the tile's ground size in metres) exclude overlapping tiles of other images.
    """

    fingerprints: np.ndarray
    image: np.ndarray
    row: np.ndarray
    col: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    half_m: np.ndarray

    @classmethod
    def from_fingerprints(cls, fp: np.ndarray) -> Queries:
        fp = np.atleast_2d(np.asarray(fp, dtype=np.float32))
        m = len(fp)
        nan = np.full(m, np.nan)
        minus = np.full(m, -1, dtype=np.int64)
        return cls(fp, minus, minus.copy(), minus.copy(), nan, nan.copy(), nan.copy())

    @classmethod
    def concat(cls, parts: Sequence[Queries]) -> Queries:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.fingerprints)

    def exclusions(self) -> Exclusions:
        """Each query's own tile, for the queries that are tiles (of this store or on the ground)."""
        j = np.flatnonzero((self.image >= 0) | np.isfinite(self.lon))
        return Exclusions(j, self.image[j], self.row[j], self.col[j], self.lon[j], self.lat[j], self.half_m[j])


@dataclass(frozen=True)
class ExampleSet:
    """One query made of several examples: raw ``positives`` and ``negatives`` (fingerprints and
    locations, as :class:`Queries`), scored by ``score``: ``centroid`` (the distance to
    ``q = mP + w (mP - mN)``) or ``nearest`` (the distance to the closest positive minus ``w``
    times the distance to the closest negative). ``negative_weight`` w defaults to 0.5 with
    negatives, 0 without."""

    positives: Queries
    negatives: Queries
    score: str = "centroid"
    negative_weight: float | None = None

    def __post_init__(self) -> None:
        if self.score not in ("centroid", "nearest"):
            raise SearchError(f"--score must be centroid or nearest, got {self.score!r}")

    @property
    def weight(self) -> float:
        if not len(self.negatives):
            return 0.0
        return 0.5 if self.negative_weight is None else float(self.negative_weight)


def centroid_query(positives: np.ndarray, negatives: np.ndarray, weight: float) -> np.ndarray:
    """``q = mP + w (mP - mN)``: the positives' mean pushed away from the negatives' mean."""
    mp = positives.astype(np.float64).mean(axis=0)
    if not len(negatives) or not weight:
        return mp
    return mp + weight * (mp - negatives.astype(np.float64).mean(axis=0))


def exclusions_of_sets(sets: Sequence[ExampleSet]) -> Exclusions:
    """Every example of each set excludes the tiles overlapping it, for that set's column."""
    cols = []
    for j, es in enumerate(sets):
        for q in (es.positives, es.negatives):
            e = q.exclusions()
            cols.append(
                Exclusions(
                    np.full(len(e), j, dtype=np.int64),
                    *(getattr(e, f) for f in ("image", "row", "col", "lon", "lat", "half_m")),
                )
            )
    return Exclusions(*(np.concatenate([getattr(c, f) for c in cols]) for f in Exclusions.__dataclass_fields__))


@dataclass(frozen=True)
class Filters:
    """Restrictions applied inside every chunk before the top-k."""

    include_overlapping: bool = False
    bbox: tuple[float, float, float, float] | None = None  # W, S, E, N in degrees
    image_ids: tuple[int, ...] | None = None  # only these source images


def overlaps(
    image_a: np.ndarray,
    row_a: np.ndarray,
    col_a: np.ndarray,
    lon_a: np.ndarray,
    lat_a: np.ndarray,
    half_a: np.ndarray,
    image_b: int,
    row_b: int,
    col_b: int,
    lon_b: float,
    lat_b: float,
    half_b: float,
) -> np.ndarray:
    """bool: tiles ``a`` (arrays) whose footprint overlaps tile ``b`` (scalars).

    Same image: ``|drow| < 256`` and ``|dcol| < 256``. Other images, both with lon/lat: the
    footprints, taken as north-up squares of side ``2 * half`` metres around the centres,
    intersect (local metres around ``b``, :func:`pipeline.geo.local_metres`).
    """
    same = (image_a == image_b) & (np.abs(row_a - row_b) < grid.TILE) & (np.abs(col_a - col_b) < grid.TILE)
    if not (np.isfinite(lon_b) and np.isfinite(lat_b) and np.isfinite(half_b)):
        return same
    dx, dy = local_metres(lon_a, lat_a, lon_b, lat_b)
    reach = half_a + half_b
    with np.errstate(invalid="ignore"):
        ground = (image_a != image_b) & (np.abs(dx) < reach) & (np.abs(dy) < reach)
    return same | ground


# --------------------------------------------------------------------------------------------
# Scorers


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
        x = as_float32(block["fingerprint"])
        sqnorm = block.get("sqnorm")
        if sqnorm is None:
            sqnorm = masked_sqnorm(x, block["valid"])
        q = self.queries
        d2 = x @ q.T
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


def _sq_dists(x: np.ndarray, sqnorm: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``(n, p)`` squared distances of rows ``x`` to examples ``e`` by the norm expansion."""
    d2 = x @ e.T
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

    def _score(self, x: np.ndarray, sqnorm: np.ndarray, c: int) -> np.ndarray:
        s = np.sqrt(_sq_dists(x, sqnorm, self.positives[c]).min(axis=1))
        if len(self.negatives[c]) and self.weights[c]:
            s -= self.weights[c] * np.sqrt(_sq_dists(x, sqnorm, self.negatives[c]).min(axis=1))
        return s

    def scores(self, block: Block) -> np.ndarray:
        x = as_float32(block["fingerprint"])
        sqnorm = block.get("sqnorm")
        if sqnorm is None:
            sqnorm = masked_sqnorm(x, block["valid"])
        finite = np.where(np.isfinite(sqnorm), sqnorm, 0.0).astype(np.float32)
        out = np.stack([self._score(x, finite, c) for c in range(len(self))], axis=1)
        out[~np.isfinite(sqnorm)] = np.inf
        return out

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        x = as_float32(block["fingerprint"][rows]).astype(np.float64)
        sq = np.einsum("ij,ij->i", x, x)

        def nearest(e: np.ndarray) -> np.ndarray:  # float64 expansion: memory (rows, examples)
            return np.sqrt(_sq_dists(x, sq, e.astype(np.float64)).min(axis=1))

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
        s = as_float32(block["fingerprint"]) @ -self.coef.T
        s -= self.intercept[None, :].astype(np.float32)
        return s

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        x = as_float32(block["fingerprint"][rows]).astype(np.float64)
        return -(x @ self.coef[j].astype(np.float64) + float(self.intercept[j]))

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
            return codes.hamming_words(block["code_words"], self.codes).astype(np.float32)
        return codes.hamming(block["codes"], self.codes).astype(np.float32)

    def exact(self, block: Block, rows: np.ndarray, j: int) -> np.ndarray:
        c = codes.rows_of_words(block["code_words"], rows) if "code_words" in block else block["codes"][rows]
        return codes.hamming(c, self.codes[j : j + 1])[:, 0].astype(np.float64)

    def candidates(self, scores: np.ndarray, k: int) -> list[np.ndarray]:
        """Per column, rows that hold its ``k`` best (masked rows are +inf): a counting
        selection over the small integer distances, then the exact selection on those."""
        out = []
        for j in range(scores.shape[1]):
            col = scores[:, j]
            ok = np.flatnonzero(np.isfinite(col))
            out.append(ok[codes.smallest(col[ok].astype(np.int64), k)])
        return out

    def report(self, score: np.ndarray) -> np.ndarray:
        return np.asarray(score, dtype=np.float64)

    def internal(self, value: float) -> float:
        return float(value)


def rerank_block(block: Block, rows: np.ndarray, member: np.ndarray, scorer: Scorer, k: int) -> list[np.ndarray]:
    """The second pass of ``search --codes`` on one block: exact scores (``scorer.exact``) of
    the candidate ``rows`` of the block, ``member`` bool ``(len(rows), m)`` saying which query
    column each is a candidate of, and each column's partial top-k (unsorted RESULT_DTYPE)."""
    uid, lon, lat = block["uid"], block["lon"], block["lat"]
    out = []
    for j in range(member.shape[1]):
        r = rows[member[:, j]]
        res = np.empty(len(r), dtype=RESULT_DTYPE)
        res["score"] = scorer.exact(block, r, j) if len(r) else np.zeros(0)
        res["uid"], res["lon"], res["lat"] = uid[r], lon[r], lat[r]
        out.append(res[select(res["score"], res["uid"], k)])
    return out


# --------------------------------------------------------------------------------------------
# Per-chunk map


def tile_location(block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, row, col)`` of a block's tiles: stored in a persisted block, else from the uid."""
    if "image" in block:
        return block["image"], block["row"], block["col"]
    return grid.unpack_uid(block["uid"])  # cheaper than reading three more arrays


def allowed_rows(block: Block, filters: Filters, usable: np.ndarray | None) -> np.ndarray | None:
    """bool ``(n,)``: rows that may be results (valid, image searchable, inside the filters), or
    None when every row may."""
    image, _, _ = tile_location(block)
    allowed = None if block["valid"].all() else block["valid"].astype(bool)
    if usable is not None and not usable.all():
        searchable = usable[image]
        allowed = searchable if allowed is None else allowed & searchable
    if filters.bbox is not None:
        w, s, e, n = filters.bbox
        lon, lat = block["lon"], block["lat"]
        with np.errstate(invalid="ignore"):
            inside = (lon >= w) & (lon <= e) & (lat >= s) & (lat <= n)
        allowed = inside if allowed is None else allowed & inside
    if filters.image_ids is not None:
        in_images = np.isin(image, filters.image_ids)
        allowed = in_images if allowed is None else allowed & in_images
    return allowed


def mask_scores(
    scores: np.ndarray,
    block: Block,
    filters: Filters,
    exclude: Exclusions,
    half_m: np.ndarray,
    usable: np.ndarray | None,
) -> None:
    """Set ``scores`` (n, m) to +inf, in place, where a tile may not answer a column."""
    allowed = allowed_rows(block, filters, usable)
    if allowed is not None:
        scores[~allowed] = np.inf
    if filters.include_overlapping or not len(exclude):
        return
    image, row, col = tile_location(block)
    lon, lat = block["lon"], block["lat"]
    half_rows = half_m[image] if len(image) else np.zeros(0)
    for e in range(len(exclude)):
        hit = overlaps(
            image, row, col, lon, lat, half_rows,
            exclude.image[e], exclude.row[e], exclude.col[e], exclude.lon[e], exclude.lat[e], exclude.half_m[e],
        )  # fmt: skip
        scores[hit, exclude.column[e]] = np.inf


def chunk_topk(
    block: Block,
    scorer: Scorer,
    k: int,
    filters: Filters,
    exclude: Exclusions,
    half_m: np.ndarray,
    usable: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Partial top-k of one block for each query column: ``m`` unsorted RESULT_DTYPE arrays.

    ``half_m``: half tile size in metres per image id (ground-overlap exclusion); ``usable``:
    per image id, whether its ingest is done (tiles of other images are skipped).
    """
    scores = scorer.scores(block)
    mask_scores(scores, block, filters, exclude, half_m, usable)
    uid, lon, lat = block["uid"], block["lon"], block["lat"]
    pre = getattr(scorer, "candidates", None)  # a scorer with a faster preselection (integer scores)
    if pre is not None:
        cols = [c[select(scores[c, j], uid[c], k)] for j, c in enumerate(pre(scores, k))]
    else:
        cols = select_columns(scores, uid, k)
    out = []
    for j, sel in enumerate(cols):
        res = np.empty(len(sel), dtype=RESULT_DTYPE)
        res["score"] = scorer.exact(block, sel, j)
        res["uid"], res["lon"], res["lat"] = uid[sel], lon[sel], lat[sel]
        out.append(res)
    return out


def chunk_threshold(
    block: Block,
    scorer: Scorer,
    max_score: float,
    limit: int,
    filters: Filters,
    exclude: Exclusions,
    half_m: np.ndarray,
    usable: np.ndarray | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Every tile of one block scoring at most ``max_score`` (exact scores), per column: the best
    ``limit`` of them (unsorted) and how many passed in all, ``(m,)`` int64.

    Candidates come from the scorer's fast scores with a small margin; the threshold is applied
    to the exact scores, so a tile just past it is never let in by rounding.
    """
    scores = scorer.scores(block)
    mask_scores(scores, block, filters, exclude, half_m, usable)
    uid, lon, lat = block["uid"], block["lon"], block["lat"]
    margin = 1e-3 + 1e-4 * abs(max_score)
    out, counts = [], np.zeros(len(scorer), dtype=np.int64)
    for j in range(scores.shape[1]):
        cand = np.flatnonzero(scores[:, j] <= max_score + margin)
        exact = scorer.exact(block, cand, j) if len(cand) else np.zeros(0)
        keep = cand[exact <= max_score]
        exact = exact[exact <= max_score]
        counts[j] = len(keep)
        if len(keep) > limit:
            sel = select(exact, uid[keep], limit)
            keep, exact = keep[sel], exact[sel]
        res = np.empty(len(keep), dtype=RESULT_DTYPE)
        res["score"], res["uid"], res["lon"], res["lat"] = exact, uid[keep], lon[keep], lat[keep]
        out.append(res)
    return out, counts


def merge_threshold(
    parts: Sequence[tuple[list[np.ndarray], np.ndarray]], limit: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Combine step of the threshold collection: the best ``limit`` and the summed counts."""
    return merge_topk([p[0] for p in parts], limit), np.sum([p[1] for p in parts], axis=0)


def finalize_threshold(part: tuple[list[np.ndarray], np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    return finalize(part[0]), part[1]


def empty_threshold(m: int) -> tuple[list[np.ndarray], np.ndarray]:
    return empty_results(m), np.zeros(m, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Top-k selection, merge, finalize: scorer-agnostic


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


def nms(res: np.ndarray, k: int, half_m: np.ndarray) -> np.ndarray:
    """Spatial non-maximum suppression: walk sorted results ``res`` and keep each one that does
    not overlap an already kept one, until ``k`` are kept."""
    image, row, col = grid.unpack_uid(res["uid"])
    half = half_m[image] if len(image) else np.zeros(0)
    keep: list[int] = []
    for i in range(len(res)):
        if len(keep) == k:
            break
        if keep:
            idx = np.array(keep)
            hit = overlaps(
                image[idx], row[idx], col[idx], res["lon"][idx], res["lat"][idx], half[idx],
                image[i], row[i], col[i], res["lon"][i], res["lat"][i], half[i],
            )  # fmt: skip
            if hit.any():
                continue
        keep.append(i)
    return res[keep]


# --------------------------------------------------------------------------------------------
# Blocks


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


def make_block(
    *arrays: np.ndarray,
    with_norms: bool,
    postprocess: Any = None,
    names: Sequence[str] = BLOCK_VARS,
    code_kind: str = "binary",
) -> Block:
    """A block from the arrays ``names`` (default :data:`BLOCK_VARS`) of one chunk.
    ``postprocess`` (a :class:`pipeline.post.PostProcess`) post-processes the raw fingerprints;
    ``with_norms`` precomputes what a persisted index reuses for every query, the ``codes``
    included, in the layout their scan reads (``code_kind`` binary: 64-bit words; pq: columns)."""
    block = dict(zip(names, arrays))
    if "fingerprint" in block and postprocess is not None and postprocess.method != "none":
        block["fingerprint"] = postprocess.apply(block["fingerprint"])
    if with_norms:
        if "fingerprint" in block:
            block["sqnorm"] = masked_sqnorm(block["fingerprint"], block["valid"])
        if "codes" in block and code_kind == "pq":
            block["code_cols"] = codes.columns(block.pop("codes"))  # held in the scan's layout only
        elif "codes" in block and block["codes"].shape[1] % 8 == 0:
            block["code_words"] = codes.words(block.pop("codes"))
        block["image"], block["row"], block["col"] = grid.unpack_uid(block["uid"])
    return block
