"""Shared fixtures: synthetic GeoTIFF writers, the real-data folder, a fast test config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config

DATA_ENV = "AERIAL_SEARCH_DATA"


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32617",
    transform: tuple[float, ...] | None = (0.1, 0.0, 400000.0, 0.0, -0.1, 3300000.0),
    nodata: float | None = None,
    alpha: bool = False,
    tiled: bool = False,
) -> Path:
    """Write ``data`` (bands, h, w) as a GeoTIFF; ``alpha`` marks the last band as alpha."""
    import rasterio
    from affine import Affine
    from rasterio.enums import ColorInterp

    count, h, w = data.shape
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": count,
        "dtype": data.dtype.name,
    }
    if crs:
        profile["crs"] = crs
    if transform:
        profile["transform"] = Affine(*transform)
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        if alpha:
            ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha][:count]
    return path


def textured(h: int, w: int, seed: int = 0, bands: int = 3, dtype: str = "uint8") -> np.ndarray:
    """Deterministic image with structure at several scales (noise alone makes dull fingerprints)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((bands, h, w), dtype=np.float32)
    for b in range(bands):
        fy, fx = rng.uniform(0.005, 0.05, 2)
        out[b] = 127 + 60 * np.sin(yy * fy + b) * np.cos(xx * fx) + rng.normal(0, 25, (h, w))
    out = np.clip(out, 1, 255)  # >= 1 so that no pixel is black unless a test makes it so
    return out.astype(dtype)


@pytest.fixture
def data_dir() -> Path:
    """The real imagery folder from $AERIAL_SEARCH_DATA, or a skip that says how to get it."""
    root = os.environ.get(DATA_ENV)
    if not root or not Path(root, "aerial").is_dir():
        pytest.skip(
            f"real imagery not available: set {DATA_ENV} to the shared data folder (holding aerial/, ucmerced/)"
        )
    return Path(root)


@pytest.fixture
def cfg() -> Config:
    """Random weights (no download), small chunks so images span several chunks."""
    return Config().override(
        **{
            "model.weights": "random",
            "model.batch_size": 16,
            "read.chunk_px": 384,
            "store.chunk_tiles": 16,
            "cluster.progress": False,
        }
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)


_DATA_SKIPS: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "realdata" in report.keywords:
        _DATA_SKIPS.append(f"{report.nodeid} ({report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''})")


def pytest_sessionfinish(session, exitstatus):
    """With $AERIAL_SEARCH_DATA set, any skip of a ``realdata`` test (missing imagery, missing
    weights, an unreachable package index) fails the run: CI must not go green on a mistyped
    data path or a half-set-up machine."""
    if os.environ.get(DATA_ENV) and _DATA_SKIPS:
        print(f"\nERROR: {DATA_ENV} is set but {len(_DATA_SKIPS)} real-data test(s) were skipped: {_DATA_SKIPS[:3]}")
        session.exitstatus = 1
