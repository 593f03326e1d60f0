"""Ingest planning: sources against the store's image table, image ids, slot ranges, batches, and
the per-tile metadata that follows from headers alone.

No dask here. Headers are read concurrently (:func:`check_sources`: a thread pool, which a
driver may run on several cluster workers at once); the rest is slot arithmetic. A plan fixes
every window's slot before any fingerprint exists, which is what makes resuming and concurrent
reading safe.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import grid, raster, tiles
from pipeline.digest import sha256_file
from pipeline.errors import RasterError
from pipeline.geo import to_lonlat


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

    @property
    def tile_stop(self) -> int:
        return self.tile_start + self.tile_count

    @property
    def single_chunk(self) -> bool:
        """The whole image is one grid chunk (so several such images can share a task)."""
        return len(self.spans_y) == 1 and len(self.spans_x) == 1


def plan_images(
    infos: Sequence[raster.ImageInfo], chunk_px: int, first_id: int = 0, first_slot: int = 0
) -> list[ImagePlan]:
    """Assign image ids (in the given order) and contiguous slot ranges."""
    plans = []
    slot = first_slot
    for k, info in enumerate(infos):
        image_id = first_id + k
        if image_id > grid.MAX_IMAGE_ID:
            raise RasterError(f"more than {grid.MAX_IMAGE_ID + 1} images do not fit the uid layout; split the archive")
        ys = tuple(grid.chunk_spans(info.height, chunk_px))
        xs = tuple(grid.chunk_spans(info.width, chunk_px))
        plans.append(ImagePlan(image_id, info, ys, xs, slot))
        slot += info.n_windows
    return plans


# --------------------------------------------------------------------------------------------
# Headers


@dataclass(frozen=True)
class Header:
    """What planning learns about one source: its header, or why it cannot be used."""

    path: str
    info: raster.ImageInfo | None
    error: str = ""  # why the file cannot be used ("" when it can)
    notes: tuple[tuple[str, str], ...] = ()  # (kind, message) of raster.check_image
    digest: str = ""  # content sha256 when asked for


HEADER_LATENCY = "AERIAL_SEARCH_FAILPOINT_HEADER_LATENCY"  # seconds each header read waits first (tests, benchmarks)


def check_source(
    path: str, bands: Sequence[int], scale: Sequence[float] | None, content_hash: bool, decoder: str = "auto"
) -> Header:
    """One source's header, checked against the tiling settings; failures are returned, not raised."""
    delay = float(os.environ.get(HEADER_LATENCY) or 0)
    if delay:  # a simulated slow store (object storage, a network disk), in every process
        time.sleep(delay)
    try:
        info = raster.read_header(path, decoder)
        notes = raster.check_image(info, bands, scale)
    except RasterError as e:
        return Header(path, None, str(e))
    digest = sha256_file(path) if content_hash and not raster.is_uri(path) else ""
    return Header(path, info, "", tuple(notes), digest)


def check_sources(
    paths: Sequence[str],
    bands: Sequence[int],
    scale: Sequence[float] | None,
    content_hash: bool,
    threads: int,
    decoder: str = "auto",
) -> list[Header]:
    """Headers of ``paths`` (in order), read by ``threads`` threads at once: GDAL releases the GIL
    while it opens a file, so latency (object storage, network disks) overlaps."""
    if threads <= 1 or len(paths) <= 1:
        return [check_source(p, bands, scale, content_hash, decoder) for p in paths]
    with ThreadPoolExecutor(min(threads, len(paths)), thread_name_prefix="aerial-search-header") as pool:
        return list(pool.map(lambda p: check_source(p, bands, scale, content_hash, decoder), paths))


