"""Ingest: GeoTIFF archive -> tile fingerprints in a Zarr store, as one dask graph.

Graph, per image: ``raster.lazy_overlapped`` (windowed reads of grid chunks with their halo)
-> ``tiles.fingerprint_chunk`` per chunk (nodata filter, windows, model) and
``tiles.chunk_ids``/``chunk_coords`` (grid math) -> concatenated over all images on the
``tile`` dimension -> rechunked so that chunk edges fall on the store's Zarr chunk edges ->
``dask.array.store`` into the store's arrays, one batch of images at a time.

:func:`write_run` builds one batch's writes; :func:`ingest` is the driver (plans, batches,
per-batch commits, resume, incremental updates).
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

from pipeline import __version__, faults, grid, raster, store, tiles
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


def aligned_chunks(start: int, stop: int, size: int) -> tuple[int, ...]:
    """Chunk lengths for slots ``[start, stop)`` whose edges fall on global multiples of ``size``,
    so that every Zarr chunk the range touches is written by exactly one task."""
    edges = [start, *range((start // size + 1) * size, stop, size), stop]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]) if b > a)


def write_run(path: Path | str, plans: Sequence[ImagePlan], cfg: Config, spec: ModelSpec):
    """Delayed writes of a run of images with contiguous slots into the store's arrays."""
    import dask.array as da
    import zarr

    a = plans[0].tile_start
    b = plans[-1].tile_start + plans[-1].tile_count
    e, i, c = _chunk_layers(plans, cfg, spec)
    z = cfg.store.chunk_tiles
    fine, coarse = aligned_chunks(a, b, z), aligned_chunks(a, b, z * store.META_CHUNK_FACTOR)
    e = e.rechunk({0: fine})
    i, c = i.rechunk({0: coarse}), c.rechunk({0: coarse})
    dim = spec.dim
    g = zarr.open_group(str(path), mode="r+", zarr_format=3)
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
    names = list(sources)
    return da.store([sources[n] for n in names], [g[n] for n in names], regions=[(slice(a, b),)] * len(names),
                    lock=False, compute=False)  # fmt: skip


@dataclass
class IngestReport:
    """What an ingest did; printed by the CLI and returned by the API."""

    store: str
    images: int  # images in the store after this run
    windows: int  # windows of this run's fingerprinted images
    tiles: int  # of which kept
    dropped: int
    seconds: float
    scheduler: str
    weights_id: str
    processed: int = 0  # images fingerprinted by this run
    skipped: int = 0  # unchanged images already in the store
    replaced: int = 0  # changed images re-ingested (their old tiles invalidated)
    empty_images: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), also in the store

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        lines = [
            f"store        {self.store}",
            f"images       {self.processed} fingerprinted, {self.skipped} unchanged, {self.replaced} replaced, "
            f"{len(self.failed)} failed, {len(self.empty_images)} too small for a window; {self.images} in the store",
            f"windows      {self.windows} ({self.tiles} kept, {self.dropped} dropped as >50% nodata)",
            f"time         {self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s) on {self.scheduler}",
            f"weights      {self.weights_id}",
        ]
        lines += [f"FAILED       {p}: {why}" for p, why in self.failed]
        return "\n".join(lines)


