"""Per-chunk kernels (NumPy + the model, no dask): nodata filter, windows, fingerprints.

A *block* is one grid chunk with its halo as :class:`pipeline.raster.RasterReader` reads it:
uint8 ``(4, h, w)``, R, G, B and the validity mask: a NumPy array, or a tensor on the device where
the chunk was decoded there (:mod:`pipeline.decode`; its windows are then cut there too). Functions return one row per window the
block owns, in row-major window order; several blocks (several small images) are
fingerprinted together, their windows batched across images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline import grid
from pipeline.backbones import ModelSpec
from pipeline.embed import embed_chunks, embed_dense


def nodata_pixels(block: np.ndarray, black_level: int) -> np.ndarray:
    """bool ``(h, w)``: masked by the file (M == 0) or black (every band <= ``black_level``)."""
    return (block[3] == 0) | (block[:3] <= black_level).all(axis=0)


def keep_windows(block: Any, black_level: int, max_nodata_fraction: float) -> np.ndarray:
    """bool ``(ny, nx)``: windows whose nodata fraction is at most ``max_nodata_fraction``. A block
    decoded on a device (a tensor, :mod:`pipeline.decode`) is counted there; only the answer
    comes to the host."""
    limit = max_nodata_fraction * grid.TILE * grid.TILE
    if isinstance(block, np.ndarray):
        return grid.window_nodata_counts(nodata_pixels(block, black_level)) <= limit
    nodata = (block[3] == 0) | (block[:3] <= black_level).all(dim=0)
    h, w = nodata.shape
    s = grid.STRIDE
    cells = nodata.reshape(h // s, s, w // s, s).sum(dim=(1, 3))
    counts = cells[:-1, :-1] + cells[1:, :-1] + cells[:-1, 1:] + cells[1:, 1:]
    return (counts <= limit).cpu().numpy()


def fingerprint_blocks(
    blocks: Sequence[np.ndarray],
    spec: ModelSpec,
    black_level: int,
    max_nodata_fraction: float,
    done: np.ndarray | None = None,
    on_batch: Callable[[int, np.ndarray], None] | None = None,
    margins: Sequence[tuple[int, int, int, int]] = (),
) -> np.ndarray:
    """Fingerprints of the kept windows of ``blocks``: float32 ``(sum of ny * nx, dim + 1)``, the
    blocks' windows one after the other.

    Columns ``0..dim-1`` hold the fingerprint (zeros for dropped windows), column ``dim`` is
    1.0 for a kept window and 0.0 for a dropped one. The model runs on kept windows only, in
    batches that span blocks. ``done``: fingerprints of the first kept windows, computed by an
    earlier, interrupted run (not recomputed); ``on_batch(first, rows)``: called after each
    model batch with the index of its first kept window (:func:`pipeline.embed.embed_chunks`).

    ``margins``: per block, the ``(top, bottom, left, right)`` pixels of surroundings read
    around its chunk (dense mode, :func:`pipeline.embed.embed_dense`); none by default.
    """
    margins = list(margins) or [(0, 0, 0, 0)] * len(blocks)
    cores = [b[:, t : b.shape[1] - bm, lf : b.shape[2] - r] for b, (t, bm, lf, r) in zip(blocks, margins)]
    keeps = [keep_windows(c, black_level, max_nodata_fraction) for c in cores]
    out = np.zeros((sum(k.size for k in keeps), spec.dim + 1), dtype=np.float32)
    work, rows = [], []
    offset = 0
    for block, core, keep, (top, _, left, _) in zip(blocks, cores, keeps, margins):
        flat = np.flatnonzero(keep.ravel())
        if len(flat):
            ij = np.stack(np.unravel_index(flat, keep.shape), axis=1)
            work.append((block[:3], top, left, ij) if spec.mode == "dense" else (core[:3], ij))
            rows.append(offset + flat)
        offset += keep.size
    skip = 0 if done is None else len(done)
    embed = embed_dense if spec.mode == "dense" else embed_chunks
    fps = embed(work, spec, skip=skip, on_batch=on_batch)
    kept_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    out[kept_rows, : spec.dim] = np.concatenate(fps) if fps else np.zeros((0, spec.dim), np.float32)
    if skip:
        out[kept_rows[:skip], : spec.dim] = done
    out[kept_rows, spec.dim] = 1.0
    return out


def fingerprint_chunk(block: np.ndarray, spec: ModelSpec, black_level: int, max_nodata_fraction: float) -> np.ndarray:
    """:func:`fingerprint_blocks` of one block."""
    return fingerprint_blocks([block], spec, black_level, max_nodata_fraction)


def chunk_origins(span_y: grid.Span, span_x: grid.Span) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows and cols (int64 ``(n,)``) of the windows a chunk owns, row-major."""
    rows = (span_y.first + np.arange(span_y.count)) * grid.STRIDE
    cols = (span_x.first + np.arange(span_x.count)) * grid.STRIDE
    r, c = np.meshgrid(rows, cols, indexing="ij")
    return r.ravel(), c.ravel()