def report_notes(headers: Sequence[Header], shown: int = 5) -> None:
    """Warn about usable images with caveats (no CRS, too small): each one when few, else the
    first ``shown`` of a kind and a count, so a million files without a CRS make a few lines."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for h in headers:
        for kind, message in h.notes:
            by_kind[kind].append(message)
    what = {"nocrs": "images without a CRS (their lon/lat are NaN)", "small": "images smaller than one window"}
    for kind, messages in by_kind.items():
        for message in messages[: shown if len(messages) > shown + 1 else len(messages)]:
            warnings.warn(message, stacklevel=3)
        if len(messages) > shown + 1:
            warnings.warn(f"... and {len(messages) - shown} more {what.get(kind, kind)}", stacklevel=3)


@dataclass
class SortedSources:
    """Sources sorted against a store's image table by :func:`sort_sources`."""

    new: list[raster.ImageInfo] = field(default_factory=list)  # images to add (new paths, or changed ones)
    replaces: dict[int, int] = field(default_factory=dict)  # index into ``new`` -> id of the version it replaces
    redo: list[tuple[int, raster.ImageInfo]] = field(default_factory=list)  # unfinished: (id, info), own slots
    skipped: int = 0  # unchanged and done
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of files that cannot be used
    hashes: dict[str, str] = field(default_factory=dict)  # content sha256 per path ("" when not asked for)


def sort_sources(headers: Sequence[Header], table: dict[str, np.ndarray], strict: bool) -> SortedSources:
    """Compare every source with the image table: new, changed (replaces an older id),
    unfinished (redo), unchanged (skipped) or unusable (a failure; raised if ``strict``).
    Unchanged means same size and modification time, or same sha256 when both have one."""
    # Replaced and removed images are history: their path coming back is a new image.
    live = {
        str(p): i
        for i, (p, st) in enumerate(zip(table["image_path"], table["status"]))
        if st not in ("replaced", "removed")
    }
    out = SortedSources()
    for h in headers:
        if h.info is None:
            if strict:
                raise RasterError(h.error)
            out.failures.append((h.path, h.error))
            continue
        info = h.info
        out.hashes[h.path] = h.digest
        old = live.get(h.path)
        if old is None:
            out.new.append(info)
            continue
        if h.digest and table["sha256"][old]:
            same = table["sha256"][old] == h.digest
        else:
            same = int(table["size"][old]) == info.size and (
                np.isnan(table["mtime"][old]) and np.isnan(info.mtime) or table["mtime"][old] == info.mtime
            )
        if same and table["status"][old] in ("done", "empty"):
            out.skipped += 1
        elif same:
            out.redo.append((old, info))  # pending (interrupted) or failed earlier: redo in its own slots
        else:
            out.replaces[len(out.new)] = old
            out.new.append(info)
    return out


# --------------------------------------------------------------------------------------------
# Slots and batches


@dataclass(frozen=True)
class Batch:
    """A unit of commit: runs of images with contiguous slots, sharing no Zarr chunk with any
    other batch (so batches can be computed at the same time)."""

    runs: tuple[tuple[ImagePlan, ...], ...]

    @property
    def plans(self) -> list[ImagePlan]:
        return [p for run in self.runs for p in run]

    @property
    def windows(self) -> int:
        return sum(p.tile_count for p in self.plans)

    def without(self, image_id: int) -> Batch | None:
        """The batch minus one image (after it failed), or None when nothing is left."""
        rest = runs([p for p in self.plans if p.image_id != image_id])
        return Batch(tuple(tuple(r) for r in rest)) if rest else None


