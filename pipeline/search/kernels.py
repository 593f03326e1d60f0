"""Search kernels: NumPy functions on one block of tiles, no dask, no Zarr.

A *block* is a dict of per-tile arrays of one chunk of the store: ``fingerprint`` (n, dim)
float32|float16 (post-processed when the index applies post-processing), ``valid`` (n,) bool,
``uid`` (n,) uint64, ``lon``/``lat`` (n,) float64, and, in a persisted index, ``sqnorm`` (n,)
float32 (+inf where not valid) and ``image``/``row``/``col`` (otherwise decoded from the uid).

The per-chunk map of a search: a scorer (:mod:`pipeline.search.scorers`) scores the block,
:func:`chunk_topk` masks the rows that filters, statuses, validity or overlap exclusion rule out
(score ``+inf``) and keeps an unsorted partial top-k per column (:mod:`pipeline.search.topk`,
which also merges and finalizes). Here too: queries and what they exclude, filters, the
threshold collection, the re-rank of code candidates and spatial non-maximum suppression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import codes, grid
from pipeline.errors import SearchError
from pipeline.geo import local_metres
from pipeline.search.scorers import Block, Scorer, masked_sqnorm
from pipeline.search.topk import RESULT_DTYPE, select, select_columns

BLOCK_VARS = ("fingerprint", "valid", "uid", "lon", "lat")  # what a block is read from
CODE_BLOCK_VARS = ("codes", "valid", "uid", "lon", "lat")  # what a codes scan reads instead


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
    image = None  # the tiles' image ids, only when a mask needs them (unpacking 2^20 uids: 10 ms)
    allowed = None if block["valid"].all() else block["valid"].astype(bool)
    if usable is not None and not usable.all():
        image = tile_location(block)[0]
        searchable = usable[image]
        allowed = searchable if allowed is None else allowed & searchable
    if filters.bbox is not None:
        w, s, e, n = filters.bbox
        lon, lat = block["lon"], block["lat"]
        with np.errstate(invalid="ignore"):
            inside = (lon >= w) & (lon <= e) & (lat >= s) & (lat <= n)
        allowed = inside if allowed is None else allowed & inside
    if filters.image_ids is not None:
        in_images = np.isin(tile_location(block)[0] if image is None else image, filters.image_ids)
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


def as_dtype(block: Block, dtype: str) -> Block:
    """A persisted block whose search space is held as ``dtype`` (``--index-dtype``), its norms
    those of the values held. float16 is refused beyond its range rather than turned into inf."""
    x = block.get("fingerprint")
    if x is None or x.dtype == np.dtype(dtype):
        return block
    if dtype == "float16" and len(x) and float(np.abs(x).max()) > float(np.finfo(np.float16).max):
        raise SearchError("the search space exceeds float16's range (65504); persist it as float32")
    out = dict(block)
    out["fingerprint"] = x.astype(dtype)
    out["sqnorm"] = masked_sqnorm(out["fingerprint"], block["valid"])
    return out


def attach_partners(block: Block, rows: np.ndarray, paired: np.ndarray, pos: np.ndarray, postprocess: Any = None) -> Block:
    """``block`` with its tiles' partner rows (``aerial-search changes``): ``rows`` are the
    distinct partner fingerprints the block needs (raw, post-processed here like the block's
    own), ``paired`` bool per tile, ``pos`` the row of ``rows`` of each paired tile. Adds
    ``partner`` float32 ``(n, dim)`` (zeros where unpaired) and ``paired``."""
    x = np.asarray(rows)
    if postprocess is not None and postprocess.method != "none" and len(x):
        x = postprocess.apply(x)
    n = len(block["uid"])
    partner = np.zeros((n, block["fingerprint"].shape[1]), dtype=np.float32)
    partner[paired] = np.asarray(x, dtype=np.float32)[pos]
    return {**block, "partner": partner, "paired": np.asarray(paired, dtype=bool) & block["valid"].astype(bool)}


def pair_distances(block: Block) -> tuple[np.ndarray, np.ndarray]:
    """``(uid, distance)`` of every paired tile of a block with partners (change maps): exact,
    float64."""
    rows = np.flatnonzero(block["paired"])
    diff = block["fingerprint"][rows].astype(np.float64) - block["partner"][rows]
    return block["uid"][rows], np.sqrt(np.einsum("ij,ij->i", diff, diff))
