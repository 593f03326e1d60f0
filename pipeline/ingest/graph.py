"""Ingest graphs: the dask graph that reads, fingerprints and writes one batch of images. Nothing
here computes.

A batch graph has three kinds of tasks:

- *units*: :func:`read_task` reads pixels, :func:`fingerprint_task` fingerprints them (two
  tasks, so that reads go on while a thread waits for the model). A unit is one grid chunk of a
  large image (its core plus the 128 px halo, see :mod:`pipeline.grid`), or several small
  images that are each a single chunk, grouped up to about a chunk's worth of windows and
  pixels. Many small images therefore cost one task, one model call per batch of windows and
  no per-image scheduling. A unit's rows fill a contiguous slot range.
- *writes* (:func:`write_task`): one per Zarr chunk of ``fingerprint``/``valid`` that the batch
  touches; it assembles that chunk's rows from the units covering it and writes them, so every
  Zarr chunk has exactly one writer. The per-tile metadata (uid, row, col, x, y, lon, lat) does
  not need pixels: the driver writes it from the plan (:func:`pipeline.ingest.plan.tile_meta`).

:func:`batch_parts` returns the write tasks, one ``Delayed`` each, which the driver computes
together (shared units once) and follows one by one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from pipeline import faults, grid, raster, store, tiles
from pipeline.backbones import ModelSpec
from pipeline.ingest import staging
from pipeline.ingest.plan import Batch, ImagePlan


@dataclass(frozen=True)
class Unit:
    """One read-and-fingerprint task: ``members`` are (reader, rows span, cols span) read with
    their halo; their windows, one member after the other, fill slots ``[start, start + count)``."""

    members: tuple[tuple[raster.RasterReader, grid.Span, grid.Span], ...]
    start: int
    count: int
    margins: tuple[tuple[int, int, int, int], ...] = ()  # dense mode: (top, bottom, left, right) px read around

    @property
    def stop(self) -> int:
        return self.start + self.count


def units_of(run: Sequence[ImagePlan], cfg: Any) -> list[Unit]:
    """The units of a run of images with contiguous slots, in slot order.

    Single-chunk images are grouped until a group holds ``(chunk_px / 128)^2`` windows or
    ``(chunk_px + 128)^2`` pixels (a full chunk's worth of either); larger images give one unit
    per grid chunk, row-major, which is their slot order. In dense mode a chunk of a larger image
    is read with ``model.context_px`` of surroundings on each side (as far as the image goes), so
    that windows at chunk edges see context like interior ones; a single-chunk image is its own
    context.
    """
    t = cfg.tiling
    max_windows = (cfg.read.chunk_px // grid.STRIDE) ** 2
    max_pixels = (cfg.read.chunk_px + grid.HALO) ** 2
    units: list[Unit] = []
    group: list[tuple[raster.RasterReader, grid.Span, grid.Span]] = []
    g_start = g_windows = g_pixels = 0

    def close_group() -> None:
        nonlocal group, g_windows, g_pixels
        if group:
            units.append(Unit(tuple(group), g_start, g_windows))
        group, g_windows, g_pixels = [], 0, 0

    for p in run:
        reader = raster.RasterReader(p.info.path, t.bands, t.scale, p.info.masked, cfg.read.decoder,
                                     on_device(p.info, cfg))  # fmt: skip
        if p.single_chunk:
            sy, sx = p.spans_y[0], p.spans_x[0]
            if group and (g_windows + p.tile_count > max_windows or g_pixels >= max_pixels):
                close_group()
            if not group:
                g_start = p.tile_start
            group.append((reader, sy, sx))
            g_windows += p.tile_count
            g_pixels += (sy.stop - sy.start) * (sx.stop - sx.start)
            continue
        close_group()
        slot = p.tile_start
        m = cfg.model.context_px if cfg.model.mode == "dense" else 0
        for sy in p.spans_y:
            for sx in p.spans_x:
                margin = (
                    min(m, sy.start),
                    min(m, p.info.height - sy.stop),
                    min(m, sx.start),
                    min(m, p.info.width - sx.stop),
                )
                units.append(Unit(((reader, sy, sx),), slot, sy.count * sx.count, (margin,) if any(margin) else ()))
                slot += sy.count * sx.count
    close_group()
    return units


def on_device(info: raster.ImageInfo, cfg: Any) -> bool:
    """Whether the image's pixels decode on the worker's device (``read.decoder: device`` and a
    file :func:`pipeline.decode.support` takes)."""
    if cfg.read.decoder != "device":
        return False
    from pipeline import decode

    t = cfg.tiling
    return decode.support(info.path, t.bands, t.scale, info.masked, info.count, info.dtype) is None


def read_task(unit: Unit) -> list[Any]:
    """A unit's pixels: one uint8 ``(4, h, w)`` block (chunk + halo, plus its margins) per member;
    members decoded on the device are tensors there, their JPEG streams decoded in one batch."""
    margins = unit.margins or ((0, 0, 0, 0),) * len(unit.members)
    spans = [((sy.start - t, sy.stop + b), (sx.start - lf, sx.stop + r))
             for (_, sy, sx), (t, b, lf, r) in zip(unit.members, margins)]  # fmt: skip
    out: list[Any] = [None] * len(spans)
    device = [i for i, (reader, _, _) in enumerate(unit.members) if reader.on_device]
    if device:
        from pipeline import decode

        got = decode.read_regions([decode.Request(unit.members[i][0].path, *spans[i]) for i in device])
        for i, block in zip(device, got):
            out[i] = block
    for i, ((reader, _, _), (rows, cols)) in enumerate(zip(unit.members, spans)):
        if out[i] is None:
            out[i] = reader.read(rows, cols)
    return out


def fingerprint_task(
    blocks: list[np.ndarray],
    spec: ModelSpec,
    black_level: int,
    max_nodata_fraction: float,
    stage_in: str = "",
    start: int = 0,
    stage_seconds: float = 2.0,
    margins: tuple[tuple[int, int, int, int], ...] = (),
) -> np.ndarray:
    """A unit's fingerprints: float32 ``(unit.count, dim + 1)`` (the last column 1.0 for kept
    windows), staged for the store at ``stage_in`` (its first slot ``start``) as soon as they
    exist, and its finished model batches every ``stage_seconds`` while it runs, so that a crash
    loses at most a few seconds of work per thread. The fault-injection point of the
    reliability tests."""
    faults.maybe_kill_worker()
    if not stage_in:
        return tiles.fingerprint_blocks(blocks, spec, black_level, max_nodata_fraction, margins=margins)
    ms = margins or ((0, 0, 0, 0),) * len(blocks)
    count = sum(((b.shape[1] - t - bm) // grid.STRIDE - 1) * ((b.shape[2] - lf - r) // grid.STRIDE - 1)
                for b, (t, bm, lf, r) in zip(blocks, ms))  # fmt: skip
    saver = PartSaver(stage_in, start, count, stage_seconds)
    done = staging.load_partial(stage_in, start, count)
    rows = tiles.fingerprint_blocks(
        blocks, spec, black_level, max_nodata_fraction, done=done, on_batch=saver, margins=margins
    )
    staging.stage_rows(stage_in, start, rows)
    faults.after_stage()
    return rows


@dataclass
class PartSaver:
    """Stages a unit's finished model batches every ``every`` seconds while the unit runs."""

    path: str
    start: int
    count: int
    every: float = 2.0
    first: int = -1
    rows: list = field(default_factory=list)
    last: float = field(default_factory=time.monotonic)

    def __call__(self, first: int, rows: np.ndarray) -> None:
        if self.first < 0:
            self.first = first
        self.rows.append(rows)
        if time.monotonic() - self.last >= self.every:
            staging.stage_part(self.path, self.start, self.count, self.first, np.concatenate(self.rows))
            faults.after_stage_part()
            self.first, self.rows, self.last = -1, [], time.monotonic()