def allocate(
    infos: Sequence[raster.ImageInfo], first_id: int, n_tiles: int, chunk_tiles: int, chunk_px: int, batch_tiles: int
) -> tuple[list[ImagePlan], list[Batch], int]:
    """Ids and slots for new images after ``first_id`` images and ``n_tiles`` slots: batches of
    about ``batch_tiles`` slots, each starting on a Zarr chunk boundary, so that no two batches
    share a fingerprint chunk. Returns ``(plans, batches, slots in use after them)``."""
    z = chunk_tiles
    cursor = -(-n_tiles // z) * z
    plans: list[ImagePlan] = []
    batches: list[list[ImagePlan]] = []
    current: list[ImagePlan] = []
    batch_start = cursor
    for k, info in enumerate(infos):
        if current and cursor - batch_start >= batch_tiles:
            batches.append(current)
            cursor = -(-cursor // z) * z
            current, batch_start = [], cursor
        plan = plan_images([info], chunk_px, first_id + k, cursor)[0]
        plans.append(plan)
        current.append(plan)
        cursor += plan.tile_count
    if current:
        batches.append(current)
    return plans, [Batch(tuple(tuple(r) for r in runs(b))) for b in batches if runs(b)], cursor


def regroup(plans: Sequence[ImagePlan], chunk_tiles: int, batch_tiles: int) -> list[Batch]:
    """Batches of already-placed images (unfinished ones, redone in their own slots), in slot
    order, about ``batch_tiles`` slots each, never splitting two images that share a Zarr chunk."""
    out: list[Batch] = []
    current: list[ImagePlan] = []
    for p in sorted((p for p in plans if p.tile_count), key=lambda p: p.tile_start):
        if current:
            last_chunk = (current[-1].tile_stop - 1) // chunk_tiles
            size = current[-1].tile_stop - current[0].tile_start
            if size >= batch_tiles and p.tile_start // chunk_tiles > last_chunk:
                out.append(Batch(tuple(tuple(r) for r in runs(current))))
                current = []
        current.append(p)
    if current:
        out.append(Batch(tuple(tuple(r) for r in runs(current))))
    return out


def runs(plans: Sequence[ImagePlan]) -> list[list[ImagePlan]]:
    """Split plans into runs of images with adjacent slot ranges (one contiguous write each)."""
    out: list[list[ImagePlan]] = []
    for p in sorted(plans, key=lambda p: p.tile_start):
        if not p.tile_count:
            continue
        if out and out[-1][-1].tile_stop == p.tile_start:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def table_rows(
    plans: Sequence[ImagePlan],
    hashes: dict[str, str],
    acquired: dict[str, np.datetime64] | None = None,
    items: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Image-table rows of new images (status ``pending``, or ``empty`` without windows);
    ``acquired`` and ``items``: each path's acquisition time and STAC item id, where known."""
    infos = [p.info for p in plans]
    acquired, items = acquired or {}, items or {}
    return {
        "acquired": np.array([acquired.get(f.path, np.datetime64("NaT", "s")) for f in infos], dtype="datetime64[s]"),
        "item_id": np.array([items.get(f.path, "") for f in infos], dtype=object),
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


# --------------------------------------------------------------------------------------------
# Per-tile metadata, from headers alone


def tile_meta(run: Sequence[ImagePlan]) -> dict[str, np.ndarray]:
    """The per-tile arrays of a run of images with contiguous slots, in slot order: ``uid``
    (uint64), ``image``/``row``/``col`` (int32), ``x``/``y`` (window centres in each image's CRS:
    its affine applied to ``(col + 128, row + 128)``) and ``lon``/``lat`` (WGS84, NaN without a
    CRS; reprojected once per distinct CRS, not once per image)."""
    rows, cols, owner = [], [], []
    for k, p in enumerate(run):
        for sy in p.spans_y:
            for sx in p.spans_x:
                r, c = tiles.chunk_origins(sy, sx)
                rows.append(r)
                cols.append(c)
                owner.append(np.full(len(r), k, dtype=np.int64))
    row, col, k = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (rows, cols, owner))
    image = np.array([p.image_id for p in run], dtype=np.int64)[k]
    t = np.array([p.info.transform for p in run], dtype=np.float64).reshape(-1, 6)[k]
    px, py = col + grid.TILE / 2, row + grid.TILE / 2
    x = t[:, 0] * px + t[:, 1] * py + t[:, 2]
    y = t[:, 3] * px + t[:, 4] * py + t[:, 5]
    lon, lat = np.full(len(x), np.nan), np.full(len(x), np.nan)
    crs = np.array([p.info.crs for p in run], dtype=object)
    for name in set(crs.tolist()) - {""}:
        sel = crs[k] == name
        lon[sel], lat[sel] = to_lonlat(x[sel], y[sel], name)
    return {
        "uid": grid.pack_uid(image, row, col),
        "image": image.astype(np.int32),
        "row": row.astype(np.int32),
        "col": col.astype(np.int32),
        "x": x,
        "y": y,
        "lon": lon,
        "lat": lat,
    }


def config_kwargs(cfg: Any) -> dict[str, Any]:
    """The tiling settings header checks need, as keyword arguments of :func:`check_sources`."""
    return {"bands": cfg.tiling.bands, "scale": cfg.tiling.scale, "content_hash": cfg.store.content_hash,
            "decoder": cfg.read.decoder}  # fmt: skip
