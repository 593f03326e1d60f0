"""Exact k-nearest-neighbour search over a fingerprint store: per-chunk top-k + tree reduction.

Kernels (NumPy): :func:`chunk_topk` computes squared Euclidean distances of one chunk to every
query with precomputed norms (``|x|^2 - 2 x.q + |q|^2``, float32 BLAS), masks invalid and
excluded rows, and keeps an *unsorted* partial top-k (``argpartition``) per query, carrying
global uids and centres. :func:`merge_topk` is the same selection over concatenated partial
results, so it serves as the combine step of the tree; only :func:`finalize` sorts.

Graph: one ``chunk_topk`` task per Zarr chunk, combined ``split_every`` at a time until one
remains. It runs on whatever :class:`~pipeline.cluster.Runtime` is active (threads, a
LocalCluster, a remote scheduler). :class:`SearchIndex` holds the chunks (with their norms)
in memory, via ``client.persist`` on a cluster, for repeated queries.

Semantics: ties are broken by uid; k larger than the candidates returns them all; the query's
own tile and tiles overlapping it are excluded unless ``include_overlapping``; ``diverse``
applies spatial non-maximum suppression and widens the candidate pool until it has k results.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import grid

RESULT_DTYPE = np.dtype([("d2", "f8"), ("uid", "u8"), ("lon", "f8"), ("lat", "f8")])
EARTH_M_PER_DEG = 111_320.0


class SearchError(ValueError):
    """A query cannot be answered; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Kernels


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

    def __len__(self) -> int:
        return len(self.fingerprints)


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
    intersect (local equirectangular metres around ``b``).
    """
    same = (image_a == image_b) & (np.abs(row_a - row_b) < grid.TILE) & (np.abs(col_a - col_b) < grid.TILE)
    if not (np.isfinite(lon_b) and np.isfinite(lat_b) and np.isfinite(half_b)):
        return same
    dx = (lon_a - lon_b) * EARTH_M_PER_DEG * math.cos(math.radians(lat_b))
    dy = (lat_a - lat_b) * EARTH_M_PER_DEG
    reach = half_a + half_b
    with np.errstate(invalid="ignore"):
        ground = (image_a != image_b) & (np.abs(dx) < reach) & (np.abs(dy) < reach)
    return same | ground


def _select(d2: np.ndarray, uid: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest ``(d2, uid)`` pairs among finite ``d2``, unsorted."""
    finite = np.flatnonzero(np.isfinite(d2))
    if len(finite) <= k:
        return finite
    part = finite[np.argpartition(d2[finite], k - 1)[:k]]
    threshold = d2[part].max()
    cand = finite[d2[finite] <= threshold]  # ties at the boundary: decide by uid
    if len(cand) == k:
        return cand
    return cand[np.lexsort((uid[cand], d2[cand]))[:k]]


def chunk_topk(
    block: dict[str, np.ndarray],
    queries: Queries,
    k: int,
    filters: Filters,
    half_m: np.ndarray,
    usable: np.ndarray | None = None,
) -> list:
    """Partial top-k of one chunk for each query: a list of ``m`` RESULT_DTYPE arrays (unsorted).

    ``block``: ``fingerprint`` (n, dim) float32 or float16, ``sqnorm`` (n,) float32 (or absent:
    computed here), ``valid``, ``uid``, ``lon``, ``lat`` (image, row, col come from the uid).
    ``half_m``: half tile size in metres per image id (for ground-overlap exclusion);
    ``usable``: per image id, whether its ingest is done (tiles of other images are skipped).
    """
    x = as_float32(block["fingerprint"])
    sqnorm = block.get("sqnorm")
    if sqnorm is None:
        sqnorm = masked_sqnorm(x, block["valid"])
    if "image" in block:
        image, row, col = block["image"], block["row"], block["col"]
    else:
        image, row, col = grid.unpack_uid(block["uid"])  # cheaper than reading three more arrays
    lon, lat, uid = block["lon"], block["lat"], block["uid"]
    allowed = None
    if usable is not None and not usable.all():
        allowed = usable[image]
    if filters.bbox is not None:
        w, s, e, n = filters.bbox
        with np.errstate(invalid="ignore"):
            inside = (lon >= w) & (lon <= e) & (lat >= s) & (lat <= n)
        allowed = inside if allowed is None else allowed & inside
    if filters.image_ids is not None:
        in_images = np.isin(image, filters.image_ids)
        allowed = in_images if allowed is None else allowed & in_images
    q = queries.fingerprints
    # (n, m) squared distances by the norm expansion: one float32 matrix product, then in-place
    # updates. Invalid rows carry an infinite norm, so they never make the top-k.
    d2 = x @ q.T
    d2 *= -2.0
    d2 += sqnorm[:, None]
    d2 += np.einsum("ij,ij->i", q, q)[None, :]
    if allowed is not None:
        d2[~allowed] = np.inf
    if not filters.include_overlapping:
        half_rows = half_m[image] if len(image) else np.zeros(0)
        for j in np.flatnonzero((queries.image >= 0) | np.isfinite(queries.lon)):
            d2[
                overlaps(
                    image, row, col, lon, lat, half_rows,
                    queries.image[j], queries.row[j], queries.col[j], queries.lon[j], queries.lat[j], queries.half_m[j],
                ),
                j,
            ] = np.inf  # fmt: skip
    out = []
    for j, sel in enumerate(select_columns(d2, uid, k)):
        # Exact distances for the few kept rows: the expansion loses precision near zero.
        diff = x[sel] - q[j]
        res = np.empty(len(sel), dtype=RESULT_DTYPE)
        res["d2"] = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
        res["uid"], res["lon"], res["lat"] = uid[sel], lon[sel], lat[sel]
        out.append(res)
    return out


