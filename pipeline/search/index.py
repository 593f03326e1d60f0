"""The search driver: :class:`SearchIndex` opens a store, optionally holds it in memory, turns
uids and places into queries, and computes the graphs of :mod:`pipeline.search.graph` on a
:class:`~pipeline.cluster.Runtime` (threads, a LocalCluster, a remote scheduler).

Semantics: exact k nearest valid tiles of ``done`` images by Euclidean distance after the store's
post-processing; the query's own tile and tiles overlapping it are excluded unless
``include_overlapping``; ``diverse`` applies spatial non-maximum suppression and widens the
candidate pool until it has k results; ``expand`` runs alpha query expansion first.

Why over 500 lines: one class, the one object every command searches through, whose options
(codes with an exact re-rank, diffusion, example sets, thresholds) share its blocks, its
store facts read once and its runtime; the kernels, graphs and results it drives live apart.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
from dask.delayed import Delayed

from pipeline import codes, dates, geo, grid, post, resources, schema, store
from pipeline.cluster import local_get
from pipeline.dates import DateRange
from pipeline.errors import SearchError
from pipeline.search import device as device_mod
from pipeline.search import graph, kernels, scorers, topk
from pipeline.search.kernels import ExampleSet, Exclusions, Filters, Queries
from pipeline.search.results import Result
from pipeline.search.scorers import CentroidScorer, L2Scorer, NearestScorer, Scorer

HELD_VARS = frozenset({"fingerprint", "valid", "image", "row", "col", "lon", "lat", "uid"})  # a query tile's
DEVICE_BLOCK_ROWS = 1 << 23  # rows per device block on a GPU: one scan pass each, a few tasks per query


@dataclass
class SearchIndex:
    """Exact search over one store. ``persist()`` holds the chunks (and norms) in memory.

    >>> index = SearchIndex.open("tiles.zarr")           # doctest: +SKIP
    >>> index.persist()                                   # doctest: +SKIP
    >>> [res] = index.search(index.queries_from_uids([uid])[0], k=10)  # doctest: +SKIP
    """

    ds: Any
    path: str = ""
    runtime: Any = None  # pipeline.cluster.Runtime; None = local threads
    split_every: int = 8
    use_post: bool = True  # apply the store's post-processing (False: raw fingerprints)
    use_dba: bool = True  # use the store's fingerprint_dba (with use_post) while it is current
    codes: bool = False  # scan the store's binary codes, then re-rank candidates exactly
    rerank: int | None = None  # candidates per query with codes (default max(10 k, 100))
    last_scan: dict[str, Any] = field(default_factory=dict, repr=False)  # bytes the last codes search read
    device: str = ""  # search on this torch device (pipeline.search.device); "": the NumPy engine
    dtype: str = ""  # the search space's dtype in memory (float32 | float16); "": the store's
    _blocks: list | None = field(default=None, repr=False)
    _blocks_hold_codes: bool = False
    _block_rows: int = 0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str, runtime: Any = None, split_every: int = 8) -> SearchIndex:
        return cls(store.open_store(path), str(path), runtime, split_every)

    # ---- what the store says, read once -------------------------------------------------

    def _once(self, key: str, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def provenance(self) -> dict[str, Any]:
        return store.provenance(self.ds)

    @property
    def half_m(self) -> np.ndarray:
        """Half a window's ground size in metres per image (NaN without a CRS)."""
        return self._once("half_m", lambda: geo.half_tile_metres(self.ds["transform"].values, self.ds["crs"].values))

    @property
    def image_paths(self) -> np.ndarray:
        return self._once("paths", lambda: self.ds["image_path"].values.astype(object))

    @property
    def usable(self) -> np.ndarray | None:
        """Per image: searchable (its ingest is done). None when the store has no status table."""
        if "status" not in self.ds:
            return None
        return self._once("usable", lambda: self.statuses == "done")

    @property
    def statuses(self) -> np.ndarray:
        """Each image's status, read once (:meth:`persist` reads it before the blocks, so that what
        the index calls done is never newer than what its blocks hold)."""
        return self._once("status", lambda: self.ds["status"].values.astype(object))

    @property
    def image_table(self) -> dict[str, np.ndarray]:
        """Heights, widths and slot starts of the images."""
        return self._once("table", lambda: {n: self.ds[n].values for n in ("height", "width", "tile_start")})

    @property
    def postprocess(self) -> post.PostProcess:
        """The store's fitted post-processing (``aerial-search postprocess``), or ``none``."""
        if not self.use_post:
            return post.PostProcess()
        return self._once("postprocess", lambda: store.read_postprocess(self.ds))

    @property
    def uses_dba(self) -> bool:
        """Whether blocks hold the store's ``fingerprint_dba``: post-processing on and the array
        current. A stale one (images added since it was built) is ignored, with a warning."""
        if not (self.use_post and self.use_dba) or "fingerprint_dba" not in self.ds:
            return False
        stale = schema.stale_reason(self.ds, "fingerprint_dba")
        if stale:
            if not self._cache.get("warned_dba"):
                warnings.warn(f"{stale}; searching without it", stacklevel=3)
                self._cache["warned_dba"] = True
            return False
        return True

    def check_comparable(self, prov: dict[str, Any], what: str) -> None:
        """Refuse fingerprints made by another model or preprocessing than this store's."""
        diff = schema.signature_diff(self.provenance, prov)
        if diff:
            detail = "; ".join(f"{k}: {q!r} vs {s!r}" for k, (s, q) in diff.items())
            raise SearchError(
                f"{what} was fingerprinted differently from the store ({detail}); fingerprints of different "
                f"models or preprocessing are not comparable: query with tiles or images fingerprinted by the store's model"
            )

    def check_codes(self) -> dict[str, Any]:
        """The store's codes record, refused unless the codes are current for this index."""
        meta = self._current_derived("codes", "codes", "codes", "--codes binary (or --codes pq)", "--codes")
        if not self.use_post:
            raise SearchError("--codes encode the store's post-processed space; drop --raw (or --codes)")
        wanted = "fingerprint_dba" if self.uses_dba else "fingerprint"
        if meta.get("on") != wanted:
            raise SearchError(
                f"the codes encode {meta.get('on')} but search uses {wanted}; rebuild them with "
                f"`aerial-search postprocess --store {self.path} {codes.rebuild_args(meta)}`"
            )
        return meta

    # ---- blocks and computation -----------------------------------------------------------

    def blocks(self) -> list:
        if self._blocks is not None:
            return self._blocks
        dba = self.uses_dba
        return self._on_device(graph.store_blocks(self.ds, postprocess=None if dba else self.postprocess, use_dba=dba))

    def code_blocks(self, kind: str) -> list:
        """Blocks for the codes pass over the store's ``kind`` codes: the persisted ones (which
        hold codes too), otherwise lazy blocks that read only the codes and the per-tile metadata
        (also when the index was persisted before codes were asked for)."""
        if self._blocks is not None and self._blocks_hold_codes:
            return self._blocks
        return self._on_device(graph.store_blocks(self.ds, codes="only", code_kind=kind))

    def _on_device(self, blocks: list) -> list:
        """Lazy blocks of a search on :attr:`device` without :meth:`persist`: each store block
        goes up to the device in its task, is searched there and dropped (memory: a few blocks).
        Without a device, :attr:`dtype` still converts each block (what a persisted index holds)."""
        if not self.device:
            if self.dtype:
                return [dask.delayed(kernels.as_dtype, pure=True)(b, self.dtype) for b in blocks]
            return blocks
        if not self.device.startswith("cuda") or getattr(self.runtime, "client", None) is None:
            self.device = device_mod.resolve(self.device)  # refused here, not inside a task, without a GPU
        put = dask.delayed(device_mod.to_device, pure=True)
        return [put(b, self.device, self.dtype or None) for b in blocks]

    @property
    def on_device(self) -> bool:
        """Whether searches run :mod:`pipeline.search.device`'s kernels (persisted or lazy device blocks)."""
        return bool(self.device)

    @property
    def block_rows(self) -> int:
        """Rows per block of :meth:`blocks` (the last may be shorter)."""
        return self._block_rows or int(self.ds["fingerprint"].data.chunksize[0]) or 1

    @property
    def in_memory(self) -> bool:
        """Whether :meth:`persist` holds the blocks (in this process or on the cluster)."""
        return self._blocks is not None

    def persist(self, block_rows: int | None = None, device: str | None = None, dtype: str | None = None) -> SearchIndex:
        """Load every chunk once (with precomputed norms) and keep it in memory or cluster memory.

        ``block_rows``: rows per in-memory block. Default: one block per dask thread (on a
        cluster, per worker thread, the blocks spread over the workers), at most 2**20 rows; on
        this process's GPU, one block (filled from store chunks, :func:`device.assemble`); on a
        cluster's GPU workers, each worker's share, at most :data:`DEVICE_BLOCK_ROWS`. ``device`` (auto | cpu | cuda): hold the
        blocks as torch tensors there and search them with :mod:`pipeline.search.device`
        (``auto``: CUDA where torch sees a GPU; on a cluster each worker resolves it, so GPU
        workers keep their blocks on their own GPU). ``dtype`` (float32 | float16): the search
        space's dtype in memory (default the store's); float16 halves a float32 store, scores
        still accumulate in float32. Refuses, naming the numbers, when the index does not fit.
        """
        client = getattr(self.runtime, "client", None)
        chunk = int(self.ds["fingerprint"].data.chunksize[0]) or 1
        n = self.ds.sizes["tile"]
        if dtype is not None and dtype not in device_mod.DTYPES:
            raise SearchError(f"--index-dtype must be one of {', '.join(device_mod.DTYPES)}, got {dtype!r}")
        device, dtype = device or self.device or None, dtype or self.dtype or None
        local_device = device_mod.resolve(device) if device and client is None else device
        if block_rows is None:
            # One block per dask thread (BLAS threads inside each block do the rest): measured
            # at 1M x 512 on 2 cores, 2 blocks ran at 1.1x NumPy's single matrix-vector product,
            # 8 blocks at 1.6x. On a cluster, every worker thread's share, so that a query costs
            # a few tasks per thread rather than one per store chunk (benchmarks/sharded.py:
            # 122 chunk-sized blocks of 1M tiles cost ~3x the scan in scheduling). Capped so
            # per-query temporaries stay bounded. A GPU scans a block in one pass: large blocks.
            if client is not None:
                threads = len(client.nthreads()) if device else sum(client.nthreads().values()) or 1
            else:
                threads = getattr(self.runtime, "dask_threads", 0) or resources.cpu_count()
            cap = DEVICE_BLOCK_ROWS if client is not None and device else 1 << 20
            block_rows = min(max(chunk, -(-n // max(threads, 1))), cap)
            if (local_device or "").startswith("cuda"):
                block_rows = n  # a GPU scans one block in one pass; slices bound its temporaries

        block_rows = -(-block_rows // chunk) * chunk  # whole store chunks: reads stay aligned
        dba = self.uses_dba
        meta = self.check_codes() if self.codes else {}
        if "status" in self.ds and self.path:
            self.snapshot()  # what it loads from: the snapshot, then the statuses, then the blocks
            _ = self.usable  # (an ingest may commit meanwhile: the blocks are then at least as new)
        if local_device:
            device_mod.check_fits(n, self.device_bytes_per_tile(dtype, meta), local_device, f"store {self.path}")
        elif not dba and self.postprocess.method == "none" and (dtype or self.ds["fingerprint"].dtype) == np.float16:
            scorers.use_torch_conversion()  # every query converts the float16 blocks again: the faster way pays
        self._block_rows = block_rows
        self._blocks_hold_codes = bool(meta)
        self.device, self.dtype = (local_device or device or ""), (dtype or "")
        self._blocks = self._load_blocks(range(-(-n // block_rows)), device, local_device, dtype)
        return self

    def _load_blocks(self, which: Sequence[int], device: str | None, local_device: str | None,
                     dtype: str | None) -> list:  # fmt: skip
        """Blocks ``which`` (of :attr:`block_rows` rows each) of the store, loaded the way
        :meth:`persist` holds them: in this process, on its device, or persisted on the cluster."""
        import uuid

        client = getattr(self.runtime, "client", None)
        chunk = int(self.ds["fingerprint"].data.chunksize[0]) or 1
        n, block_rows = self.ds.sizes["tile"], self._block_rows
        dba = self.uses_dba
        kind = self.check_codes().get("kind", "binary") if self._blocks_hold_codes else "binary"
        with_codes = "also" if self._blocks_hold_codes else ""
        post = None if dba else self.postprocess
        which = list(which)
        blocks = graph.store_blocks(self.ds, with_norms=True, rows=block_rows, postprocess=post, use_dba=dba,
                                    codes=with_codes, code_kind=kind)  # fmt: skip
        blocks = [blocks[i] for i in which]
        if dtype and not device:
            blocks = [dask.delayed(kernels.as_dtype, pure=True)(b, dtype) for b in blocks]
        if client is not None:
            if device:
                blocks = [dask.delayed(device_mod.to_device, pure=False)(b, device, dtype) for b in blocks]
            return client.persist(blocks)
        tag = uuid.uuid4().hex
        if local_device:  # store chunks a wave at a time into each device block: host memory holds a few chunks
            parts = graph.store_blocks(self.ds, with_norms=True, rows=chunk, postprocess=post, use_dba=dba,
                                       codes=with_codes, code_kind=kind)  # fmt: skip
            threads = getattr(self.runtime, "dask_threads", 0) or resources.cpu_count()

            def waves(group: list) -> Any:
                for a in range(0, len(group), threads):
                    yield from dask.compute(*group[a : a + threads], scheduler=local_get())

            per = block_rows // chunk
            loaded = [device_mod.assemble(waves(parts[i * per : (i + 1) * per]), min(block_rows, n - i * block_rows),
                                          local_device, dtype) for i in which]  # fmt: skip
        else:
            loaded = dask.compute(*blocks, scheduler=local_get())
        return [dask.delayed(b, name=f"index-{tag}-{i}", traverse=False) for i, b in zip(which, loaded)]

    # ---- following a store that changes (serve) ---------------------------------------------

    def snapshot(self) -> str:
        """The identity of what this index was opened on (:func:`pipeline.store.snapshot_id`)."""
        if not self.path:  # an index made in memory (evaluate) has no store to follow
            return ""
        return self._cache.get("snapshot") or self._cache.setdefault("snapshot", store.snapshot_id(self.path))

    def follow(self) -> tuple[SearchIndex, str]:
        """This index over the store's current snapshot, and how it was brought there: ``same``
        (nothing changed: this index), ``grown`` (images were added, became done or left: a new
        index whose blocks are this one's where their slots did not change, the rest loaded; the
        statuses are re-read, so removals drop out at once) or ``reloaded`` (the store was
        compacted, migrated, post-processed or shrank: a new index persisted from scratch, within
        the same memory check). This index is left as it is, so searches in flight finish on it
        and a caller swaps in the new one whole: no search sees a half-updated index."""
        if not self.path:
            return self, "same"
        now = store.snapshot_id(self.path)
        if now == self.snapshot():
            return self, "same"
        ds = store.open_store(self.path)
        new = dataclasses.replace(self, ds=ds, _blocks=None, _blocks_hold_codes=False, _block_rows=0, _cache={})
        new._cache["snapshot"] = now
        status = new.statuses  # before any block is read: blocks are then at least as new as these
        if self._blocks is None:
            return new, "grown"
        old_attrs, attrs = store.provenance(self.ds), store.provenance(ds)
        same_layout = all(old_attrs.get(key) == attrs.get(key) for key in ("schema_version", "compacted", "migrated",
                                                                            "postprocess", "layout"))  # fmt: skip
        n_old, n = self.ds.sizes["tile"], ds.sizes["tile"]
        if not same_layout or n < n_old or ds.sizes["img"] < self.ds.sizes["img"]:
            return new.persist(device=self.device or None, dtype=self.dtype or None), "reloaded"
        br = self._block_rows
        old_status = self.statuses  # as they were when this index's blocks were loaded
        changed = np.zeros(n, dtype=bool)  # slots whose fingerprints may differ from what the blocks hold
        was_done = np.zeros(len(status), dtype=bool)
        was_done[: len(old_status)] = old_status == "done"
        starts, counts = ds["tile_start"].values, ds["tile_count"].values
        for i in np.flatnonzero((status == "done") & ~was_done):  # images done since the blocks loaded
            changed[int(starts[i]) : int(starts[i]) + int(counts[i])] = True
        changed[n_old:] = True
        n_blocks = -(-n // br)
        reload = [i for i in range(n_blocks) if (i + 1) * br > n_old or changed[i * br : (i + 1) * br].any()]
        if self.device and not getattr(self.runtime, "client", None):
            meta = self.check_codes() if self._blocks_hold_codes else {}
            device_mod.check_fits(n, self.device_bytes_per_tile(self.dtype or None, meta), self.device,
                                  f"store {self.path}")  # fmt: skip
        new._block_rows, new._blocks_hold_codes = br, self._blocks_hold_codes
        loaded = dict(zip(reload, new._load_blocks(reload, self.device or None, self.device or None, self.dtype or None)))
        new._blocks = [loaded[i] if i in loaded else self._blocks[i] for i in range(n_blocks)]
        return new, "grown"

    def device_bytes_per_tile(self, dtype: str | None = None, codes_meta: dict[str, Any] | None = None) -> int:
        """Bytes one tile of this index takes on a device (:func:`pipeline.search.device.bytes_per_tile`):
        the search space in ``dtype`` (default the store's), its norm, the codes when held, the metadata."""
        space = self.ds["fingerprint_dba"] if self.uses_dba else self.ds["fingerprint"]
        dt = dtype or str(space.dtype)
        meta = codes_meta or {}
        code_bytes = int(meta.get("bits", 0)) // 8
        return device_mod.bytes_per_tile(self._space_dims(), dt, code_bytes, meta.get("kind") == "pq")

    def _compute(self, *collections: Any) -> tuple[Any, ...]:
        # a persisted index runs one task per block: fewer blocks than threads get more BLAS threads each
        tasks = len(self._blocks) if self._blocks is not None else None
        if self.runtime is not None:
            return self.runtime.compute(*collections, tasks=tasks)
        with resources.blas_threads(resources.threads_per_task(resources.cpu_count(), tasks)):
            return dask.compute(*collections, scheduler=local_get())

    def topk(self, scorer: Scorer, k: int, filters: Filters, exclude: Exclusions) -> list[np.ndarray]:
        """The engine: sorted RESULT_DTYPE arrays, the ``k`` best tiles per scorer column."""
        if self.codes:
            return self._topk_codes(scorer, k, filters, exclude)
        return self._compute(
            graph.topk_graph(self.blocks(), scorer, k, filters, exclude, self.half_m, self.split_every, self.usable,
                             self.on_device)  # fmt: skip
        )[0]

    def _topk_codes(self, scorer: Scorer, k: int, filters: Filters, exclude: Exclusions) -> list[np.ndarray]:
        """Codes first, then exact: the ``R`` tiles per column nearest in Hamming distance
        (filters and exclusions applied there), then their exact scores from the float
        fingerprints (in memory when persisted, else only the store chunks holding candidates)
        and the best ``k``. Records what was read in :attr:`last_scan`."""
        if not isinstance(scorer, L2Scorer):
            raise SearchError(
                "--codes answers single queries and centroid example sets (distances to one point); "
                "search --score nearest and classifiers without --codes"
            )
        meta = self.check_codes()
        encoder = self._once(
            "codes_encoder", lambda: codes.encoder(meta.get("kind", "binary"), store.read_codes_encoder(self.ds))
        )
        r = self.rerank if self.rerank is not None else max(10 * k, 100)
        if r < k:
            raise SearchError(f"--rerank {r} is smaller than k = {k}: re-ranking needs at least k candidates")
        first = self._compute(
            graph.topk_graph(
                self.code_blocks(meta.get("kind", "binary")),
                scorers.code_scorer(encoder, scorer.queries),
                r,
                filters,
                exclude,
                self.half_m,
                self.split_every,
                self.usable,
                self.on_device,
            )  # fmt: skip
        )[0]
        slots = [self.slots_of(c["uid"]) for c in first]
        per = self.block_rows
        candidates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        allslots = np.unique(np.concatenate(slots)) if slots else np.zeros(0, np.int64)
        for b in np.unique(allslots // per):
            rows = allslots[allslots // per == b]
            member = np.stack([np.isin(rows, s) for s in slots], axis=1)
            candidates[int(b)] = (rows - b * per, member)
        blocks = self.blocks()
        out = self._compute(graph.rerank_graph(blocks, candidates, scorer, k, self.split_every, self.on_device))[0]
        n, dim = self.ds.sizes["tile"], self.ds.sizes["feature"]
        if self.in_memory:  # the candidates' rows of the index in memory
            rerank_bytes = len(allslots) * self._space_dims() * 4
        else:  # whole store chunks: every chunk holding a candidate is read and decoded
            arr = self.ds["fingerprint_dba" if self.uses_dba else "fingerprint"]
            rows_read = sum(min(per, n - b * per) for b in candidates)
            rerank_bytes = rows_read * arr.shape[1] * np.dtype(arr.dtype).itemsize
        code_bytes = n * int(meta["bits"]) // 8
        self.last_scan = {
            "codes": f"{meta['kind']} {meta['bits']} bits" + (f" (m = {meta['m']})" if meta.get("m") else ""),
            "candidates_per_query": r,
            "codes_bytes": code_bytes,
            "rerank_bytes": int(rerank_bytes),
            "rerank_from": "memory" if self.in_memory else f"{len(candidates)} store chunk(s)",
            "bytes_scanned": int(code_bytes + rerank_bytes),
            "float32_bytes": int(n * dim * 4),
        }
        return out

    def _space_dims(self) -> int:
        """Dimensions of the space search scores in (after a PCA, fewer than the store's)."""
        if self.uses_dba:
            return int(self.ds["fingerprint_dba"].shape[1])
        return self.postprocess.dims or self.ds.sizes["feature"]

    def slots_of(self, uids: np.ndarray) -> np.ndarray:
        """Slots (int64) of tile uids of this store, vectorized grid math (uids from results)."""
        image, row, col = grid.unpack_uid(np.asarray(uids, dtype=np.uint64))
        table = self.image_table
        chunk_px = int(self.provenance["layout"]["chunk_px"])
        off = grid.slots_in_images(row, col, table["height"][image], table["width"][image], chunk_px)
        return (table["tile_start"][image] + off).astype(np.int64)

    # ---- search ---------------------------------------------------------------------------

    def search(
        self,
        queries: Queries,
        k: int | None = 10,
        filters: Filters | None = None,
        diverse: bool = False,
        labels: Sequence[dict] | None = None,
        expand: tuple[int, float] | None = None,
        max_distance: float | None = None,
        limit: int = 10_000,
    ) -> list[Result]:
        """The ``k`` nearest valid tiles to each query (exact Euclidean distance, after the
        store's post-processing), or, with ``max_distance``, every tile at most that far (the
        best ``limit``, and how many in all). ``expand=(depth, alpha)``: alpha query expansion
        first."""
        self._check_dim(queries.fingerprints)
        filters = filters or Filters()
        queries = self._transformed(queries)
        exclude = queries.exclusions()
        if expand is not None:
            queries = self._expand(queries, filters, exclude, *expand)
        max_score = None if max_distance is None else float(max_distance) ** 2
        return self.run(L2Scorer(queries.fingerprints), exclude, k, max_score, limit, filters, diverse, labels)

    def search_diffusion(
        self,
        queries: Queries,
        k: int = 10,
        filters: Filters | None = None,
        labels: Sequence[dict] | None = None,
        alpha: float = 0.9,
        graph_k: int | None = None,
        seeds: int | None = None,
    ) -> list[Result]:
        """Diffusion ranking (:mod:`pipeline.diffusion`) on the stored k-NN graph (its first
        ``graph_k`` neighbours per tile, default all stored): ``f = (I - alpha S)^-1 y`` over the
        whole graph (a tile of the archive diffuses from its own node; an outside query joins
        its ``graph_k`` nearest tiles), then the ``k`` best by ``f`` with filters, statuses and
        exclusions applied as in :meth:`search` (tiles not reached follow in distance order).
        ``seeds`` R: the truncated mode instead, each query's exact top-R tiles re-ranked among
        themselves. Results report ``score`` (higher is better) and the exact ``distance``."""
        from pipeline import diffusion

        meta = self.check_knn()
        graph_k = graph_k or int(meta["k"])
        if graph_k > int(meta["k"]):
            raise SearchError(
                f"--diffusion-k {graph_k} exceeds the {meta['k']} neighbours stored per tile; rebuild with "
                f"`aerial-search postprocess --store {self.path} --knn {graph_k}` or use a smaller --diffusion-k"
            )
        if not seeds:
            return self._whole_graph_diffusion(queries, k, filters or Filters(), labels, alpha, graph_k)
        if k <= 0 or seeds < k:
            raise SearchError(f"diffusion needs 0 < k <= its seeds ({seeds}), got k = {k}")
        knn_uid, knn_sim = self._once("knn", lambda: (self.ds["knn_uid"].values, self.ds["knn_sim"].values))
        first = self.search(queries, seeds, filters, labels=labels)
        q = self._transformed(queries).fingerprints
        out = []
        for j, res in enumerate(first):
            slots = self.slots_of(res.uid)
            a = diffusion.subgraph(np.asarray(res.uid, np.uint64), knn_uid[slots], knn_sim[slots], graph_k)
            near = self.postprocess.apply(self.fingerprints_at(slots[:graph_k]))  # y is 0 beyond them
            y = np.zeros(len(slots))
            y[: len(near)] = diffusion.initial(q[j], near, graph_k)
            f = diffusion.diffuse(a, y, alpha)
            order = np.lexsort((res.uid, -f))[:k]
            raw = np.empty(len(order), dtype=topk.RESULT_DTYPE)
            raw["score"], raw["uid"], raw["lon"], raw["lat"] = f[order], res.uid[order], res.lon[order], res.lat[order]
            r = Result.from_topk(raw, {**res.query, "diffusion": {"alpha": alpha, "k": graph_k, "seeds": len(slots)}},
                                 f[order], self.image_paths, "score", None, self.geometry, True)  # fmt: skip
            r.extra = {"distance": np.asarray(res.value)[order]}
            out.append(r)
        return out

    def _whole_graph_diffusion(self, queries: Queries, k: int, filters: Filters, labels: Sequence[dict] | None,
                               alpha: float, graph_k: int) -> list[Result]:  # fmt: skip
        from pipeline import diffusion
        from pipeline.search.scorers import RankedScorer

        if k <= 0:
            raise SearchError(f"k must be a positive number of results, got {k}")
        self._check_dim(queries.fingerprints)
        x = self._once("diffusion_space", lambda: self.postprocess.apply(np.asarray(self.ds["fingerprint"].values,
                                                                                    dtype=np.float32)))  # fmt: skip
        s = self._once(f"diffusion_graph_{graph_k}", lambda: diffusion.normalized(self._knn_graph(graph_k)))
        ds = self.ds
        block = self._once("diffusion_block", lambda: {
            "uid": ds["uid"].values, "lon": ds["lon"].values, "lat": ds["lat"].values,
            "valid": ds["valid"].values.astype(bool), "slot": np.arange(ds.sizes["tile"])})  # fmt: skip
        q = self._transformed(queries).fingerprints.astype(np.float32)
        n, m = len(x), len(q)
        xx = self._once("diffusion_sqnorm", lambda: np.einsum("ij,ij->i", x, x))
        d2 = xx[:, None] - 2 * (x @ q.T) + np.einsum("ij,ij->i", q, q)[None, :]  # float32 BLAS, (n, m)
        d = np.sqrt(np.maximum(d2, 0.0)).astype(np.float64)  # ranks unreached tiles and picks an outside query's k
        d[~block["valid"]] = np.inf
        y = np.zeros((n, m))
        for j in range(m):
            slot = self._own_slot(queries, j, block["valid"])
            if slot is not None:  # a tile of the archive: its own node
                y[slot, j] = 1.0
            else:  # an outside query joins its graph_k nearest tiles
                near = np.argsort(d[:, j], kind="stable")[:graph_k]
                near = near[np.isfinite(d[near, j])]
                y[near, j] = diffusion.affinity(diffusion.cosines(q[j], x[near]))
        f = diffusion.solve(s, y, alpha)
        keys = diffusion.rank_key(f, np.where(np.isfinite(d), d, 0.0))
        exclude = queries.exclusions()
        raw = topk.finalize(kernels.chunk_topk(block, RankedScorer(keys), k, filters, exclude, self.half_m, self.usable))
        labels = labels or [{} for _ in raw]
        out = []
        for j, (r, lab) in enumerate(zip(raw, labels)):
            slots = self.slots_of(r["uid"])
            res = Result.from_topk(r, {**lab, "diffusion": {"alpha": alpha, "k": graph_k, "graph": "whole"}},
                                   np.maximum(-r["score"], 0.0), self.image_paths, "score", None, self.geometry, True)  # fmt: skip
            diff = x[slots].astype(np.float64) - q[j].astype(np.float64)  # the reported distances exactly
            res.extra = {"distance": np.sqrt(np.einsum("ij,ij->i", diff, diff))}
            out.append(res)
        return out

    def _own_slot(self, queries: Queries, j: int, valid: np.ndarray) -> int | None:
        """The slot of query ``j`` when it is a valid tile of this store (``valid`` per slot), else None."""
        if queries.image[j] < 0:
            return None
        uid = grid.pack_uid(np.array([queries.image[j]]), np.array([queries.row[j]]), np.array([queries.col[j]]))[0]
        try:
            slot = self.slot_of(int(uid))
        except SearchError:
            return None
        return slot if bool(valid[slot]) else None

    def _knn_graph(self, graph_k: int) -> Any:
        """The mutual ``graph_k``-NN affinities over every slot, from the stored k-NN arrays."""
        from pipeline import diffusion

        knn_uid, knn_sim = self._once("knn", lambda: (self.ds["knn_uid"].values, self.ds["knn_sim"].values))
        ok = np.isfinite(knn_sim[:, :graph_k]) & self.ds["valid"].values.astype(bool)[:, None]
        nb = np.full(ok.shape, -1, dtype=np.int64)
        nb[ok] = self.slots_of(knn_uid[:, :graph_k][ok])
        return diffusion.mutual_graph(nb, np.where(ok, knn_sim[:, :graph_k], np.nan), graph_k)

    def check_knn(self) -> dict[str, Any]:
        """The store's k-NN graph record, refused unless the graph is current."""
        return self._current_derived("knn", "knn_uid", "k-NN graph", "--knn 30", "--diffusion")

    def _current_derived(self, key: str, array: str, what: str, build: str, flag: str) -> dict[str, Any]:
        """``postprocess.<key>`` of a derived array a search option needs, refused (naming the
        command that builds it) when the store lacks it or it is stale."""
        meta = (self.provenance.get("postprocess") or {}).get(key)
        if array not in self.ds or not meta:
            raise SearchError(
                f"store {self.path} has no {what}; build it with `aerial-search postprocess --store {self.path} "
                f"{build}`, or search without {flag}"
            )
        stale = schema.stale_reason(self.ds, array)
        if stale:
            raise SearchError(f"{stale}; or search without {flag}")
        return meta

    def search_examples(
        self,
        sets: Sequence[ExampleSet],
        k: int | None = 10,
        filters: Filters | None = None,
        diverse: bool = False,
        labels: Sequence[dict] | None = None,
        max_score: float | None = None,
        limit: int = 10_000,
    ) -> list[Result]:
        """Each example set as one query (:class:`~pipeline.search.kernels.ExampleSet`): tiles
        ranked by its score (lower is better), the examples and tiles overlapping them excluded."""
        scorer, exclude = self.example_scorer(sets)
        return self.run(scorer, exclude, k, max_score, limit, filters or Filters(), diverse, labels)

    def example_scorer(self, sets: Sequence[ExampleSet]) -> tuple[Scorer, Exclusions]:
        """The scorer of example sets in this store's post-processed space, and their exclusions."""
        if not sets:
            raise SearchError("no example set given")
        pos, neg, weights = [], [], []
        for es in sets:
            if not len(es.positives):
                raise SearchError("an example set needs at least one positive example")
            self._check_dim(es.positives.fingerprints)
            p = self.postprocess.apply(es.positives.fingerprints)
            n = self.postprocess.apply(es.negatives.fingerprints) if len(es.negatives) else p[:0]
            pos.append(p)
            neg.append(n)
            weights.append(es.weight)
        if all(es.score == "centroid" for es in sets):
            q = np.stack([kernels.centroid_query(p, n, w) for p, n, w in zip(pos, neg, weights)])
            scorer: Scorer = CentroidScorer(q.astype(np.float32))
        elif all(es.score == "nearest" for es in sets):
            scorer = NearestScorer(tuple(pos), tuple(neg), tuple(weights))
        else:
            raise SearchError("example sets of one search share one --score (centroid or nearest)")
        return scorer, kernels.exclusions_of_sets(sets)

    def run(
        self,
        scorer: Scorer,
        exclude: Exclusions,
        k: int | None = 10,
        max_score: float | None = None,
        limit: int = 10_000,
        filters: Filters | None = None,
        diverse: bool = False,
        labels: Sequence[dict] | None = None,
    ) -> list[Result]:
        """Any scorer through the engine: the ``k`` best tiles per column (``diverse``: spatial
        non-maximum suppression), or every tile scoring at most ``max_score`` (the best
        ``limit``; each result's ``total`` says how many passed)."""
        if (k is None) == (max_score is None):
            raise SearchError("choose one: -k for the k best tiles, or a threshold (--max-distance / --min-score)")
        filters = filters or Filters()
        totals: Sequence[int | None]
        if max_score is not None and self.codes:
            raise SearchError(
                "threshold mode (--max-distance / --min-score) needs exact scores of every tile: search with -k "
                "when using --codes, or drop --codes"
            )
        if max_score is not None:
            if limit <= 0:
                raise SearchError(f"--limit must be a positive number of results, got {limit}")
            raw, counts = self._compute(
                graph.threshold_graph(
                    self.blocks(),
                    scorer,
                    max_score,
                    limit,
                    filters,
                    exclude,
                    self.half_m,
                    self.split_every,
                    self.usable,
                    self.on_device,
                )  # fmt: skip
            )[0]
            totals = [int(c) for c in counts]
        else:
            if k <= 0:
                raise SearchError(f"k must be a positive number of results, got {k}")
            raw = self._topk_diverse(scorer, exclude, k, filters) if diverse else self.topk(scorer, k, filters, exclude)
            totals = [None] * len(raw)
        labels = labels or [{} for _ in raw]
        if self.codes:
            labels = [{**lab, "scan": dict(self.last_scan)} for lab in labels]
        if self.device or self.dtype:
            labels = [{**lab, **self.index_description()} for lab in labels]
        table = self.geometry
        return [
            Result.from_topk(
                r, lab, scorer.report(r["score"]), self.image_paths, scorer.name, total, table, scorer.higher_is_better
            )  # fmt: skip
            for r, lab, total in zip(raw, labels, totals)
        ]

    def index_description(self) -> dict[str, str]:
        """What JSON results say of the index searched: ``index_device`` (the torch device, or
        ``numpy``) and ``index_dtype`` (the search space's dtype in memory)."""
        space = self.ds["fingerprint_dba"] if self.uses_dba else self.ds["fingerprint"]
        dtype = self.dtype or ("float32" if self.postprocess.method != "none" and not self.uses_dba else str(space.dtype))
        return {"index_device": self.device or "numpy", "index_dtype": dtype}

    def _topk_diverse(self, scorer: Scorer, exclude: Exclusions, k: int, filters: Filters) -> list[np.ndarray]:
        pool = k * 9  # a result suppresses at most its 8 same-image neighbours
        while True:
            raw = self.topk(scorer, pool, filters, exclude)
            picked = [kernels.nms(r, k, self.half_m) for r in raw]
            if not any(len(p) < k and len(r) == pool for p, r in zip(picked, raw)):
                return picked
            pool *= 4

    def _check_dim(self, fingerprints: np.ndarray) -> None:
        dim = self.ds.sizes["feature"]
        if fingerprints.shape[1] != dim:
            raise SearchError(
                f"query fingerprints have {fingerprints.shape[1]} dimensions but the store holds {dim}-d "
                f"fingerprints of {self.provenance.get('model', {}).get('arch')}; fingerprint queries with the store's model"
            )

    @property
    def geometry(self) -> dict[str, np.ndarray]:
        """Each image's affine transform, CRS (for footprints in exports) and acquisition time."""
        return self._once("geometry", lambda: {"transform": self.ds["transform"].values,
                                                "crs": self.ds["crs"].values.astype(object),
                                                "acquired": self.acquired})  # fmt: skip

    @property
    def acquired(self) -> np.ndarray:
        """Each image's acquisition time (``datetime64[s]``, NaT when unknown)."""
        def read() -> np.ndarray:
            if "acquired" in self.ds:
                return self.ds["acquired"].values.astype("datetime64[s]")
            return np.full(self.ds.sizes.get("img", len(self.image_paths)), np.datetime64("NaT", "s"))  # an in-memory index

        return self._once("acquired", read)

    def image_ids_acquired(self, rng: DateRange, within: Sequence[int] | None = None,
                           flag: str = "--date") -> tuple[tuple[int, ...], dict]:  # fmt: skip
        """Ids of the searchable images acquired within ``rng`` (of ``within``, when given), and
        how the range split them (:func:`pipeline.dates.left_out`: ``kept``, ``outside``,
        ``undated``), which outputs report beside the range. No image left: a SearchError that
        says what the store's dates are."""
        usable = self.usable if self.usable is not None else np.ones(len(self.acquired), bool)
        if within is not None:
            usable = usable & np.isin(np.arange(len(usable)), np.asarray(within, dtype=np.int64))
        counts = dates.left_out(self.acquired, usable, rng)
        ids = tuple(int(i) for i in np.flatnonzero(usable & rng.mask(self.acquired)))
        if not ids:
            a = self.acquired[usable]
            dated = a[~np.isnat(a)]
            have = (f"the searchable images were acquired from {dates.iso(dated.min())} to {dates.iso(dated.max())}"
                    if len(dated) else "no searchable image has an acquisition time: date them with `aerial-search "
                    "ingest SOURCE --store STORE --dates FILE` or `--date-pattern REGEX`, no re-ingest needed")  # fmt: skip
            raise SearchError(f"{flag} {rng.text}: no image acquired in that range ({have}; {counts['undated']} "
                              f"without a date fail every date filter)")  # fmt: skip
        return ids, {**rng.describe(), **counts}

    def scoring_signature(self) -> dict[str, Any]:
        """What must match for a saved classifier to score this index: the fingerprints' model
        and preprocessing, and the post-processing (and DBA) the index applies."""
        post = self.provenance.get("postprocess") or {} if self.use_post else {}
        return {
            **schema.fingerprint_signature(self.provenance),
            "postprocess": {k: post.get(k) for k in ("method", "dims", "fitted_on_tiles", "created")} if post else None,
            "dba": (post.get("dba") or {}).get("depth") if self.uses_dba else None,
        }

    def _transformed(self, queries: Queries) -> Queries:
        t = self.postprocess
        if t.method == "none":
            return queries
        return dataclasses.replace(queries, fingerprints=t.apply(queries.fingerprints))

    def _expand(self, queries: Queries, filters: Filters, exclude: Exclusions, depth: int, alpha: float) -> Queries:
        """alpha-QE with the top ``depth`` results (their post-processed fingerprints)."""
        first = self.topk(L2Scorer(queries.fingerprints), depth, filters, exclude)
        neighbours = []
        for res in first:
            slots = np.array([self.slot_of(int(u)) for u in res["uid"]], dtype=np.int64)
            x = self.postprocess.apply(self.fingerprints_at(slots))
            pad = np.zeros((depth - len(x), queries.fingerprints.shape[1]), np.float32)  # fewer results than depth
            neighbours.append(np.concatenate([x, pad]) if len(pad) else x)
        return dataclasses.replace(
            queries, fingerprints=post.expand_queries(queries.fingerprints, np.stack(neighbours), alpha)
        )

    # ---- queries from uids and places -----------------------------------------------------

    def fingerprints_at(self, slots: np.ndarray) -> np.ndarray:
        """Raw float32 fingerprints ``(len(slots), dim)`` of the given slots."""
        slots = np.asarray(slots, dtype=np.int64)
        if not len(slots):
            return np.zeros((0, self.ds.sizes["feature"]), np.float32)
        return np.asarray(self.ds["fingerprint"].data[slots].compute(), dtype=np.float32)

    def slot_of(self, uid: int) -> int:
        """Slot of ``uid`` in this store, from grid math (no scan); SearchError if not a tile."""
        if not 0 <= int(uid) < 1 << 64:
            raise SearchError(f"uid {uid} is not a tile uid (uids are 64-bit unsigned integers)")
        image_id, row, col = (int(v) for v in grid.unpack_uid(np.uint64(uid)))
        n_img = self.ds.sizes["img"]
        if not 0 <= image_id < n_img:
            raise SearchError(f"uid {uid} names image {image_id}, but the store has images 0..{n_img - 1}")
        if self.usable is not None and not self.usable[image_id]:
            status = self.ds["status"].values[image_id]
            raise SearchError(
                f"uid {uid} belongs to {self.image_paths[image_id]}, whose status is {status}, not done: "
                f"its tiles are not searchable{' (rerun the ingest to finish it)' if status == 'pending' else ''}"
            )
        table = self.image_table
        h, w = int(table["height"][image_id]), int(table["width"][image_id])
        chunk_px = int(self.provenance["layout"]["chunk_px"])
        slot = grid.slot_in_image(row, col, h, w, chunk_px)
        if slot is None:
            raise SearchError(f"uid {uid} (row {row}, col {col}) is not a window of image {self.image_paths[image_id]}")
        slot += int(table["tile_start"][image_id])
        held = self._held_row(slot)
        if int(held[0]["uid"][held[1]] if held else self.ds["uid"][slot].values) != uid:
            raise SearchError(f"store layout does not match uid {uid}; the store may be damaged")
        return slot

    def _held_row(self, slot: int) -> tuple[dict, int] | None:
        """The block dict holding ``slot`` and the row in it, when this index holds its blocks in
        this process's memory with the store's raw fingerprints (no post-processing, DBA or other
        dtype), so a query tile is read from memory instead of decompressing its store chunks:
        on 1M tiles 27 ms of a served query's 114 went there. None otherwise."""
        if (self._blocks is None or self.device or getattr(self.runtime, "client", None) is not None
                or self.uses_dba or self.postprocess.method != "none"
                or (self.dtype and self.dtype != str(self.ds["fingerprint"].dtype))):  # fmt: skip
            return None
        b, row = divmod(int(slot), self._block_rows)
        if not 0 <= b < len(self._blocks):
            return None
        block = self._blocks[b]
        block = dask.compute(block, scheduler=local_get("sync"))[0] if isinstance(block, Delayed) else block
        if not isinstance(block, dict) or not HELD_VARS <= set(block) or row >= len(block["uid"]):
            return None
        return block, row

    def queries_from_uids(self, uids: Sequence[int]) -> tuple[Queries, list[dict]]:
        """Queries (fingerprints and exclusion info) and labels of tiles of this store."""
        slots = [self.slot_of(int(u)) for u in uids]
        held = [self._held_row(slot) for slot in slots]
        if slots and all(held):
            sel = {name: np.stack([blk[name][r] for blk, r in held]) for name in HELD_VARS}
        else:
            data = self.ds.isel(tile=np.array(slots, dtype=np.int64))[list(HELD_VARS - {"uid"})].compute()
            sel = {name: data[name].values for name in HELD_VARS - {"uid"}}
        for u, ok in zip(uids, sel["valid"]):
            if not ok:
                raise SearchError(f"uid {u} is a dropped window (more than 50% nodata) and has no fingerprint")
        image = sel["image"].astype(np.int64)
        q = Queries(
            sel["fingerprint"].astype(np.float32).reshape(len(slots), -1),
            image,
            sel["row"].astype(np.int64),
            sel["col"].astype(np.int64),
            sel["lon"].astype(np.float64),
            sel["lat"].astype(np.float64),
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

    def queries_from_lonlats(self, points: Sequence[tuple[float, float]]) -> tuple[Queries, list[dict]]:
        """Queries of the tiles covering places ``(lon, lat)`` (:meth:`uid_at`), labelled with
        the place, the uid it resolved to and the metres from the point to that tile's centre."""
        parts, labels = [], []
        for lon, lat in points:
            uid, metres = self.uid_at(lon, lat)
            q, lab = self.queries_from_uids([uid])
            lab[0].update(
                type="lonlat", lonlat=[lon, lat], metres_to_centre=round(metres, 2), label=f"{lon},{lat} -> uid {uid}"
            )
            parts.append(q)
            labels += lab
        if not parts:
            return Queries.from_fingerprints(np.zeros((0, self.ds.sizes["feature"]), np.float32)), []
        return Queries.concat(parts), labels

    def nearest_uid(self, lon: float, lat: float) -> tuple[int, float]:
        """The valid tile whose centre is nearest ``(lon, lat)`` and the distance in metres."""
        slot, metres = self._compute(*graph.nearest_centre_graph(self.ds, lon, lat, self.usable))
        if not np.isfinite(metres):
            raise SearchError(
                "the store has no tiles with lon/lat (its images have no CRS); query with --uid or --image"
            )
        return int(self.ds["uid"][int(slot)].values), float(metres)

    def uid_at(self, lon: float, lat: float) -> tuple[int, float]:
        """:meth:`nearest_uid`, refused when the point lies outside that tile's footprint."""
        uid, metres = self.nearest_uid(lon, lat)
        image_id = int(grid.unpack_uid(np.uint64(uid))[0])
        reach = self.half_m[image_id] * math.sqrt(2)
        if not metres <= reach:
            raise SearchError(
                f"no tile covers lon {lon}, lat {lat}: the nearest tile centre is {metres:.0f} m away "
                f"(a tile reaches {reach:.0f} m from its centre); `aerial-search info` prints the store's lon/lat box"
            )
        return uid, metres

    def image_ids_matching(self, pattern: str) -> tuple[int, ...]:
        """Ids of the images whose path (or file name) matches the glob ``pattern``."""
        ids = tuple(
            i
            for i, p in enumerate(self.image_paths)
            if fnmatch.fnmatch(str(p), pattern) or fnmatch.fnmatch(str(p).rsplit("/", 1)[-1], pattern)
        )
        if not ids:
            raise SearchError(f"--images {pattern!r} matches none of the store's {len(self.image_paths)} image paths")
        return ids
