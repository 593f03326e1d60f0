"""Ingest: GeoTIFF archive -> tile fingerprints in a Zarr store, as one dask graph.

Graph, per image: ``raster.lazy_overlapped`` (windowed reads of grid chunks with their halo)
-> ``tiles.fingerprint_chunk`` per chunk (nodata filter, windows, model) and
``tiles.chunk_ids``/``chunk_coords`` (grid math) -> concatenated over all images on the
``tile`` dimension -> rechunked to the store's Zarr chunks -> written by ``xarray.to_zarr``.

:func:`build_dataset` returns the lazy ``xarray.Dataset``; :func:`ingest` is the driver.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__, grid, raster, store, tiles
from pipeline.config import Config
from pipeline.embed import MEAN, STD, ModelSpec, describe_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePlan:
    """One image's place in the store: its id, header, chunk spans and slot range."""

    image_id: int
    info: raster.ImageInfo
    spans_y: tuple[grid.Span, ...]
    spans_x: tuple[grid.Span, ...]
    tile_start: int

    @property
    def tile_count(self) -> int:
        return self.info.n_windows


def plan_images(
    infos: Sequence[raster.ImageInfo], chunk_px: int, first_id: int = 0, first_slot: int = 0
) -> list[ImagePlan]:
    """Assign image ids (in the given order) and contiguous slot ranges."""
    plans = []
    slot = first_slot
    for k, info in enumerate(infos):
        image_id = first_id + k
        if image_id > grid.MAX_IMAGE_ID:
            raise ValueError(f"more than {grid.MAX_IMAGE_ID + 1} images do not fit the uid layout")
        ys = tuple(grid.chunk_spans(info.height, chunk_px))
        xs = tuple(grid.chunk_spans(info.width, chunk_px))
        plans.append(ImagePlan(image_id, info, ys, xs, slot))
        slot += info.n_windows
    return plans