def _same_fingerprints(existing: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple]:
    a, b = store.fingerprint_signature(existing), store.fingerprint_signature(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def _classify(paths, table, cfg, strict):
    """Sources against the image table: (infos to add, {new index: old id}, (id, info) to redo,
    skipped count, failures, content hashes)."""
    live = {}
    for i, (p, st) in enumerate(zip(table["image_path"], table["status"])):
        if st != "replaced":
            live[str(p)] = i
    new, replaces, redo, skipped, failures = [], {}, [], 0, []
    hashes: dict[str, str] = {}
    for path in paths:
        try:
            info = raster.read_header(path)
            raster.check_image(info, cfg.tiling.bands, cfg.tiling.scale)
        except raster.RasterError as e:
            if strict:
                raise
            failures.append((path, str(e)))
            continue
        digest = _content_hash(path) if cfg.store.content_hash else ""
        hashes[path] = digest
        old = live.get(path)
        if old is None:
            new.append(info)
            continue
        if digest and table["sha256"][old]:
            same = table["sha256"][old] == digest
        else:
            same = int(table["size"][old]) == info.size and (
                np.isnan(table["mtime"][old]) and np.isnan(info.mtime) or table["mtime"][old] == info.mtime
            )
        if same and table["status"][old] in ("done", "empty"):
            skipped += 1
        elif same:
            redo.append((old, info))  # pending (interrupted) or failed earlier: redo in its own slots
        else:
            replaces[len(new)] = old
            new.append(info)
    return new, replaces, redo, skipped, failures, hashes


def _content_hash(path: str) -> str:
    from pipeline.embed import sha256_file

    return "" if raster.is_uri(path) else sha256_file(path)


def _allocate(infos, table, cfg, batch_tiles):
    """Ids and slots for new images: batches of about ``batch_tiles`` slots, each starting on a
    Zarr chunk boundary, so that no two batches share a fingerprint chunk."""
    z = cfg.store.chunk_tiles
    first_id = len(table["image_path"])
    cursor = -(-int(table["n_tiles"]) // z) * z
    plans, batches, current, batch_start = [], [], [], cursor
    for k, info in enumerate(infos):
        if current and cursor - batch_start >= batch_tiles:
            batches.append(current)
            cursor = -(-cursor // z) * z
            current, batch_start = [], cursor
        plan = plan_images([info], cfg.read.chunk_px, first_id + k, cursor)[0]
        plans.append(plan)
        current.append(plan)
        cursor += plan.tile_count
    if current:
        batches.append(current)
    return plans, batches, cursor


def _runs(plans: Sequence[ImagePlan]) -> list[list[ImagePlan]]:
    """Split plans into runs of images with adjacent slot ranges (one contiguous write each)."""
    runs: list[list[ImagePlan]] = []
    for p in sorted(plans, key=lambda p: p.tile_start):
        if not p.tile_count:
            continue
        if runs and runs[-1][-1].tile_start + runs[-1][-1].tile_count == p.tile_start:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def ingest(
    sources: Iterable[str | os.PathLike[str]],
    store_path: str | os.PathLike[str],
    config: Config | None = None,
    *,
    overwrite: bool = False,
    strict: bool = False,
    client: Any = None,
    batch_tiles: int | None = None,
) -> IngestReport:
    """Fingerprint every window of ``sources`` into the store at ``store_path``.

    - A new store is built in a hidden sibling folder (``.NAME.partial``) and moved into place
      when every image is done; ``--overwrite`` replaces an existing store the same way.
    - An existing store is extended in place: new images are added, unchanged ones (same path,
      size and modification time) skipped, changed ones re-ingested under a new image id with
      their old tiles invalidated. Searches see an image only once its status is ``done``.
    - Work is committed per batch of images (about ``batch_tiles`` slots) after its chunks are
      written: rerunning after a crash redoes only unfinished images.
    - A file that cannot be read is reported and recorded (status ``failed``) and the run goes
      on, unless ``strict``. One ingest per store at a time (:class:`~pipeline.lock.StoreLock`).

    ``client``: an existing ``distributed.Client`` (otherwise ``config.cluster`` decides).
    """
    cfg = config or Config()
    final = store.check_writable(store_path)
    try:
        return _ingest(sources, final, cfg, overwrite, strict, client, batch_tiles)
    except OSError as e:  # disk full, read-only or vanished storage: say so, and that work is kept
        raise store.StoreError(
            f"writing store {final} failed: {e.strerror or e} ({e.filename or ''}); free space or fix permissions "
            f"on that storage, then rerun the same command: finished images are kept and it resumes"
        ) from e


def _ingest(
    sources, final, cfg: Config, overwrite: bool, strict: bool, client: Any, batch_tiles: int | None
) -> IngestReport:
    from pipeline.cluster import runtime
    from pipeline.lock import StoreLock

    remote = store.is_remote(final)
    with StoreLock(final) as lock:
        paths = raster.expand_sources(sources)
        if not paths:
            raise raster.RasterError(
                f"no images found in {list(map(str, sources))}: pass GeoTIFF files, folders of them or a .txt list"
            )
        weights = describe_weights(cfg.model.arch, cfg.model.weights, cfg.model.seed)
        if not weights["pretrained"]:
            warnings.warn(f"ingesting with {weights['weights_id']}", stacklevel=2)
        existing = store._exists(final) and not overwrite
        work = final if (existing or remote) else Path(final).with_name(f".{Path(final).name}.partial")
        if overwrite:
            if remote:
                store.discard(final)
            elif store._exists(work):
                store.discard(work)
        t0 = time.perf_counter()
        with runtime(cfg.cluster, client=client) as rt:
            spec = ModelSpec.from_config(cfg.model, weights["weights_sha256"], torch_threads=rt.torch_threads)
            prov = provenance(cfg, spec, weights)
            have_store = store._exists(work)
            if have_store:
                have = store.open_store(work).attrs if store._is_zarr_group(work) else None
                if have is None:
                    raise store.StoreError(f"{work} exists and is not a fingerprint store; choose another --store path")
                diff = _same_fingerprints(have, prov)
                if diff:
                    raise store.StoreError(
                        f"store {final} holds fingerprints made differently ({diff}); fingerprints of different "
                        f"models, weights or preprocessing never mix in one store: use another --store"
                    )
                table = store.read_table(work)
            else:
                table = store.empty_table()
            new, replaces, redo, skipped, failures, hashes = _classify(paths, table, cfg, strict)
            if failures and not (new or redo or skipped):
                raise raster.RasterError("no source could be used:\n" + "\n".join(why for _, why in failures))
            if not have_store:
                store.create_store(work, prov, spec.dim, cfg.store.dtype, cfg.store.chunk_tiles, cfg.store.compressor)
            plans, batches, n_tiles = _allocate(
                new, table, cfg, batch_tiles or cfg.store.batch_tiles or 8 * cfg.store.chunk_tiles
            )
            if plans:
                store.grow(work, max(n_tiles, int(table["n_tiles"])), len(table["image_path"]) + len(plans))
                store.write_rows(work, np.array([p.image_id for p in plans]), _table_rows(plans, hashes))
            for _path, why in failures:  # files that could not even be opened: reported, not in the table
                warnings.warn(f"skipped {why}", stacklevel=2)
            old_plans = [plan_images([info], cfg.read.chunk_px, i, int(table["tile_start"][i]))[0] for i, info in redo]
            work_batches = [_runs(b) for b in batches] + [[run] for run in _runs(old_plans)]
            replaced_of = {plans[k].image_id: old for k, old in replaces.items()}
            done, failed_ids = [], []
            for runs in work_batches:
                for run in runs:
                    done_ids, bad = _write_with_retry(work, run, cfg, spec, rt, strict)
                    done += done_ids
                    failures += [(p.info.path, why) for p, why in bad]
                    failed_ids += [p.image_id for p, _ in bad]
                    _commit(work, done_ids, [(p.image_id, why) for p, why in bad], replaced_of)
                    lock.refresh()
                    faults.after_commit()
            store.set_attrs(
                work,
                last_ingest={
                    "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "failed": [{"path": p, "reason": why} for p, why in failures],
                },
            )
            scheduler = rt.describe()
        if work != final:
            store.commit(work, final)
    seconds = time.perf_counter() - t0
    ran = {p.image_id for p in plans} | {i for i, _ in redo}
    all_plans = {p.image_id: p for p in [*plans, *old_plans]}
    valid = _read_valid(final)
    slots = np.concatenate([np.arange(p.tile_start, p.tile_start + p.tile_count) for i, p in all_plans.items() if i in done]
                           or [np.zeros(0, np.int64)])  # fmt: skip
    return IngestReport(
        store=str(final),
        images=len(store.read_table(final)["image_path"]),
        windows=int(len(slots)),
        tiles=int(valid[slots].sum()),
        dropped=int((~valid[slots]).sum()),
        seconds=seconds,
        scheduler=scheduler,
        weights_id=weights["weights_id"],
        processed=len([i for i in ran if i in done]),
        skipped=skipped,
        replaced=len([i for i in replaced_of if i in done]),
        empty_images=[p.info.path for p in plans if not p.tile_count],
        failed=failures,
    )


def _table_rows(plans: Sequence[ImagePlan], hashes: dict[str, str]) -> dict[str, Any]:
    infos = [p.info for p in plans]
    return {
        "image_path": np.array([f.path for f in infos], dtype=object),
        "width": np.array([f.width for f in infos], dtype=np.int64),
        "height": np.array([f.height for f in infos], dtype=np.int64),
        "crs": np.array([f.crs for f in infos], dtype=object),
        "transform": np.array([f.transform for f in infos], dtype=np.float64).reshape(-1, 6),
        "size": np.array([f.size for f in infos], dtype=np.int64),
        "mtime": np.array([f.mtime for f in infos], dtype=np.float64),
        "status": np.array(["pending" if p.tile_count else "empty" for p in plans], dtype=object),
        "error": np.array(["" for _ in plans], dtype=object),
        "sha256": np.array([hashes.get(f.path, "") for f in infos], dtype=object),
        "tile_start": np.array([p.tile_start for p in plans], dtype=np.int64),
        "tile_count": np.array([p.tile_count for p in plans], dtype=np.int64),
    }


def _write_with_retry(work, run, cfg, spec, rt, strict):
    """Write a run of images; an image whose pixels cannot be read is dropped from the run
    (reported as failed) and the rest rewritten, unless ``strict``."""
    try:
        rt.compute(write_run(work, run, cfg, spec))
        return [p.image_id for p in run], []
    except raster.RasterError as e:
        culprit = next((p for p in run if str(e).startswith(p.info.path + ":")), None)
        if strict or culprit is None:
            raise
        done, bad = [], [(culprit, str(e))]
        for sub in _runs([p for p in run if p is not culprit]):
            d, b = _write_with_retry(work, sub, cfg, spec, rt, strict)
            done += d
            bad += b
        return done, bad


def _commit(work, done_ids, failed, replaced_of) -> None:
    """Make finished images visible (and their older versions invisible) in one status write each."""
    if done_ids:
        store.write_rows(work, np.array(sorted(done_ids)), {"status": np.array(["done"] * len(done_ids), dtype=object)})
        old = sorted(replaced_of[i] for i in done_ids if i in replaced_of)
        if old:
            store.write_rows(work, np.array(old), {"status": np.array(["replaced"] * len(old), dtype=object)})
    for image_id, why in failed:
        store.write_rows(work, np.array([image_id]), {"status": np.array(["failed"], dtype=object),
                                                        "error": np.array([why[:2000]], dtype=object)})  # fmt: skip


def _read_valid(path: Path | str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r", zarr_format=3)["valid"][:], dtype=bool)
