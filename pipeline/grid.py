"""Pure tile-grid arithmetic: windows per image, chunk spans with halos, UID packing.

The paper's edge rule: an image of ``H`` pixels (along one axis) is cropped from its top-left
corner to ``256 * floor(H / 256)`` pixels and cut into windows of ``TILE = 256`` at
``STRIDE = 128``, which gives ``2 * floor(H / 256) - 1`` windows along that axis (none when
``H < 256``). Window ``i`` starts at pixel ``i * 128``.

Chunks group window *origins*: chunk ``k`` of a ``chunk_px`` grid owns the windows whose origin
lies in ``[k * chunk_px, (k + 1) * chunk_px)`` and reads pixels
``[k * chunk_px, last_origin + 256)``, i.e. its core plus a 128 px halo on the far side. Every
window therefore belongs to exactly one chunk and is cut exactly once.

UIDs: ``uid = image_id * 2**40 + (row // 128) * 2**20 + (col // 128)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

TILE = 256
STRIDE = 128
HALO = TILE - STRIDE

IMAGE_SHIFT = 40
ROW_SHIFT = 20
MAX_GRID_INDEX = (1 << ROW_SHIFT) - 1  # windows per axis must stay below 2**20
MAX_IMAGE_ID = (1 << (64 - IMAGE_SHIFT)) - 1


def cropped_size(n: int) -> int:
    """Pixels kept along an axis of ``n`` pixels: ``256 * floor(n / 256)``."""
    return (n // TILE) * TILE


def windows_per_axis(n: int) -> int:
    """Windows along an axis of ``n`` pixels: ``2 * floor(n / 256) - 1``, or 0 when ``n < 256``."""
    return max(0, 2 * (n // TILE) - 1)


class Span(NamedTuple):
    """One chunk along one axis.

    ``first``: index of the chunk's first window along the axis; ``count``: windows it owns;
    ``start``/``stop``: the pixel range it reads (core + halo), ``stop - start = (count + 1) * 128``.
    """

    first: int
    count: int
    start: int
    stop: int


def chunk_spans(n: int, chunk_px: int) -> list[Span]:
    """Split the windows of an axis of ``n`` pixels into chunks of ``chunk_px`` pixels.

    ``chunk_px`` must be a multiple of ``STRIDE`` so that chunk edges fall on window origins.

    >>> chunk_spans(1000, 512)
    [Span(first=0, count=4, start=0, stop=640), Span(first=4, count=1, start=512, stop=768)]
    """
    if chunk_px % STRIDE or chunk_px < TILE:
        raise ValueError(
            f"chunk_px must be a multiple of {STRIDE} and at least {TILE}, got {chunk_px}: "
            f"chunk edges must fall on the window grid"
        )
    total = windows_per_axis(n)
    per_chunk = chunk_px // STRIDE
    spans = []
    for first in range(0, total, per_chunk):
        count = min(per_chunk, total - first)
        start = first * STRIDE
        spans.append(Span(first, count, start, start + (count - 1) * STRIDE + TILE))
    return spans


def pack_uid(image_id: np.ndarray | int, row: np.ndarray | int, col: np.ndarray | int) -> np.ndarray:
    """``image_id * 2**40 + (row // 128) * 2**20 + (col // 128)`` as uint64 (row/col in pixels)."""
    image_id = np.asarray(image_id, dtype=np.uint64)
    r = np.asarray(row, dtype=np.uint64) // np.uint64(STRIDE)
    c = np.asarray(col, dtype=np.uint64) // np.uint64(STRIDE)
    return (image_id << np.uint64(IMAGE_SHIFT)) | (r << np.uint64(ROW_SHIFT)) | c


def unpack_uid(uid: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_uid`: ``(image_id, row, col)`` with row/col in pixels (int64)."""
    u = np.asarray(uid, dtype=np.uint64)
    image_id = (u >> np.uint64(IMAGE_SHIFT)).astype(np.int64)
    r = ((u >> np.uint64(ROW_SHIFT)) & np.uint64(MAX_GRID_INDEX)).astype(np.int64)
    c = (u & np.uint64(MAX_GRID_INDEX)).astype(np.int64)
    return image_id, r * STRIDE, c * STRIDE


def window_nodata_counts(nodata: np.ndarray) -> np.ndarray:
    """Count nodata pixels in every window of a chunk.

    ``nodata``: bool ``(h, w)`` for a chunk read with its halo, ``h`` and ``w`` multiples of 128.
    Returns int64 ``(h // 128 - 1, w // 128 - 1)``: window ``(i, j)`` (origin ``i*128, j*128``)
    covers the 2 x 2 cells of 128 px starting at cell ``(i, j)``, so its count is the sum of those
    four cell counts.
    """
    h, w = nodata.shape
    if h % STRIDE or w % STRIDE:
        raise ValueError(f"chunk shape {nodata.shape} is not a multiple of {STRIDE}")
    cells = nodata.reshape(h // STRIDE, STRIDE, w // STRIDE, STRIDE).sum(axis=(1, 3), dtype=np.int64)
    return cells[:-1, :-1] + cells[1:, :-1] + cells[:-1, 1:] + cells[1:, 1:]


def slot_in_image(row: int, col: int, height: int, width: int, chunk_px: int) -> int | None:
    """Slot offset of window ``(row, col)`` (pixels) within its image's slot range, or None when
    it is not a window of the grid.

    Slots follow the store layout: the image's grid chunks row-major, then each chunk's windows
    row-major. Chunk ``(ci, cj)`` holds ``min(per, ny - ci * per) x min(per, nx - cj * per)``
    windows with ``per = chunk_px // 128``, so the slots before it are the full chunk rows above
    (``ci * per * nx``) plus the chunks to its left in its own chunk row.
    """
    if row % STRIDE or col % STRIDE:
        return None
    i, j = row // STRIDE, col // STRIDE
    ny, nx = windows_per_axis(height), windows_per_axis(width)
    if not (0 <= i < ny and 0 <= j < nx):
        return None
    per = chunk_px // STRIDE
    ci, cj = i // per, j // per
    rows_before = min(ci * per, ny)
    chunk_h = min(per, ny - ci * per)
    chunk_w = min(per, nx - cj * per)
    return rows_before * nx + chunk_h * (cj * per) + (i - ci * per) * chunk_w + (j - cj * per)


def slots_in_images(
    row: np.ndarray, col: np.ndarray, height: np.ndarray, width: np.ndarray, chunk_px: int
) -> np.ndarray:
    """:func:`slot_in_image` for arrays of windows (of grid windows only; int64 offsets within
    each window's image): the same formula, vectorized."""
    i, j = np.asarray(row, np.int64) // STRIDE, np.asarray(col, np.int64) // STRIDE
    ny = np.maximum(0, 2 * (np.asarray(height, np.int64) // TILE) - 1)
    nx = np.maximum(0, 2 * (np.asarray(width, np.int64) // TILE) - 1)
    per = chunk_px // STRIDE
    ci, cj = i // per, j // per
    chunk_h = np.minimum(per, ny - ci * per)
    chunk_w = np.minimum(per, nx - cj * per)
    return np.minimum(ci * per, ny) * nx + chunk_h * (cj * per) + (i - ci * per) * chunk_w + (j - cj * per)