def unit_task(unit: Unit, spec: ModelSpec, black_level: int, max_nodata_fraction: float) -> np.ndarray:
    """:func:`read_task` then :func:`fingerprint_task`, in one call, nothing staged (tests, tools)."""
    return fingerprint_task(read_task(unit), spec, black_level, max_nodata_fraction, margins=unit.margins)


def write_task(
    path: str, dtype: str, dim: int, regions: Sequence[tuple[int, int]], starts: Sequence[int], *pieces: np.ndarray
) -> int:
    """Write the slot ranges ``regions`` (all in one Zarr chunk) from the unit outputs
    ``pieces`` (whose first slots are ``starts``). Returns the number of slots written."""
    written = 0
    for a, b in regions:
        rows = np.concatenate(
            [p[max(a - s, 0) : min(b, s + len(p)) - s] for p, s in zip(pieces, starts) if s < b and s + len(p) > a]
        )
        store.write_fingerprints(path, a, rows[:, :dim].astype(dtype), rows[:, dim] > 0)
        written += b - a
    return written


def batch_parts(
    path: Path | str, batch: Batch, cfg: Any, spec: ModelSpec, staged: set[tuple[int, int]] = frozenset()
) -> list[Delayed]:
    """The write tasks of one batch, one ``Delayed`` per Zarr chunk (in slot order); ``key[1]``
    of each is its chunk index. Units in ``staged`` (``(start, count)``, computed by an earlier,
    interrupted run) are loaded, not recomputed."""
    z = cfg.store.chunk_tiles
    units = [u for run in batch.runs for u in units_of(run, cfg)]
    token = tokenize(str(path), batch, cfg.tiling, cfg.read, cfg.store, spec)
    rname, uname, wname = f"read-{token}", f"fingerprint-{token}", f"write-{token}"
    t = cfg.tiling
    # Reads are tasks of their own: while one thread waits for the model (torch's import on a
    # first call, or the device) the others keep reading and decoding.
    dsk: dict[Any, Any] = {}
    for i, u in enumerate(units):
        if (u.start, u.count) in staged:
            dsk[(uname, i)] = (staging.load_staged, str(path), u.start, u.count)
        else:
            dsk[(rname, i)] = (read_task, u)
            dsk[(uname, i)] = (
                fingerprint_task,
                (rname, i),
                spec,
                t.black_level,
                t.max_nodata_fraction,
                str(path),
                u.start,
                cfg.store.stage_seconds,
                u.margins,
            )
    regions: dict[int, list[tuple[int, int]]] = {}
    for run in batch.runs:
        a, b = run[0].tile_start, run[-1].tile_stop
        for c in range(a // z, (b - 1) // z + 1):
            regions.setdefault(c, []).append((max(a, c * z), min(b, (c + 1) * z)))
    keys = []
    for c, regs in sorted(regions.items()):
        lo, hi = c * z, (c + 1) * z
        users = [i for i, u in enumerate(units) if u.start < hi and u.stop > lo]
        dsk[(wname, c)] = (write_task, str(path), cfg.store.dtype, spec.dim, regs, [units[i].start for i in users],
                           *[(uname, i) for i in users])  # fmt: skip
        keys.append((wname, c))
    graph = HighLevelGraph.from_collections(wname, dsk, dependencies=[])
    return [Delayed(k, graph, layer=wname) for k in keys]
