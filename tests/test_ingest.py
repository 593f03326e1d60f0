"""Ingest end to end on synthetic GeoTIFFs, checked against NumPy, rasterio and torchvision."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import rasterio
import torch
import torchvision
import xarray as xr
from conftest import textured, write_tif

from pipeline import embed, grid, ingest, open_store, raster, schema, store


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Five images covering the nodata rules; returns (folder, {name: (pixels RGB, nodata mask)})."""
    root = tmp_path_factory.mktemp("archive")
    images = {}

    plain = textured(700, 1100, seed=1)  # 3 x 7 windows, several chunks at chunk_px 384
    write_tif(root / "a_plain.tif", plain)
    images["a_plain.tif"] = (plain, np.zeros(plain.shape[1:], bool))

    border = textured(600, 800, seed=2)
    border[:, :, :300] = 0  # black border: windows over it are dropped
    border[:, 500:, 600:] = 3  # near-black, JPEG-like: kept at black_level 0
    write_tif(root / "b_border.tif", border)
    images["b_border.tif"] = (border, (border <= 0).all(axis=0))

    rgba = textured(520, 520, seed=3, bands=4)
    rgba[3] = 255
    rgba[3, :, :200] = 0  # transparent left part
    write_tif(root / "c_alpha.tif", rgba, alpha=True)
    images["c_alpha.tif"] = (rgba[:3], rgba[3] == 0)

    nod = textured(520, 640, seed=4)
    nod[:, 260:, :] = 9  # nodata value over the bottom half
    write_tif(root / "d_nodata.tif", nod, nodata=9, crs=None, transform=None)
    images["d_nodata.tif"] = (nod, (nod == 9).all(axis=0))

    tiny = textured(200, 300, seed=5)
    write_tif(root / "e_tiny.tif", tiny)
    images["e_tiny.tif"] = (tiny, np.zeros(tiny.shape[1:], bool))
    return root, images


@pytest.fixture(scope="module")
def ingested(archive, tmp_path_factory):
    from pipeline.config import Config

    cfg = Config().override(
        **{
            "model.weights": "random",
            "model.batch_size": 16,
            "read.chunk_px": 384,
            "store.chunk_tiles": 16,
            "cluster.progress": False,
        }
    )
    root, _ = archive
    path = tmp_path_factory.mktemp("stores") / "threads.zarr"
    with pytest.warns(UserWarning, match="e_tiny.tif"):
        report = ingest([root], path, cfg)
    return path, report, cfg