def _chunk_layers(plans: Sequence[ImagePlan], cfg: Config, spec: ModelSpec):
    """Three dask arrays over all slots: fingerprints+flag, integer ids, float coordinates."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

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
        pixels = raster.lazy_overlapped(reader, plan.info.height, plan.info.width, cfg.read.chunk_px)
        pixel_arrays.append(pixels)
        for i, sy in enumerate(plan.spans_y):
            for j, sx in enumerate(plan.spans_x):
                k = len(sizes)
                e_dsk[(emb, k, 0)] = (
                    tiles.fingerprint_chunk,
                    (pixels.name, 0, i, j),
                    spec,
                    t.black_level,
                    t.max_nodata_fraction,
                )
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


def provenance(cfg: Config, spec: ModelSpec, weights: dict[str, Any]) -> dict[str, Any]:
    """Group attributes that say how every fingerprint in the store was made."""
    return {
        "schema_version": store.SCHEMA_VERSION,
        "complete": False,  # set once every chunk is written; open_store refuses incomplete stores
        "software": f"aerial-search {__version__}",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "arch": spec.arch,
            "dim": spec.dim,
            "head": "classifier removed; global average pool",
            **weights,
        },
        "preprocessing": {
            "tile": grid.TILE,
            "stride": grid.STRIDE,
            "crop": "top-left, to a multiple of 256 per axis",
            "mean": list(MEAN),
            "std": list(STD),
            "input_scale": "uint8 / 255",
            "bands": list(cfg.tiling.bands),
            "scale": list(cfg.tiling.scale) if cfg.tiling.scale else None,
            "black_level": cfg.tiling.black_level,
            "max_nodata_fraction": cfg.tiling.max_nodata_fraction,
        },
        "fingerprint_dtype": cfg.store.dtype,
        "uid": "image_id * 2**40 + (row // 128) * 2**20 + (col // 128)",
        "layout": {"chunk_tiles": cfg.store.chunk_tiles, "chunk_px": cfg.read.chunk_px},
        "config": cfg.to_dict(),
    }


def build_dataset(plans: Sequence[ImagePlan], cfg: Config, spec: ModelSpec, attrs: dict[str, Any] | None = None):
    """The lazy store as an ``xarray.Dataset`` (tile arrays are dask arrays, chunked for Zarr)."""
    import dask.array as da
    import xarray as xr

    z = cfg.store.chunk_tiles
    if any(p.tile_count for p in plans):
        e, i, c = _chunk_layers(plans, cfg, spec)
        meta = z * store.META_CHUNK_FACTOR
        e, i, c = e.rechunk({0: z}), i.rechunk({0: meta}), c.rechunk({0: meta})
    else:  # no image yields a window: an empty but valid store
        e = da.zeros((0, spec.dim + 1), dtype=np.float32)
        i = da.zeros((0, 4), dtype=np.int64)
        c = da.zeros((0, 4), dtype=np.float64)
    dim = spec.dim
    tile_vars = {
        "fingerprint": (("tile", "feature"), e[:, :dim].astype(cfg.store.dtype)),
        "valid": ("tile", e[:, dim] > 0),
        "uid": ("tile", i[:, 0].view(np.uint64) if i.shape[0] else i[:, 0].astype(np.uint64)),
        "image": ("tile", i[:, 1].astype(np.int32)),
        "row": ("tile", i[:, 2].astype(np.int32)),
        "col": ("tile", i[:, 3].astype(np.int32)),
        "x": ("tile", c[:, 0]),
        "y": ("tile", c[:, 1]),
        "lon": ("tile", c[:, 2]),
        "lat": ("tile", c[:, 3]),
    }
    infos = [p.info for p in plans]
    img_vars = {
        "image_path": ("img", np.array([f.path for f in infos], dtype=object)),
        "width": ("img", np.array([f.width for f in infos], dtype=np.int64)),
        "height": ("img", np.array([f.height for f in infos], dtype=np.int64)),
        "crs": ("img", np.array([f.crs for f in infos], dtype=object)),
        "transform": (("img", "affine"), np.array([f.transform for f in infos], dtype=np.float64).reshape(-1, 6)),
        "size": ("img", np.array([f.size for f in infos], dtype=np.int64)),
        "mtime": ("img", np.array([f.mtime for f in infos], dtype=np.float64)),
        "status": ("img", np.array(["pending" if p.tile_count else "empty" for p in plans], dtype=object)),
        "tile_start": ("img", np.array([p.tile_start for p in plans], dtype=np.int64)),
        "tile_count": ("img", np.array([p.tile_count for p in plans], dtype=np.int64)),
    }
    return xr.Dataset({**tile_vars, **img_vars}, attrs=attrs or {})


@dataclass
class IngestReport:
    """What an ingest did; printed by the CLI and returned by the API."""

    store: str
    images: int
    windows: int
    tiles: int
    dropped: int
    seconds: float
    scheduler: str
    weights_id: str
    empty_images: list[str] = field(default_factory=list)

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        lines = [
            f"store        {self.store}",
            f"images       {self.images} ({len(self.empty_images)} too small for a window)",
            f"windows      {self.windows} ({self.tiles} kept, {self.dropped} dropped as >50% nodata)",
            f"time         {self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s) on {self.scheduler}",
            f"weights      {self.weights_id}",
        ]
        return "\n".join(lines)


def ingest(
    sources: Iterable[str | os.PathLike[str]],
    store_path: str | os.PathLike[str],
    config: Config | None = None,
    *,
    overwrite: bool = False,
    client: Any = None,
) -> IngestReport:
    """Fingerprint every window of ``sources`` into a new store at ``store_path``.

    The store is built in a temporary sibling folder and moved into place only when every
    chunk is written, so a failure never leaves a half-written store (nor replaces an old one).
    ``client``: an existing ``distributed.Client`` (otherwise ``config.cluster`` decides).
    """
    from pipeline.cluster import runtime

    cfg = config or Config()
    final = store.check_writable(store_path, overwrite)
    paths = raster.expand_sources(sources)
    if not paths:
        raise raster.RasterError(
            f"no images found in {list(map(str, sources))}: pass GeoTIFF files, folders of them or a .txt list"
        )
    infos = [raster.read_header(p) for p in paths]
    for info in infos:
        raster.check_image(info, cfg.tiling.bands, cfg.tiling.scale)
    weights = describe_weights(cfg.model.arch, cfg.model.weights, cfg.model.seed)
    if not weights["pretrained"]:
        warnings.warn(f"ingesting with {weights['weights_id']}", stacklevel=2)
    plans = plan_images(infos, cfg.read.chunk_px)

    t0 = time.perf_counter()
    with runtime(cfg.cluster, client=client) as rt:
        spec = ModelSpec.from_config(cfg.model, weights["weights_sha256"], torch_threads=rt.torch_threads)
        ds = build_dataset(plans, cfg, spec, provenance(cfg, spec, weights))
        tmp = store.temp_path(final)
        store.prepare(final, tmp)
        try:
            meta = cfg.store.chunk_tiles * store.META_CHUNK_FACTOR
            encoding = {
                name: {
                    "chunks": (cfg.store.chunk_tiles if name in ("fingerprint", "valid") else meta,)
                    + ds[name].shape[1:]
                }
                for name in store.TILE_VARS
                if ds.sizes["tile"]
            }
            if "fingerprint" in encoding:
                encoding["fingerprint"]["compressors"] = store.fingerprint_compressors(cfg.store.compressor)
            delayed = ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, compute=False, encoding=encoding)
            log.info("ingesting %d images on %s", len(plans), rt.describe())
            rt.compute(delayed)
            _mark_done(tmp, plans)
            valid = _read_valid(tmp)
            store.mark_complete(tmp)
            store.commit(tmp, final)
        except BaseException:
            store.discard(tmp)
            raise
        scheduler = rt.describe()
    seconds = time.perf_counter() - t0
    return IngestReport(
        store=str(final),
        images=len(plans),
        windows=int(valid.size),
        tiles=int(valid.sum()),
        dropped=int((~valid).sum()),
        seconds=seconds,
        scheduler=scheduler,
        weights_id=weights["weights_id"],
        empty_images=[p.info.path for p in plans if not p.tile_count],
    )


def _mark_done(path: Path | str, plans: Sequence[ImagePlan]) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="r+", zarr_format=3)
    status = np.array(["done" if p.tile_count else "empty" for p in plans], dtype=object)
    if len(status):
        g["status"][:] = status


def _read_valid(path: Path | str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r", zarr_format=3)["valid"][:], dtype=bool)
