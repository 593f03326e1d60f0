"""Ingest graphs: dask graphs that read, fingerprint and write one run of images. Nothing here
computes.

Per image: :func:`lazy_overlapped` (windowed reads of grid chunks with their halo) ->
:func:`chunk_task` per chunk (nodata filter, windows, model: :func:`pipeline.tiles.fingerprint_chunk`)
and :func:`pipeline.tiles.chunk_ids` / :func:`~pipeline.tiles.chunk_coords` (grid math) ->
concatenated over the run on the ``tile`` dimension -> rechunked so that chunk edges fall on
the store's Zarr chunk edges -> ``dask.array.store`` into the store's arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from pipeline import faults, grid, raster, store, tiles
from pipeline.embed import ModelSpec
from pipeline.ingest.plan import ImagePlan


def lazy_overlapped(reader: raster.RasterReader, height: int, width: int, chunk_px: int) -> da.Array:
    """Dask array of one image's grid chunks with their halo: uint8 ``(4, sum(h_i), sum(w_j))``.

    Block ``(0, i, j)`` is ``reader.read(ys[i], xs[j])`` with
    ``ys, xs = grid.chunk_spans(height, chunk_px), grid.chunk_spans(width, chunk_px)``. Like the
    output of ``dask.array.overlap.overlap``, blocks overlap by 128 px, so the array's shape is
    the sum of the block shapes, not the image's. An image with no windows gives no blocks.
    """
    ys = grid.chunk_spans(height, chunk_px)
    xs = grid.chunk_spans(width, chunk_px)
    name = "read-" + tokenize(reader, height, width, chunk_px)
    dsk = {
        (name, 0, i, j): (reader.read, (y.start, y.stop), (x.start, x.stop))
        for i, y in enumerate(ys)
        for j, x in enumerate(xs)
    }
    chunks = ((4,), tuple(y.stop - y.start for y in ys), tuple(x.stop - x.start for x in xs))
    return da.Array(dsk, name, chunks, dtype=np.uint8)


def chunk_task(block: np.ndarray, spec: ModelSpec, black_level: int, max_nodata_fraction: float) -> np.ndarray:
    """The fingerprint task of one chunk: the fault-injection point, then the kernel."""
    faults.maybe_kill_worker()
    return tiles.fingerprint_chunk(block, spec, black_level, max_nodata_fraction)


def chunk_layers(plans: Sequence[ImagePlan], cfg: Any, spec: ModelSpec) -> tuple[da.Array, da.Array, da.Array]:
    """Three dask arrays over the plans' slots: fingerprints+kept flag, integer ids, coordinates."""
    token = tokenize(plans, cfg.tiling, spec)
    emb, ids, crd = f"fingerprint-{token}", f"tile-ids-{token}", f"tile-coords-{token}"
    e_dsk: dict[tuple, Any] = {}
    i_dsk: dict[tuple, Any] = {}
    c_dsk: dict[tuple, Any] = {}
    sizes: list[int] = []
    pixel_arrays = []
    t = cfg.tiling
    for plan in plans:
        if not plan.tile_count:
            continue
        reader = raster.RasterReader(plan.info.path, t.bands, t.scale, plan.info.masked)
        pixels = lazy_overlapped(reader, plan.info.height, plan.info.width, cfg.read.chunk_px)
        pixel_arrays.append(pixels)
        for i, sy in enumerate(plan.spans_y):
            for j, sx in enumerate(plan.spans_x):
                k = len(sizes)
                e_dsk[(emb, k, 0)] = (chunk_task, (pixels.name, 0, i, j), spec, t.black_level, t.max_nodata_fraction)
                i_dsk[(ids, k, 0)] = (tiles.chunk_ids, plan.image_id, sy, sx)
                c_dsk[(crd, k, 0)] = (tiles.chunk_coords, sy, sx, plan.info.transform, plan.info.crs)
                sizes.append(sy.count * sx.count)
    n = tuple(sizes)
    e = da.Array(
        HighLevelGraph.from_collections(emb, e_dsk, dependencies=pixel_arrays), emb, (n, (spec.dim + 1,)), np.float32
    )
    i = da.Array(i_dsk, ids, (n, (4,)), np.int64)
    c = da.Array(c_dsk, crd, (n, (4,)), np.float64)
    return e, i, c


def aligned_chunks(start: int, stop: int, size: int) -> tuple[int, ...]:
    """Chunk lengths for slots ``[start, stop)`` whose edges fall on global multiples of ``size``,
    so that every Zarr chunk the range touches is written by exactly one task."""
    edges = [start, *range((start // size + 1) * size, stop, size), stop]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]) if b > a)


def write_graph(path: Path | str, plans: Sequence[ImagePlan], cfg: Any, spec: ModelSpec) -> Any:
    """Delayed writes of a run of images with contiguous slots into the store's tile arrays."""
    a = plans[0].tile_start
    b = plans[-1].tile_start + plans[-1].tile_count
    e, i, c = chunk_layers(plans, cfg, spec)
    z = cfg.store.chunk_tiles
    fine, coarse = aligned_chunks(a, b, z), aligned_chunks(a, b, z * store.META_CHUNK_FACTOR)
    e = e.rechunk({0: fine})
    i, c = i.rechunk({0: coarse}), c.rechunk({0: coarse})
    dim = spec.dim
    sources = {
        "fingerprint": e[:, :dim].astype(cfg.store.dtype),
        "valid": e[:, dim] > 0,
        "uid": i[:, 0].view(np.uint64),
        "image": i[:, 1].astype(np.int32),
        "row": i[:, 2].astype(np.int32),
        "col": i[:, 3].astype(np.int32),
        "x": c[:, 0],
        "y": c[:, 1],
        "lon": c[:, 2],
        "lat": c[:, 3],
    }
    targets = store.tile_targets(path)
    names = list(sources)
    return da.store([sources[n] for n in names], [targets[n] for n in names], regions=[(slice(a, b),)] * len(names),
                    lock=False, compute=False)  # fmt: skip