def expected_windows(rgb_mask: tuple[np.ndarray, np.ndarray], black_level: int = 0):
    """Brute force: every (row, col, kept) of the paper's grid from the full image."""
    rgb, masked = rgb_mask
    nodata = masked | (rgb <= black_level).all(axis=0)
    h, w = nodata.shape
    out = []
    for r in range(0, 256 * (h // 256) - 255, 128):
        for c in range(0, 256 * (w // 256) - 255, 128):
            out.append((r, c, nodata[r : r + 256, c : c + 256].mean() <= 0.5))
    return out


def test_window_counts_and_nodata_rules(archive, ingested):
    root, images = archive
    path, report, _ = ingested
    ds = open_store(path)
    paths = [os.path.basename(p) for p in ds["image_path"].values]
    assert paths == sorted(images)  # image ids follow sorted path order
    image = ds["image"].values
    rows, cols, valid = ds["row"].values, ds["col"].values, ds["valid"].values
    total_kept = 0
    for image_id, name in enumerate(paths):
        expect = expected_windows(images[name])
        h, w = images[name][0].shape[1:]
        assert len(expect) == grid.windows_per_axis(h) * grid.windows_per_axis(w)
        sel = image == image_id
        got = sorted(zip(rows[sel].tolist(), cols[sel].tolist(), valid[sel].tolist()))
        assert got == sorted(expect), name
        assert int(ds["tile_count"].values[image_id]) == len(expect)
        total_kept += sum(k for _, _, k in expect)
    assert report.tiles == total_kept and report.windows == len(valid)
    dropped = {n: sum(not k for _, _, k in expected_windows(images[n])) for n in images}
    assert dropped["b_border.tif"] > 0 and dropped["c_alpha.tif"] > 0 and dropped["d_nodata.tif"] > 0
    assert dropped["a_plain.tif"] == 0
    status = dict(zip(paths, ds["status"].values.astype(object)))
    assert status["e_tiny.tif"] == "empty" and status["a_plain.tif"] == "done"
    assert not np.any(ds["fingerprint"].values[~valid])  # dropped slots hold zeros


def test_black_level_keeps_jpeg_like_borders(archive, tmp_path, cfg):
    root, images = archive
    path = tmp_path / "bl.zarr"
    ingest([root / "b_border.tif"], path, cfg.override(**{"tiling.black_level": 3}))
    ds = open_store(path)
    expect = expected_windows(images["b_border.tif"], black_level=3)
    got = sorted(zip(ds["row"].values.tolist(), ds["col"].values.tolist(), ds["valid"].values.tolist()))
    assert got == sorted(expect)


def _torchvision_reference(pixels: np.ndarray, seed: int) -> np.ndarray:
    """ResNet-18 called directly: torchvision model + torchvision normalize, no project code."""
    import torchvision.transforms.functional as F

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model.eval()
    x = torch.from_numpy(pixels).float() / 255.0
    x = F.normalize(x, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    with torch.no_grad():
        return model(x).numpy()


def test_fingerprints_equal_torchvision_on_the_same_pixels(archive, ingested):
    root, _ = archive
    path, _, cfg = ingested
    ds = open_store(path)
    valid = ds["valid"].values
    rng = np.random.default_rng(0)
    picks = rng.choice(np.flatnonzero(valid), 6, replace=False)
    windows = []
    for t in picks:
        img_path = ds["image_path"].values[ds["image"].values[t]]
        r, c = int(ds["row"].values[t]), int(ds["col"].values[t])
        with rasterio.open(img_path) as src:
            windows.append(src.read([1, 2, 3], window=((r, r + 256), (c, c + 256))))
    ref = _torchvision_reference(np.stack(windows), cfg.model.seed)
    got = ds["fingerprint"].values[picks]
    assert got.dtype == np.float32 and got.shape == (6, 512)
    assert np.abs(got - ref).max() < 1e-4


def test_uids_unique_and_decode(ingested):
    path, _, _ = ingested
    ds = open_store(path)
    uid = ds["uid"].values
    assert uid.dtype == np.uint64 and len(np.unique(uid)) == len(uid)
    img, row, col = grid.unpack_uid(uid)
    np.testing.assert_array_equal(img, ds["image"].values)
    np.testing.assert_array_equal(row, ds["row"].values)
    np.testing.assert_array_equal(col, ds["col"].values)
    expect = ds["image"].values.astype(np.uint64) * 2**40 + (ds["row"].values // 128).astype(np.uint64) * 2**20
    np.testing.assert_array_equal(uid, expect + (ds["col"].values // 128).astype(np.uint64))


def test_lonlat_matches_rasterio(ingested):
    from rasterio.warp import transform as warp

    path, _, _ = ingested
    ds = open_store(path)
    paths = ds["image_path"].values
    for t in range(0, ds.sizes["tile"], 7):
        img_path = paths[int(ds["image"].values[t])]
        r, c = int(ds["row"].values[t]), int(ds["col"].values[t])
        with rasterio.open(img_path) as src:
            x, y = src.xy(r + 128, c + 128, offset="ul")
            assert ds["x"].values[t] == pytest.approx(x) and ds["y"].values[t] == pytest.approx(y)
            if src.crs is None:
                assert np.isnan(ds["lon"].values[t]) and np.isnan(ds["lat"].values[t])
            else:
                lon, lat = warp(src.crs, "EPSG:4326", [x], [y])
                assert ds["lon"].values[t] == pytest.approx(lon[0], abs=1e-9)
                assert ds["lat"].values[t] == pytest.approx(lat[0], abs=1e-9)


def test_store_reopens_with_plain_xarray_and_records_provenance(ingested):
    path, _, cfg = ingested
    ds = xr.open_zarr(path, consolidated=False)
    assert set(ds.sizes) == {"tile", "feature", "img", "affine"}
    assert ds["fingerprint"].dims == ("tile", "feature") and ds.sizes["feature"] == 512
    assert ds["fingerprint"].encoding["chunks"] == (cfg.store.chunk_tiles, 512)
    attrs = ds.attrs
    assert attrs["schema_version"] == schema.SCHEMA_VERSION
    assert attrs["model"]["arch"] == "resnet18" and attrs["model"]["pretrained"] is False
    assert "NOT PRETRAINED" in attrs["model"]["weights_id"]
    assert attrs["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert attrs["preprocessing"]["stride"] == 128 and attrs["preprocessing"]["black_level"] == 0
    assert attrs["fingerprint_dtype"] == "float32" and attrs["created"]
    assert not [p for p in path.parent.iterdir() if ".partial-" in p.name]


def test_float16_store_holds_rounded_fingerprints(archive, ingested, tmp_path):
    root, _ = archive
    path, _, cfg = ingested
    p16 = tmp_path / "f16.zarr"
    ingest([root / "a_plain.tif"], p16, cfg.override(**{"store.dtype": "float16"}))
    f16 = open_store(p16)["fingerprint"].values
    ref = open_store(path)
    f32 = ref["fingerprint"].values[ref["image"].values == 0]
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, f32.astype(np.float16))


def test_local_cluster_equals_threads_and_runs_in_workers(archive, tmp_path, cluster_client, cfg):
    root, _ = archive
    path = tmp_path / "threads.zarr"
    client = cluster_client
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest([root], path, cfg)
        ingest([root], tmp_path / "local.zarr", cfg, client=client)
    built = client.run(embed.loaded_models)
    pids = client.run(os.getpid)
    assert os.getpid() not in pids.values()
    assert all(f"{cfg.model.arch}@cpu" in models for models in built.values()), built  # both workers did model work
    a, b = open_store(path), open_store(tmp_path / "local.zarr")
    for name in ("uid", "valid", "row", "col", "image", "lon", "lat"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    np.testing.assert_allclose(a["fingerprint"].values, b["fingerprint"].values, atol=1e-5)


def _corrupt_copy(tmp_path, data):
    """A deflate-compressed tiled GeoTIFF whose middle is garbage: the header and the last tile
    still read (so it passes the header probe) but chunks in the middle fail to decode."""
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=3, dtype="uint8",
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate")  # fmt: skip
    comp = tmp_path / "corrupt.tif"
    with rasterio.open(comp, "w", **profile) as dst:
        dst.write(data)
    raw = bytearray(comp.read_bytes())
    mid = len(raw) // 3
    raw[mid : mid + 4000] = os.urandom(4000)
    comp.write_bytes(bytes(raw))
    return comp


def test_unreadable_file_is_reported_and_the_rest_ingested(tmp_path, cfg):
    good = write_tif(tmp_path / "good.tif", textured(512, 512, seed=7))
    comp = _corrupt_copy(tmp_path, textured(1024, 1024, seed=8))
    target = tmp_path / "s.zarr"
    report = ingest([good, comp], target, cfg)
    assert [p for p, _ in report.failed] == [str(comp)] and "corrupt.tif: reading rows" in report.failed[0][1]
    ds = open_store(target)
    status = dict(zip(ds["image_path"].values.astype(object), ds["status"].values.astype(object)))
    assert status == {str(comp): "failed", str(good.resolve()): "done"}
    assert "corrupt.tif" in ds["error"].values.astype(object)[list(status).index(str(comp))]
    assert report.processed == 1 and report.tiles == 9


def test_strict_failure_never_shows_a_half_written_store_and_resumes(tmp_path, cfg):
    good = write_tif(tmp_path / "good.tif", textured(512, 512, seed=7))
    comp = _corrupt_copy(tmp_path, textured(1024, 1024, seed=8))
    target = tmp_path / "new.zarr"
    with pytest.raises(raster.RasterError, match=r"corrupt.tif: reading rows"):
        ingest([good, comp], target, cfg, strict=True)
    assert not target.exists()  # nothing at the final path
    partial = tmp_path / ".new.zarr.partial"
    assert partial.exists() and not (tmp_path / ".new.zarr.lock").exists()  # kept for resuming; lock released
    report = ingest([good], target, cfg)  # rerun without the bad file: resumes the partial store
    assert report.processed == 1 and target.exists() and not partial.exists()
    ds = open_store(target)  # corrupt.tif stays 'pending' (not in this run's sources): never searched
    status = dict(zip(ds["image_path"].values.astype(object), ds["status"].values.astype(object)))
    assert status == {str(comp): "pending", str(good.resolve()): "done"}


def test_overwrite_keeps_the_old_store_until_the_new_one_is_done(tmp_path, cfg):
    good = write_tif(tmp_path / "good.tif", textured(512, 512, seed=7))
    comp = _corrupt_copy(tmp_path, textured(1024, 1024, seed=8))
    target = tmp_path / "s.zarr"
    ingest([good], target, cfg)
    before = open_store(target)["uid"].values.copy()
    with pytest.raises(raster.RasterError, match="corrupt.tif"):
        ingest([comp], target, cfg, overwrite=True, strict=True)
    np.testing.assert_array_equal(open_store(target)["uid"].values, before)


def test_incremental_ingest_adds_new_skips_unchanged_and_replaces_changed(tmp_path, cfg):
    a = write_tif(tmp_path / "a.tif", textured(512, 512, seed=1))
    b = write_tif(tmp_path / "b.tif", textured(512, 640, seed=2))
    target = tmp_path / "s.zarr"
    first = ingest([a], target, cfg)
    assert (first.processed, first.skipped) == (1, 0)
    second = ingest([a, b], target, cfg)
    assert (second.processed, second.skipped, second.replaced) == (1, 1, 0)
    os.utime(a, (1, 1))  # "changed": new modification time (and new pixels)
    write_tif(a, textured(512, 512, seed=9))
    third = ingest([a, b], target, cfg)
    assert (third.processed, third.skipped, third.replaced) == (1, 1, 1)
    ds = open_store(target)
    status = ds["status"].values.astype(object).tolist()
    assert status == ["replaced", "done", "done"]  # ids never reused: a's new version is image 2
    # Searches see the new version only, and equal a fresh store of the current files.
    fresh = tmp_path / "fresh.zarr"
    ingest([a, b], fresh, cfg)
    f = open_store(fresh)
    live = np.isin(ds["image"].values, [1, 2]) & ds["valid"].values
    got = {(str(ds["image_path"].values[i]), int(r), int(c)): fp for i, r, c, fp in
           zip(ds["image"].values[live], ds["row"].values[live], ds["col"].values[live], ds["fingerprint"].values[live])}  # fmt: skip
    fv = f["valid"].values
    want = {(str(f["image_path"].values[i]), int(r), int(c)): fp for i, r, c, fp in
            zip(f["image"].values[fv], f["row"].values[fv], f["col"].values[fv], f["fingerprint"].values[fv])}  # fmt: skip
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5)


def test_second_writer_is_refused_and_a_crashed_writers_lock_recovered(tmp_path, cfg):
    import json
    import socket

    from pipeline.lock import StoreLock, lock_path

    img = write_tif(tmp_path / "i.tif", textured(256, 256))
    target = tmp_path / "s.zarr"
    with StoreLock(target):
        with pytest.raises(store.StoreError, match="being written by pid"):
            ingest([img], target, cfg)
    # A lock left by a process that no longer exists (crashed holder) is taken over.
    dead = json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "since": 0})
    lock_path(target).write_text(dead)
    assert ingest([img], target, cfg).processed == 1 and not lock_path(target).exists()
    # Another host's fresh lock is respected; once stale (not refreshed), it is taken over.
    lock_path(target).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    with pytest.raises(store.StoreError, match="on elsewhere"):
        ingest([img], target, cfg)
    os.utime(lock_path(target), (0, 0))
    assert ingest([img], target, cfg).skipped == 1


def test_refuses_non_store_and_other_models(tmp_path, cfg):
    img = write_tif(tmp_path / "i.tif", textured(256, 256))
    (tmp_path / "notastore").mkdir()
    with pytest.raises(store.StoreError, match="not a fingerprint store"):
        ingest([img], tmp_path / "notastore", cfg)
    ingest([img], tmp_path / "s.zarr", cfg)
    with pytest.raises(store.StoreError, match="never mix in one store"):
        ingest([img], tmp_path / "s.zarr", cfg.override(**{"model.arch": "resnet34"}))
    with pytest.raises(store.StoreError, match="does not exist"):
        open_store(tmp_path / "nope.zarr")
    with pytest.raises(store.StoreError, match="not a fingerprint store"):
        open_store(tmp_path / "notastore")


BAD_INPUTS = {
    # name: (writer, message pattern naming the file and the fix)
    "two_band.tif": (lambda p: write_tif(p, textured(300, 300, bands=2)), r"two_band.tif: has 2 band\(s\).*--bands"),
    "float.tif": (
        lambda p: write_tif(p, textured(300, 300, dtype="float32")),
        r"float.tif: pixels are float32.*--scale",
    ),
    "u16.tif": (lambda p: write_tif(p, textured(300, 300, dtype="uint16")), r"u16.tif: pixels are uint16.*--scale"),
    "text.tif": (lambda p: p.write_text("not a tiff"), r"text.tif: cannot be read as a raster.*complete GeoTIFF"),
    "cut.tif": (
        lambda p: p.write_bytes(write_tif(p.with_name("full.tif"), textured(1024, 1024)).read_bytes()[:200_000]),
        r"cut.tif: .*(complete GeoTIFF|re-copy)",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_refused_clearly_and_the_store_unchanged(tmp_path, cfg, name):
    good = write_tif(tmp_path / "good.tif", textured(512, 512, seed=3))
    target = tmp_path / "s.zarr"
    ingest([good], target, cfg)
    before = {k: open_store(target)[k].values.copy() for k in ("fingerprint", "valid", "uid", "status")}
    make, pattern = BAD_INPUTS[name]
    bad = tmp_path / "in" / name
    bad.parent.mkdir()
    make(bad)
    with pytest.raises(raster.RasterError, match=pattern):
        ingest([bad], target, cfg, strict=True)
    report = ingest([bad, good], target, cfg)  # not strict: reported, the rest goes on
    assert [p for p, _ in report.failed] == [str(bad)] and report.skipped == 1
    after = open_store(target)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k].values, v)
    assert any(f["path"] == str(bad) for f in after.attrs["last_ingest"]["failed"])  # also in the store


def test_rgbn_bands_float_scaling_black_image_and_empty_folder(tmp_path, cfg):
    rgbn = textured(300, 300, bands=4, seed=5)
    p = write_tif(tmp_path / "rgbn.tif", rgbn)
    ingest([p], tmp_path / "nrg.zarr", cfg.override(**{"tiling.bands": (4, 1, 2)}))
    ingest([p], tmp_path / "rgb.zarr", cfg)
    a, b = open_store(tmp_path / "nrg.zarr"), open_store(tmp_path / "rgb.zarr")
    assert a.attrs["preprocessing"]["bands"] == [4, 1, 2]
    assert np.abs(a["fingerprint"].values - b["fingerprint"].values).max() > 1e-3  # other bands, other fingerprint
    f = write_tif(tmp_path / "f.tif", (textured(300, 300, seed=6) / 255.0).astype("float32"))
    ingest([f], tmp_path / "f.zarr", cfg.override(**{"tiling.scale": (0.0, 1.0)}))
    ref = write_tif(tmp_path / "u8.tif", textured(300, 300, seed=6))
    ingest([ref], tmp_path / "u8.zarr", cfg)
    np.testing.assert_allclose(open_store(tmp_path / "f.zarr")["fingerprint"].values,
                               open_store(tmp_path / "u8.zarr")["fingerprint"].values, atol=1e-4)  # fmt: skip
    black = write_tif(tmp_path / "black.tif", np.zeros((3, 512, 512), np.uint8))
    r = ingest([black], tmp_path / "black.zarr", cfg)
    assert (r.windows, r.tiles, r.dropped) == (9, 0, 9)  # all windows dropped, the image done
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="holds no"), pytest.raises(raster.RasterError, match="no images found"):
        ingest([tmp_path / "empty"], tmp_path / "e.zarr", cfg)


def test_content_hash_option_ignores_touched_but_unchanged_files(tmp_path, cfg):
    a = write_tif(tmp_path / "a.tif", textured(512, 512, seed=1))
    target = tmp_path / "h.zarr"
    hashed = cfg.override(**{"store.content_hash": True})
    ingest([a], target, hashed)
    from pipeline.digest import sha256_file

    assert open_store(target)["sha256"].values.astype(object).tolist() == [sha256_file(str(a))]
    plain = tmp_path / "p.zarr"
    ingest([a], plain, cfg)
    os.utime(a, (5, 5))  # touched: same bytes, new mtime
    assert ingest([a], target, hashed).skipped == 1  # by content: unchanged
    assert ingest([a], plain, cfg).replaced == 1  # by size + mtime: changed
    write_tif(a, textured(512, 512, seed=2))
    assert ingest([a], target, hashed).replaced == 1


def test_a_grown_store_keeps_its_layout(flights, tmp_path, capsys):
    """Adding images with the default --chunk-px/--chunk-tiles to a store laid out otherwise: the
    store's layout is used (with a warning), so the new tiles are found by uid and batches pad
    to the store's chunks (the run's own layout made 10 of 15 new tiles unfindable and padded
    to 8,192 slots)."""
    from pipeline.cli import main
    from pipeline.search import SearchIndex

    grown, once = tmp_path / "g.zarr", tmp_path / "o.zarr"
    layout = ["--model", "probe", "--chunk-px", "384", "--chunk-tiles", "8", "--no-progress"]
    assert main(["ingest", str(flights / "a.tif"), "--store", str(grown), *layout]) == 0
    capsys.readouterr()
    assert main(["ingest", str(flights / "b.tif"), "--store", str(grown), "--model", "probe", "--no-progress"]) == 0
    assert "laid out with --chunk-tiles 8 --chunk-px 384" in capsys.readouterr().err
    assert main(["ingest", str(flights / "a.tif"), str(flights / "b.tif"), "--store", str(once), *layout]) == 0
    g, o = open_store(grown), open_store(once)
    assert g.sizes["tile"] <= o.sizes["tile"] + 8  # at most a chunk of padding between the two runs
    index = SearchIndex.open(str(grown))
    new = np.flatnonzero((g["image"].values == 1) & g["valid"].values)
    at = {int(u): i for i, u in enumerate(o["uid"].values)}
    for i in new:
        uid = int(g["uid"].values[i])
        assert index.slot_of(uid) == i
        np.testing.assert_array_equal(g["fingerprint"].values[i], o["fingerprint"].values[at[uid]])