def select_columns(d2: np.ndarray, uid: np.ndarray, k: int) -> list[np.ndarray]:
    """:func:`_select` for every column of ``d2`` (n, m), vectorized over the columns.

    One ``argpartition`` along axis 0 serves all queries; a column falls back to the exact
    per-column selection only when it has ties at its k-th value or fewer than k finite rows.
    """
    n, m = d2.shape
    if n <= k:
        return [_select(d2[:, j], uid, k) for j in range(m)]
    part = np.argpartition(d2, k - 1, axis=0)[:k]
    kth = np.take_along_axis(d2, part, axis=0).max(axis=0)
    exact = ((d2 <= kth).sum(axis=0) == k) & np.isfinite(kth)
    return [part[:, j] if exact[j] else _select(d2[:, j], uid, k) for j in range(m)]


def merge_topk(parts: Sequence[list], k: int) -> list:
    """Combine step: the same unsorted top-k selection over several partial results."""
    merged = []
    for j in range(len(parts[0])):
        cat = np.concatenate([p[j] for p in parts])
        merged.append(cat[_select(cat["d2"], cat["uid"], k)])
    return merged


def finalize(part: list) -> list:
    """Sort each query's results by (distance, uid)."""
    return [r[np.lexsort((r["uid"], r["d2"]))] for r in part]


def tree_topk(
    blocks: Sequence[Any],
    queries: Queries,
    k: int,
    filters: Filters,
    half_m: np.ndarray,
    split_every: int = 8,
    usable: np.ndarray | None = None,
):
    """Dask graph (a ``Delayed``) of the per-chunk map and the tree reduction to the global top-k.

    ``blocks``: ``Delayed`` objects yielding the dicts :func:`chunk_topk` takes. The layer is
    written as a plain task dict: building it costs microseconds per chunk, not a tokenization
    of every argument, which matters when a persisted index answers queries at memory speed.
    """
    import uuid

    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    name = f"topk-{uuid.uuid4().hex}"
    dsk: dict[Any, Any] = {}
    level = []
    for i, b in enumerate(blocks):
        dsk[(name, 0, i)] = (chunk_topk, b.key, queries, k, filters, half_m, usable)
        level.append((name, 0, i))
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for s in range(0, len(level), split_every):
            dsk[(name, depth, s)] = (merge_topk, list(level[s : s + split_every]), k)
            nxt.append((name, depth, s))
        level = nxt
    final = (name, "final")
    dsk[final] = (finalize, level[0]) if level else (_empty_results, len(queries))
    return Delayed(final, HighLevelGraph.from_collections(name, dsk, dependencies=list(blocks)), layer=name)


def _empty_results(m: int) -> list:
    return [np.empty(0, RESULT_DTYPE) for _ in range(m)]


# --------------------------------------------------------------------------------------------
# Store access


BLOCK_VARS = ("fingerprint", "valid", "uid", "lon", "lat")


