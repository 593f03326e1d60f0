"""Real aerial imagery from $AERIAL_SEARCH_DATA (DroneDeploy, NEON, OpenAerialMap GeoTIFFs)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
import torchvision

from pipeline import Config, grid, ingest, open_store, raster, tiles

SMALL = ["2018_SJER_3_252000_4107000_image_477.tif", "OSBS_029.tif", "australia.tif", "test_tiled.tif"]


def test_whole_archive_window_and_keep_counts(data_dir):
    """The data README's figures: 1,102 windows, 1,065 kept, for black tolerances 0..8.

    Uses the real reader and the ingest's own per-chunk filter, without the model (fast)."""
    paths = raster.expand_sources([data_dir / "aerial"])
    assert len(paths) == 8
    for black_level in (0, 8):
        windows = kept = 0
        for path in paths:
            info = raster.read_header(path)
            reader = raster.RasterReader(path, masked=info.masked)
            for sy in grid.chunk_spans(info.height, 2048):
                for sx in grid.chunk_spans(info.width, 2048):
                    keep = tiles.keep_windows(reader.read((sy.start, sy.stop), (sx.start, sx.stop)), black_level, 0.5)
                    assert keep.shape == (sy.count, sx.count)
                    windows += keep.size
                    kept += int(keep.sum())
        assert (windows, kept) == (1102, 1065), black_level


def test_ingest_real_files_threads(data_dir, tmp_path):
    cfg = Config().override(
        **{"model.arch": "probe", "model.weights": "random", "read.chunk_px": 512, "store.chunk_tiles": 8, "cluster.progress": False}
    )
    report = ingest([data_dir / "aerial" / name for name in SMALL], tmp_path / "real.zarr", cfg)
    ds = open_store(tmp_path / "real.zarr")
    expect = 0
    for path in ds["image_path"].values:
        with rasterio.open(path) as src:
            expect += grid.windows_per_axis(src.height) * grid.windows_per_axis(src.width)
    assert report.windows == expect == ds.sizes["tile"] == 1 + 1 + 9 + 25
    assert ds["valid"].values.all()
    lon, lat = ds["lon"].values, ds["lat"].values
    assert np.isfinite(lon).all() and (np.abs(lat) <= 90).all()  # all four files have a CRS


def _shared_weights(data_dir):
    path = data_dir.parent / "weights" / "squeezenet1_1-imagenet.pth"
    if not path.is_file():
        pytest.skip(f"pretrained SqueezeNet weights not found at {path}")
    return path


def test_pretrained_squeezenet_fingerprints_equal_torchvision(data_dir, tmp_path):
    """A real ImageNet network, loaded from a local file, against torchvision called directly."""
    import torchvision.transforms.functional as F

    weights = _shared_weights(data_dir)
    src_path = data_dir / "aerial" / "test_tiled.tif"
    cfg = Config().override(**{"model.arch": "squeezenet1_1", "model.weights": str(weights), "cluster.progress": False})
    ingest([src_path], tmp_path / "sq.zarr", cfg)
    ds = open_store(tmp_path / "sq.zarr")
    assert ds.attrs["model"]["pretrained"] is True
    assert ds.attrs["model"]["weights_sha256"] == "4a739c48d5a7a5b15bd74c28d030464ffd110795cfaede7dcb8c8785c825f3b6"

    net = torchvision.models.squeezenet1_1(weights=None)
    net.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    net.eval()
    picks = [0, 7, 24]
    with rasterio.open(src_path) as src:
        px = np.stack(
            [
                src.read(
                    [1, 2, 3], window=((int(ds.row[t]), int(ds.row[t]) + 256), (int(ds.col[t]), int(ds.col[t]) + 256))
                )
                for t in picks
            ]
        )
    x = F.normalize(torch.from_numpy(px).float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        ref = net.features(x).mean(dim=(2, 3)).numpy()
    got = ds["fingerprint"].values[picks]
    assert got.shape == (3, 512)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.slow
def test_ingest_whole_archive(data_dir, tmp_path):
    cfg = Config().override(**{"model.arch": "probe", "model.weights": "random", "cluster.progress": False})
    report = ingest([data_dir / "aerial"], tmp_path / "all.zarr", cfg)
    assert (report.windows, report.tiles) == (1102, 1065)
