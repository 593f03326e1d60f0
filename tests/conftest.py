"""Shared fixtures: synthetic GeoTIFF writers, the real-data folder, a fast test config, and one
session-wide synthetic archive (``flights``) with its stores (``ingest_store``).

Tests whose subject is not the CNN ingest with the probe backbone (``--model probe``: a fixed
random two-layer CNN, 23 M multiply-adds per window against ResNet-18's 2.4 G); the CNN itself
is tested against torchvision in test_embed, test_dense and test_ingest.
"""

from __future__ import annotations

import os
import shutil
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


# ---- the shared archive ------------------------------------------------------------------------

PX = 0.5  # metres per pixel of the synthetic flights
X0, Y0 = 400000.0, 3300000.0  # EPSG:32617 origin of a.tif
SHIFT_R, SHIFT_C = 100, 500  # b.tif is a.tif's ground seen again, shifted by these pixels
FLIGHTS = ("a.tif", "b.tif", "c_far.tif", "d_geo.tif", "e_nocrs.tif", "f_copy.tif")


def write_flights(root: Path) -> Path:
    """Two overlapping flights over the same ground (``a``, ``b``), a far image with a black band
    (dropped windows: ``c_far``), a geographic image in degrees (``d_geo``, EPSG:4326), an image
    without a CRS (``e_nocrs``) and an identical copy of it (``f_copy``: equal fingerprints,
    ties broken by uid). Every window is textured (no accidental nodata)."""
    root.mkdir(parents=True, exist_ok=True)
    base = textured(900, 1300, seed=101)
    write_tif(root / "a.tif", base[:, :768, :768], transform=(PX, 0, X0, 0, -PX, Y0))
    b = base[:, SHIFT_R : SHIFT_R + 640, SHIFT_C : SHIFT_C + 768]
    write_tif(root / "b.tif", b, transform=(PX, 0, X0 + SHIFT_C * PX, 0, -PX, Y0 - SHIFT_R * PX))
    far = textured(512, 768, seed=102)
    far[:, :, :200] = 0  # dropped windows: nodata in score maps, gaps in results
    write_tif(root / "c_far.tif", far, transform=(PX, 0, X0 + 60000, 0, -PX, Y0))
    geo = textured(512, 512, seed=103)
    write_tif(root / "d_geo.tif", geo, crs="EPSG:4326", transform=(4e-6, 0, -82.05, 0, -4e-6, 29.80))
    write_tif(root / "e_nocrs.tif", textured(512, 512, seed=104), crs=None, transform=None)
    shutil.copy(root / "e_nocrs.tif", root / "f_copy.tif")
    return root


@pytest.fixture(scope="session")
def flights(tmp_path_factory) -> Path:
    """The shared archive (:func:`write_flights`). Read-only: a test that changes files copies it."""
    return write_flights(tmp_path_factory.mktemp("flights"))


@pytest.fixture(scope="session")
def ingest_store(tmp_path_factory):
    """``ingest_store(sources, **options) -> path``: the store of ``sources`` ingested through the
    command line with the probe model, ``--chunk-px 384 --chunk-tiles 8`` and ``options`` (flag
    name with ``_`` for ``-``, e.g. ``dtype="float16"``), made once per session for each set of
    arguments. Read-only: a test that changes a store copies it (:func:`copy_store`)."""
    from pipeline.cli import main

    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("stores")

    def make(sources, **options) -> Path:
        opts = {"model": "probe", "chunk_px": 384, "chunk_tiles": 8, **options}
        srcs = [str(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
        key = (tuple(srcs), tuple(sorted(opts.items())))
        if key not in made:
            path = root / f"s{len(made)}.zarr"
            argv = ["ingest", *srcs, "--store", str(path), "--no-progress"]
            for name, value in opts.items():
                argv += [f"--{name.replace('_', '-')}", str(value)] if value is not True else [f"--{name.replace('_', '-')}"]
            assert main(argv) == 0, argv
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def cluster_client():
    """One LocalCluster for the session (2 worker processes, 1 thread each) and its client, for
    tests that compute on a cluster but are not about starting one; each start costs seconds.
    Not dask's default client: only what is given the client runs there (the other tests'
    computes stay local, as they would without this fixture)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as client:
            yield client


def copy_store(path: Path, dest: Path) -> Path:
    """A private, writable copy of a shared store."""
    shutil.copytree(path, dest)
    return dest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real imagery folder from $AERIAL_SEARCH_DATA, or a skip that says how to get it. Every
    test that uses it, directly or through another fixture, is marked ``realdata``: with the
    variable set, such a skip fails the run (:func:`pytest_sessionfinish`)."""
    root = os.environ.get(DATA_ENV)
    if not root or not Path(root, "aerial").is_dir():
        pytest.skip(
            f"real imagery not available: set {DATA_ENV} to the shared data folder (holding aerial/, ucmerced/)"
        )
    return Path(root)


@pytest.fixture(scope="session")
def shared_weights(data_dir) -> Path:
    """The ImageNet SqueezeNet 1.1 weights beside the shared data (``../shared/weights``)."""
    path = data_dir.parent / "weights" / "squeezenet1_1-imagenet.pth"
    if not path.is_file():
        pytest.skip(f"pretrained SqueezeNet weights not found at {path}")
    return path


@pytest.fixture
def cfg() -> Config:
    """Random weights (no download), small chunks so images span several chunks."""
    return Config().override(
        **{
            "model.arch": "probe", "model.weights": "random",
            "model.batch_size": 16,
            "read.chunk_px": 384,
            "store.chunk_tiles": 16,
            "cluster.progress": False,
        }
    )


FLAG_CHECK = "test_every_cli_flag_is_documented_and_run_by_the_suite"


def pytest_configure(config):
    """Every command line the suite runs (in this process and in subprocesses, which inherit the
    variable) is logged for the flag check (tests/test_cli_flags.py)."""
    import tempfile

    from pipeline.cli import ARGV_LOG

    if not os.environ.get(ARGV_LOG):
        os.environ[ARGV_LOG] = str(Path(tempfile.mkdtemp(prefix="aerial-search-argv-")) / "argv.jsonl")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)
    # The flag check sees the command lines of the tests before it: it runs last, and only in a
    # run of the whole suite (a selection would leave flags unused).
    check = [item for item in items if item.name == FLAG_CHECK]
    if check:
        items.remove(check[0])
        items.append(check[0])
        files = {Path(str(item.fspath)).name for item in items}
        every = {p.name for p in Path(__file__).parent.glob("test_*.py")}
        if files != every or config.getoption("keyword"):
            check[0].add_marker(pytest.mark.skip(reason="checks the flags of the whole suite's command lines: "
                                                       "run the whole suite"))  # fmt: skip


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