def as_float32(x: np.ndarray) -> np.ndarray:
    """float32 view or copy; float16 goes through torch's vectorized conversion (~2x NumPy's)."""
    if x.dtype == np.float32:
        return x
    if x.dtype == np.float16:
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
    return x.astype(np.float32)


def masked_sqnorm(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Squared norms of the rows of ``x`` (float32), +inf where ``valid`` is False."""
    x = as_float32(x)
    return np.where(valid, np.einsum("ij,ij->i", x, x), np.float32(np.inf))


def _make_block(*arrays: np.ndarray, with_norms: bool, transform: Any = None) -> dict[str, np.ndarray]:
    """A block for :func:`chunk_topk`; ``transform`` post-processes the raw fingerprints;
    ``with_norms`` precomputes what an index reuses per query."""
    block = dict(zip(BLOCK_VARS, arrays))
    if transform is not None and transform.method != "none":
        block["fingerprint"] = transform.apply(block["fingerprint"])
    if with_norms:
        block["sqnorm"] = masked_sqnorm(block["fingerprint"], block["valid"])
        block["image"], block["row"], block["col"] = grid.unpack_uid(block["uid"])
    return block


def store_blocks(ds, with_norms: bool = False, rows: int | None = None, transform: Any = None) -> list:
    """One delayed dict of arrays per block of ``rows`` tiles (default: per Zarr chunk), lazy.

    With a transform and a ``fingerprint_dba`` array in the store (``postprocess --dba``), the
    blocks hold the augmented fingerprints, which are already post-processed."""
    import dask

    arrays = [ds[name].data for name in BLOCK_VARS]
    if transform is not None and "fingerprint_dba" in ds:
        arrays[0] = ds["fingerprint_dba"].data
        transform = None
    arrays[0] = arrays[0].rechunk({1: -1})
    # Small per-tile arrays are stored in larger chunks (store.META_CHUNK_FACTOR): slice them
    # to the fingerprint chunks so that each is read once and shared by the tasks that need it.
    rows = rows or arrays[0].chunks[0]
    arrays = [a.rechunk({0: rows}) for a in arrays]
    per_var = [a.to_delayed().ravel() for a in arrays]
    make = dask.delayed(_make_block, pure=True)
    return [make(*parts, with_norms=with_norms, transform=transform) for parts in zip(*per_var)]


def _cores() -> int:
    from pipeline.cluster import cpu_count

    return cpu_count()


def half_tile_metres(ds) -> np.ndarray:
    """Half a window's ground size in metres for each image (NaN without a CRS)."""
    from pipeline.tiles import to_lonlat

    t = ds["transform"].values
    crss = ds["crs"].values  # read once: .values inside the loop would reread the array per image
    out = np.full(len(t), np.nan)
    for i, (a, _b, c, d, _e, f) in enumerate(t):
        crs = str(crss[i])
        if not crs:
            continue
        xs = np.array([c, c + a * grid.TILE])
        ys = np.array([f, f + d * grid.TILE])
        lon, lat = to_lonlat(xs, ys, crs)
        dx = (lon[1] - lon[0]) * EARTH_M_PER_DEG * math.cos(math.radians(lat[0]))
        dy = (lat[1] - lat[0]) * EARTH_M_PER_DEG
        out[i] = 0.5 * math.hypot(dx, dy)
    return out


@dataclass
class Result:
    """Search results for one query (sorted)."""

    query: dict[str, Any]
    uid: np.ndarray
    distance: np.ndarray
    image_path: list[str]
    row: np.ndarray
    col: np.ndarray
    lon: np.ndarray
    lat: np.ndarray

    def __len__(self) -> int:
        return len(self.uid)

    def records(self) -> list[dict[str, Any]]:
        def num(v: float) -> float | None:
            return None if not np.isfinite(v) else float(v)

        return [
            {
                "rank": i + 1,
                "uid": str(int(self.uid[i])),
                "distance": float(self.distance[i]),
                "image_path": self.image_path[i],
                "row": int(self.row[i]),
                "col": int(self.col[i]),
                "lon": num(self.lon[i]),
                "lat": num(self.lat[i]),
            }
            for i in range(len(self))
        ]

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "results": self.records()}

    def table(self) -> str:
        lines = [
            f"query: {self.query.get('label', '')}",
            f"{'rank':>4}  {'uid':>20}  {'distance':>10}  {'row':>6}  {'col':>6}  {'lon':>11}  {'lat':>10}  image",
        ]
        for r in self.records():
            lon = f"{r['lon']:.6f}" if r["lon"] is not None else "nan"
            lat = f"{r['lat']:.6f}" if r["lat"] is not None else "nan"
            lines.append(
                f"{r['rank']:>4}  {r['uid']:>20}  {r['distance']:>10.4f}  {r['row']:>6}  {r['col']:>6}  {lon:>11}  {lat:>10}  {r['image_path']}"
            )
        return "\n".join(lines)


