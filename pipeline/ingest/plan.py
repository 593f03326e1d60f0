"""Ingest planning: sources against the store's image table, image ids, slot ranges and batches.

No pixels and no dask here: headers only (:func:`pipeline.raster.read_header`) and slot
arithmetic. A plan fixes every window's slot before any fingerprint exists, which is what makes
resuming and concurrent reading safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import grid, raster
from pipeline.embed import sha256_file
from pipeline.errors import RasterError


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
            raise RasterError(f"more than {grid.MAX_IMAGE_ID + 1} images do not fit the uid layout; split the archive")
        ys = tuple(grid.chunk_spans(info.height, chunk_px))
        xs = tuple(grid.chunk_spans(info.width, chunk_px))
        plans.append(ImagePlan(image_id, info, ys, xs, slot))
        slot += info.n_windows
    return plans


@dataclass
class Classified:
    """Sources sorted against a store's image table by :func:`classify`."""

    new: list[raster.ImageInfo]  # images to add (new paths, or changed ones)
    replaces: dict[int, int]  # index into ``new`` -> id of the older version it replaces
    redo: list[tuple[int, raster.ImageInfo]]  # (id, info): unfinished images, redone in their own slots
    skipped: int  # unchanged and done
    failures: list[tuple[str, str]]  # (path, why) of files that cannot be used at all
    hashes: dict[str, str]  # content sha256 per path ("" when not asked for)


def classify(paths: Sequence[str], table: dict[str, np.ndarray], cfg: Any, strict: bool) -> Classified:
    """Read every source's header and compare it with the image table: new, changed (replaces an
    older id), unfinished (redo), unchanged (skipped) or unusable (a failure, raised if
    ``strict``). Unchanged means same size and modification time, or same sha256 with
    ``store.content_hash``."""
    live = {str(p): i for i, (p, st) in enumerate(zip(table["image_path"], table["status"])) if st != "replaced"}
    out = Classified([], {}, [], 0, [], {})
    for path in paths:
        try:
            info = raster.read_header(path)
            raster.check_image(info, cfg.tiling.bands, cfg.tiling.scale)
        except RasterError as e:
            if strict:
                raise
            out.failures.append((path, str(e)))
            continue
        digest = content_hash(path) if cfg.store.content_hash else ""
        out.hashes[path] = digest
        old = live.get(path)
        if old is None:
            out.new.append(info)
            continue
        if digest and table["sha256"][old]:
            same = table["sha256"][old] == digest
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


def content_hash(path: str) -> str:
    return "" if raster.is_uri(path) else sha256_file(path)


def allocate(
    infos: Sequence[raster.ImageInfo], first_id: int, n_tiles: int, chunk_tiles: int, chunk_px: int, batch_tiles: int
) -> tuple[list[ImagePlan], list[list[ImagePlan]], int]:
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
    return plans, batches, cursor


def runs(plans: Sequence[ImagePlan]) -> list[list[ImagePlan]]:
    """Split plans into runs of images with adjacent slot ranges (one contiguous write each)."""
    out: list[list[ImagePlan]] = []
    for p in sorted(plans, key=lambda p: p.tile_start):
        if not p.tile_count:
            continue
        if out and out[-1][-1].tile_start + out[-1][-1].tile_count == p.tile_start:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def table_rows(plans: Sequence[ImagePlan], hashes: dict[str, str]) -> dict[str, np.ndarray]:
    """Image-table rows of new images (status ``pending``, or ``empty`` without windows)."""
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
