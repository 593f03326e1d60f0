"""Per-chunk kernels (NumPy + the model, no dask): windows, nodata filter, fingerprints, metadata.

Each function takes one grid chunk as produced by :func:`pipeline.ingest.graph.lazy_overlapped` and
returns one row per window the chunk owns, in row-major window order within the chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline import grid
from pipeline.embed import ModelSpec, embed_chunk
from pipeline.geo import to_lonlat


def nodata_pixels(block: np.ndarray, black_level: int) -> np.ndarray:
    """bool ``(h, w)``: masked by the file (M == 0) or black (every band <= ``black_level``)."""
    return (block[3] == 0) | (block[:3] <= black_level).all(axis=0)


def keep_windows(block: np.ndarray, black_level: int, max_nodata_fraction: float) -> np.ndarray:
    """bool ``(ny, nx)``: windows whose nodata fraction is at most ``max_nodata_fraction``."""
    counts = grid.window_nodata_counts(nodata_pixels(block, black_level))
    return counts <= max_nodata_fraction * grid.TILE * grid.TILE


def fingerprint_chunk(block: np.ndarray, spec: ModelSpec, black_level: int, max_nodata_fraction: float) -> np.ndarray:
    """Fingerprints of one chunk's kept windows: float32 ``(ny * nx, dim + 1)``.

    Columns ``0..dim-1`` hold the fingerprint (zeros for dropped windows), column ``dim`` is
    1.0 for a kept window and 0.0 for a dropped one. The model runs on kept windows only.
    """
    keep = keep_windows(block, black_level, max_nodata_fraction)
    ny, nx = keep.shape
    out = np.zeros((ny * nx, spec.dim + 1), dtype=np.float32)
    flat = np.flatnonzero(keep.ravel())
    if len(flat):
        ij = np.stack(np.unravel_index(flat, keep.shape), axis=1)
        out[flat, : spec.dim] = embed_chunk(block[:3], ij, spec)
        out[flat, spec.dim] = 1.0
    return out


def chunk_origins(span_y: grid.Span, span_x: grid.Span) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows and cols (int64 ``(n,)``) of the windows a chunk owns, row-major."""
    rows = (span_y.first + np.arange(span_y.count)) * grid.STRIDE
    cols = (span_x.first + np.arange(span_x.count)) * grid.STRIDE
    r, c = np.meshgrid(rows, cols, indexing="ij")
    return r.ravel(), c.ravel()


def chunk_ids(image_id: int, span_y: grid.Span, span_x: grid.Span) -> np.ndarray:
    """int64 ``(n, 4)``: uid (as int64 bits), image id, row, col of each window of a chunk."""
    rows, cols = chunk_origins(span_y, span_x)
    uid = grid.pack_uid(image_id, rows, cols).view(np.int64)
    return np.stack([uid, np.full_like(rows, image_id), rows, cols], axis=1)


def chunk_coords(span_y: grid.Span, span_x: grid.Span, transform: Sequence[float], crs: str) -> np.ndarray:
    """float64 ``(n, 4)``: x, y (window centre in the image CRS) and lon, lat (WGS84, NaN
    without a CRS). The centre is the affine transform applied to ``(col + 128, row + 128)``."""
    rows, cols = chunk_origins(span_y, span_x)
    a, b, c, d, e, f = transform
    px = cols + grid.TILE / 2
    py = rows + grid.TILE / 2
    x = a * px + b * py + c
    y = d * px + e * py + f
    lon, lat = to_lonlat(x, y, crs)
    return np.stack([x, y, lon, lat], axis=1)