@dataclass
class SearchIndex:
    """Exact search over one store. ``persist()`` holds the chunks (and norms) in memory.

    >>> index = SearchIndex.open("tiles.zarr")           # doctest: +SKIP
    >>> index.persist()                                   # doctest: +SKIP
    >>> [res] = index.search(index.queries_from_uids([uid]), k=10)  # doctest: +SKIP
    """

    ds: Any
    path: str = ""
    runtime: Any = None  # pipeline.cluster.Runtime; None = local threads
    split_every: int = 8
    _blocks: list | None = field(default=None, repr=False)
    _half_m: np.ndarray | None = field(default=None, repr=False)
    _paths: np.ndarray | None = field(default=None, repr=False)
    _table: dict | None = field(default=None, repr=False)
    _usable: np.ndarray | None = field(default=None, repr=False)
    use_post: bool = True  # apply the store's post-processing (False: raw fingerprints)
    _transform: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str, runtime: Any = None, split_every: int = 8) -> SearchIndex:
        from pipeline.store import open_store

        return cls(open_store(path), str(path), runtime, split_every)

    @property
    def provenance(self) -> dict[str, Any]:
        from pipeline.store import provenance

        return provenance(self.ds)

    @property
    def half_m(self) -> np.ndarray:
        if self._half_m is None:
            self._half_m = half_tile_metres(self.ds)
        return self._half_m

    @property
    def image_paths(self) -> np.ndarray:
        if self._paths is None:
            self._paths = self.ds["image_path"].values.astype(object)
        return self._paths

    @property
    def usable(self) -> np.ndarray | None:
        """Per image: searchable (its ingest is done). None when the store has no status table."""
        if self._usable is None and "status" in self.ds:
            self._usable = self.ds["status"].values.astype(object) == "done"
        return self._usable

    @property
    def image_table(self) -> dict[str, np.ndarray]:
        """Heights, widths and slot starts of the images, read once."""
        if self._table is None:
            self._table = {name: self.ds[name].values for name in ("height", "width", "tile_start")}
        return self._table

    def blocks(self) -> list:
        return self._blocks if self._blocks is not None else store_blocks(self.ds, transform=self._post())

    def _post(self):
        """What store_blocks applies: the store's post-processing, or None for --raw."""
        return self.transform if self.use_post else None

    @property
    def transform(self):
        """The store's fitted post-processing (``aerial-search postprocess``), or None."""
        if self._transform is None:
            from pipeline.post import Transform, load_transform

            self._transform = load_transform(self.ds) if self.use_post else Transform()
        return self._transform

    def persist(self, block_rows: int | None = None) -> SearchIndex:
        """Load every chunk once (with precomputed norms) and keep it in memory or cluster memory.

        ``block_rows``: rows per in-memory block. Default: the store's chunks on a cluster (spread
        over the workers); locally, one block per dask thread, at most 2**20 rows.
        """
        import uuid

        import dask

        client = getattr(self.runtime, "client", None)
        chunk = int(self.ds["fingerprint"].data.chunksize[0]) or 1
        n = self.ds.sizes["tile"]
        if block_rows is None:
            # Locally, one block per dask thread (BLAS threads inside each block do the rest):
            # measured at 1M x 512 on 2 cores, 2 blocks ran at 1.1x NumPy's single matrix-vector
            # product, 8 blocks at 1.6x. Capped so per-query temporaries stay bounded.
            threads = getattr(self.runtime, "dask_threads", 0) or _cores()
            block_rows = chunk if client is not None else min(max(chunk, -(-n // threads)), 1 << 20)
        block_rows = -(-block_rows // chunk) * chunk  # whole store chunks: reads stay aligned
        blocks = store_blocks(self.ds, with_norms=True, rows=block_rows, transform=self._post())
        if client is not None:
            self._blocks = client.persist(blocks)
        else:
            tag = uuid.uuid4().hex
            loaded = dask.compute(*blocks, scheduler="threads")
            self._blocks = [dask.delayed(b, name=f"index-{tag}-{i}", traverse=False) for i, b in enumerate(loaded)]
        return self

    def _compute(self, graph):
        if self.runtime is not None:
            return self.runtime.compute(graph)[0]
        return graph.compute(scheduler="threads")

    def search(
        self,
        queries: Queries,
        k: int,
        filters: Filters | None = None,
        diverse: bool = False,
        labels: Sequence[dict] | None = None,
        expand: tuple[int, float] | None = None,
    ) -> list[Result]:
        """The ``k`` nearest valid tiles to each query (exact Euclidean distance, after the
        store's post-processing). ``expand=(depth, alpha)``: alpha query expansion first."""
        if k <= 0:
            raise SearchError(f"k must be a positive number of results, got {k}")
        dim = self.ds.sizes["feature"]
        if queries.fingerprints.shape[1] != dim:
            raise SearchError(
                f"query fingerprints have {queries.fingerprints.shape[1]} dimensions but the store holds {dim}-d "
                f"fingerprints of {self.provenance.get('model', {}).get('arch')}; fingerprint queries with the store's model"
            )
        filters = filters or Filters()
        queries = self._transformed(queries)
        if expand is not None:
            queries = self._expand(queries, filters, *expand)
        pool = k * 9 if diverse else k  # a result suppresses at most its 8 same-image neighbours
        while True:
            raw = self._compute(
                tree_topk(self.blocks(), queries, pool, filters, self.half_m, self.split_every, self.usable)
            )
            if not diverse:
                break
            picked = [self._nms(r, k) for r in raw]
            saturated = any(len(p) < k and len(r) == pool for p, r in zip(picked, raw))
            if not saturated:
                raw = picked
                break
            pool *= 4
        labels = labels or [{} for _ in raw]
        return [self._result(r, lab) for r, lab in zip(raw, labels)]

    def _transformed(self, queries: Queries) -> Queries:
        t = self.transform
        if t.method == "none":
            return queries
        return dataclasses.replace(queries, fingerprints=t.apply(queries.fingerprints))

    def _expand(self, queries: Queries, filters: Filters, depth: int, alpha: float) -> Queries:
        """alpha-QE with the top ``depth`` results (their post-processed fingerprints)."""
        from pipeline.post import expand_queries

        first = self._compute(
            tree_topk(self.blocks(), queries, depth, filters, self.half_m, self.split_every, self.usable)
        )
        neighbours = []
        for res in first:
            slots = [self.slot_of(int(u)) for u in res["uid"]]
            raw = (
                self.ds["fingerprint"].data[np.array(slots, dtype=np.int64)].compute()
                if slots
                else np.zeros((0, self.ds.sizes["feature"]))
            )
            x = self.transform.apply(raw)
            pad = np.zeros((depth - len(x), queries.fingerprints.shape[1]), np.float32)  # fewer results than depth
            neighbours.append(np.concatenate([x, pad]) if len(pad) else x)
        return dataclasses.replace(
            queries, fingerprints=expand_queries(queries.fingerprints, np.stack(neighbours), alpha)
        )

    def _nms(self, res: np.ndarray, k: int) -> np.ndarray:
        image, row, col = grid.unpack_uid(res["uid"])
        half = self.half_m[image] if len(image) else np.zeros(0)
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

    def _result(self, res: np.ndarray, query: dict) -> Result:
        image, row, col = grid.unpack_uid(res["uid"])
        return Result(
            query=query,
            uid=res["uid"],
            distance=np.sqrt(np.maximum(res["d2"], 0.0)),
            image_path=[str(self.image_paths[i]) for i in image],
            row=row,
            col=col,
            lon=res["lon"],
            lat=res["lat"],
        )

    # ---- query resolution ----------------------------------------------------------------

    def slot_of(self, uid: int) -> int:
        """Slot of ``uid`` in this store, from grid math (no scan); SearchError if not a tile."""
        image_id, row, col = (int(v) for v in grid.unpack_uid(np.uint64(uid)))
        n_img = self.ds.sizes["img"]
        if not 0 <= image_id < n_img:
            raise SearchError(f"uid {uid} names image {image_id}, but the store has images 0..{n_img - 1}")
        table = self.image_table
        h, w = int(table["height"][image_id]), int(table["width"][image_id])
        chunk_px = int(self.provenance["layout"]["chunk_px"])
        slot = slot_in_image(row, col, h, w, chunk_px)
        if slot is None:
            raise SearchError(f"uid {uid} (row {row}, col {col}) is not a window of image {self.image_paths[image_id]}")
        slot += int(table["tile_start"][image_id])
        if int(self.ds["uid"][slot].values) != uid:
            raise SearchError(f"store layout does not match uid {uid}; the store may be damaged")
        return slot

    def queries_from_uids(self, uids: Sequence[int]) -> tuple[Queries, list[dict]]:
        slots = [self.slot_of(int(u)) for u in uids]
        sel = self.ds.isel(tile=np.array(slots, dtype=np.int64))[
            ["fingerprint", "valid", "image", "row", "col", "lon", "lat"]
        ].compute()
        for u, ok, img in zip(uids, sel["valid"].values, sel["image"].values):
            if self.usable is not None and not self.usable[int(img)]:
                status = self.ds["status"].values[int(img)]
                raise SearchError(
                    f"uid {u} belongs to {self.image_paths[int(img)]}, whose ingest is {status}, not done"
                )
            if not ok:
                raise SearchError(f"uid {u} is a dropped window (more than 50% nodata) and has no fingerprint")
        image = sel["image"].values.astype(np.int64)
        q = Queries(
            sel["fingerprint"].values.astype(np.float32),
            image,
            sel["row"].values.astype(np.int64),
            sel["col"].values.astype(np.int64),
            sel["lon"].values,
            sel["lat"].values,
            self.half_m[image],
        )
        labels = [
            {
                "type": "uid",
                "uid": str(int(u)),
                "label": f"uid {int(u)}",
                "image_path": str(self.image_paths[i]),
                "row": int(r),
                "col": int(c),
            }
            for u, i, r, c in zip(uids, image, q.row, q.col)
        ]
        return q, labels

    def nearest_uid(self, lon: float, lat: float) -> tuple[int, float]:
        """The valid tile whose centre is nearest ``(lon, lat)`` and the distance in metres."""
        import dask.array as da

        lons, lats, valid = self.ds["lon"].data, self.ds["lat"].data, self.ds["valid"].data
        dx = (lons - lon) * EARTH_M_PER_DEG * math.cos(math.radians(lat))
        dy = (lats - lat) * EARTH_M_PER_DEG
        ok = valid & da.isfinite(lons)
        if self.usable is not None and not self.usable.all():
            ok = ok & da.from_array(self.usable)[self.ds["image"].data.clip(0)]
        dist = da.where(ok, da.sqrt(dx * dx + dy * dy), np.inf)
        slot = int(self._compute(dist.argmin()))
        metres = float(self._compute(dist[slot]))
        if not np.isfinite(metres):
            raise SearchError(
                "the store has no tiles with lon/lat (its images have no CRS); query with --uid or --image"
            )
        return int(self.ds["uid"][slot].values), metres

    def image_ids_matching(self, pattern: str) -> tuple[int, ...]:
        ids = tuple(
            i
            for i, p in enumerate(self.image_paths)
            if fnmatch.fnmatch(str(p), pattern) or fnmatch.fnmatch(str(p).rsplit("/", 1)[-1], pattern)
        )
        if not ids:
            raise SearchError(f"--images {pattern!r} matches none of the store's {len(self.image_paths)} image paths")
        return ids


def slot_in_image(row: int, col: int, height: int, width: int, chunk_px: int) -> int | None:
    """Slot offset of window ``(row, col)`` within its image (chunks row-major, then windows)."""
    if row % grid.STRIDE or col % grid.STRIDE:
        return None
    i, j = row // grid.STRIDE, col // grid.STRIDE
    ny, nx = grid.windows_per_axis(height), grid.windows_per_axis(width)
    if not (0 <= i < ny and 0 <= j < nx):
        return None
    per = chunk_px // grid.STRIDE
    ci, cj = i // per, j // per
    rows_before = min(ci * per, ny)
    chunk_h = min(per, ny - ci * per)
    chunk_w = min(per, nx - cj * per)
    return rows_before * nx + chunk_h * (cj * per) + (i - ci * per) * chunk_w + (j - cj * per)
