"""Ground geometry: WGS84 projection of image coordinates and local metric offsets.

Pure NumPy plus a lazy rasterio import for reprojection; no dask. One place for the
metres-per-degree conversion that overlap exclusion, ``--lonlat`` lookups and tile sizes share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import grid

EARTH_M_PER_DEG = 111_320.0  # metres per degree of latitude (and of longitude at the equator)


def local_metres(lon: Any, lat: Any, lon0: float, lat0: float) -> tuple[Any, Any]:
    """East and north offsets in metres of points ``(lon, lat)`` from ``(lon0, lat0)``.

    Local equirectangular approximation: ``dx = dlon * 111,320 * cos(lat0)``,
    ``dy = dlat * 111,320``; good to a fraction of a percent over a few kilometres, which is the
    scale of tile overlaps and nearest-tile lookups. Works on NumPy and dask arrays alike.
    """
    dx = (lon - lon0) * (EARTH_M_PER_DEG * math.cos(math.radians(lat0)))
    dy = (lat - lat0) * EARTH_M_PER_DEG
    return dx, dy


def to_lonlat(x: np.ndarray, y: np.ndarray, crs: str) -> tuple[np.ndarray, np.ndarray]:
    """Project CRS coordinates to WGS84 longitude/latitude (NaN when ``crs`` is empty)."""
    if not crs or not len(x):
        nan = np.full(len(x), np.nan)
        return nan, nan.copy()
    from rasterio.warp import transform as warp

    lon, lat = warp(crs, "EPSG:4326", np.asarray(x, float), np.asarray(y, float))
    return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)


def half_tile_metres(transforms: np.ndarray, crss: Sequence[str]) -> np.ndarray:
    """Half a window's side on the ground, in metres, for each image (NaN without a CRS): half
    the ground length of a window's top edge, the 256 px along a row.

    ``transforms``: float64 ``(n_img, 6)`` affine a, b, c, d, e, f; ``crss``: one CRS string per
    image (``""`` for none).
    """
    out = np.full(len(transforms), np.nan)
    for i, (a, _b, c, d, _e, f) in enumerate(np.asarray(transforms, dtype=np.float64)):
        crs = str(crss[i])
        if not crs:
            continue
        lon, lat = to_lonlat(np.array([c, c + a * grid.TILE]), np.array([f, f + d * grid.TILE]), crs)
        dx, dy = local_metres(lon[1], lat[1], lon[0], lat[0])
        out[i] = 0.5 * math.hypot(float(dx), float(dy))
    return out
