"""`read.decoder`: Pillow decodes local plain-RGB JPEG/PNG pixels (auto), GDAL everything else;
checked against rasterio's own reads, through ingest and the CLI, with corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from PIL import Image
from torchvision.io import decode_jpeg, read_file

from pipeline.cli import main
from pipeline.errors import RasterError
from pipeline.ingest import ingest
from pipeline.raster import RasterReader
from pipeline.store import open_store, set_attrs
from tests.conftest import textured


def _save(path, px: np.ndarray, cmyk: bool = False, **kw):
    im = Image.fromarray(np.ascontiguousarray(px.transpose(1, 2, 0)))
    (im.convert("CMYK") if cmyk else im).save(path, **kw)
    return path


def _gdal(path, rows, cols) -> np.ndarray:
    from rasterio.windows import Window

    with rasterio.open(path) as ds:
        return ds.read((1, 2, 3), window=Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0]))


@pytest.fixture()
def images(tmp_path):
    px = textured(300, 420, seed=11)
    return {
        "png": _save(tmp_path / "a.png", px),
        "jpeg": _save(tmp_path / "b.jpg", px, quality=90),  # 4:2:0 chroma, Pillow's default
        "jpeg444": _save(tmp_path / "d.jpg", px, quality=90, subsampling=0),
        "cmyk": _save(tmp_path / "c.jpg", px, quality=90, cmyk=True),
    }


def test_pillow_reads_equal_gdal_reads_and_gdal_decoder_never_calls_pillow(images, monkeypatch):
    windows = [((0, 300), (0, 420)), ((44, 300), (128, 384))]
    want = {k: [_gdal(p, r, c) for r, c in windows] for k, p in images.items()}
    real_open = rasterio.open

    def no_gdal_for_rgb(path, *a, **kw):  # auto must not decode plain RGB JPEG/PNG with GDAL
        if not str(path).endswith("c.jpg"):  # (the CMYK one)
            raise AssertionError(f"GDAL opened {path}")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(rasterio, "open", no_gdal_for_rgb)
    for k, p in images.items():
        reader = RasterReader(str(p))
        assert reader.uses_pillow
        for (r, c), w in zip(windows, want[k]):
            got = reader.read(r, c)
            assert got.shape == (4, r[1] - r[0], c[1] - c[0]) and (got[3] == 255).all()
            if k in ("png", "cmyk"):  # lossless; CMYK is not plain RGB, so GDAL decodes it: identical
                np.testing.assert_array_equal(got[:3], w)
            elif k == "jpeg444":  # no chroma subsampling: GDAL's libjpeg and Pillow's at most 1 level apart
                diff = np.abs(got[:3].astype(int) - w)
                assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
            else:  # 4:2:0: libjpeg-turbo's fancy chroma upsampling, as torchvision's decoder does it
                whole = decode_jpeg(read_file(str(p))).numpy()
                np.testing.assert_array_equal(got[:3], whole[:, r[0] : r[1], c[0] : c[1]])
    monkeypatch.setattr(rasterio, "open", real_open)

    def no_pillow(*a, **kw):
        raise AssertionError("Pillow opened a file with read.decoder gdal")

    monkeypatch.setattr(Image, "open", no_pillow)
    for k, p in images.items():
        got = RasterReader(str(p), decoder="gdal").read(*windows[1])
        np.testing.assert_array_equal(got[:3], want[k][1])
    # not eligible: other bands, a scale, a mask, a URI
    assert not RasterReader(str(images["png"]), bands=(1, 1, 1)).uses_pillow
    assert not RasterReader(str(images["png"]), masked=True).uses_pillow
    assert not RasterReader("s3://bucket/a.jpg").uses_pillow


def test_truncated_and_missing_jpegs_fail_with_the_file_named(images, tmp_path, cfg):
    raw = images["jpeg"].read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RasterError, match="cut.jpg: reading rows 0:300.*truncated or corrupt: re-copy it"):
        RasterReader(str(cut)).read((0, 300), (0, 420))
    with pytest.raises(RasterError, match="gone.jpg: does not exist.*relocate"):
        RasterReader(str(tmp_path / "gone.jpg")).read((0, 256), (0, 256))
    report = ingest([images["png"], cut], tmp_path / "s.zarr", cfg)  # the failing file fails alone
    assert [p for p, _ in report.failed] == [str(cut)] and "truncated or corrupt" in report.failed[0][1]
    ds = open_store(tmp_path / "s.zarr")
    status = dict(zip(ds["image_path"].values.astype(object), ds["status"].values.astype(object)))
    assert status == {str(cut): "failed", str(images["png"].resolve()): "done"}


def test_ingest_decoder_setting_through_the_cli(images, tmp_path):
    gdal_cfg = tmp_path / "gdal.yaml"
    gdal_cfg.write_text("read:\n  decoder: gdal\ncluster:\n  progress: false\n")
    stores = {}
    for name, extra in (("auto", []), ("gdal", ["--config", str(gdal_cfg)])):
        stores[name] = tmp_path / f"{name}.zarr"
        assert main(["ingest", str(images["png"]), str(images["jpeg444"]), "--store", str(stores[name]),
                     "--model", "probe", "--no-progress", *extra]) == 0  # fmt: skip
    auto, gdal = (open_store(stores[k]) for k in ("auto", "gdal"))
    # auto is resolved once per ingest and the store records what it chose (no GPU here: pillow)
    assert gdal.attrs["config"]["read"]["decoder"] == "gdal" and auto.attrs["config"]["read"]["decoder"] == "pillow"
    np.testing.assert_array_equal(auto["uid"].values, gdal["uid"].values)
    np.testing.assert_array_equal(auto["valid"].values, gdal["valid"].values)
    image = auto["image"].values
    png = image == 0  # sorted paths: a.png is image 0, d.jpg image 1
    np.testing.assert_array_equal(auto["fingerprint"].values[png], gdal["fingerprint"].values[png])
    np.testing.assert_allclose(auto["fingerprint"].values[~png], gdal["fingerprint"].values[~png], atol=1e-3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("read:\n  decoder: nvjpeg\n")
    assert main(["ingest", str(images["png"]), "--store", str(tmp_path / "x.zarr"), "--config", str(bad)]) == 2


def test_pillow_headers_equal_gdal_headers_and_anything_gdal_could_georeference_goes_to_gdal(images, tmp_path):
    from pipeline.raster import _pillow_header, read_header

    for k in ("png", "jpeg", "jpeg444"):
        assert _pillow_header(str(images[k])) is not None, k
        assert read_header(str(images[k])) == read_header(str(images[k]), "gdal"), k
    assert _pillow_header(str(images["cmyk"])) is None  # not RGB
    # a world file georeferences the JPEG: GDAL reads it, so does the auto header
    (tmp_path / "b.jgw").write_text("0.5\n0\n0\n-0.5\n400000.25\n3300000.75\n")
    assert _pillow_header(str(images["jpeg"])) is None
    assert read_header(str(images["jpeg"])).transform == (0.5, 0.0, 400000.0, 0.0, -0.5, 3300001.0)
    (tmp_path / "b.jgw").unlink()
    # PAM metadata (a nodata value) masks it: GDAL's header
    (tmp_path / "a.png.aux.xml").write_text(
        "<PAMDataset><PAMRasterBand band='1'><NoDataValue>0</NoDataValue></PAMRasterBand></PAMDataset>"
    )
    assert _pillow_header(str(images["png"])) is None and read_header(str(images["png"])).masked
    # transparency and bytes after a JPEG's end (where GDAL keeps its masks) also go to GDAL
    Image.open(images["jpeg444"]).save(tmp_path / "t.png", transparency=(1, 2, 3))
    assert _pillow_header(str(tmp_path / "t.png")) is None and read_header(str(tmp_path / "t.png")).masked
    tail = tmp_path / "tail.jpg"
    tail.write_bytes(images["jpeg444"].read_bytes() + b"\x00" * 8)
    assert _pillow_header(str(tail)) is None and read_header(str(tail)) == read_header(str(tail), "gdal")


def test_ucmerced_headers_are_the_same_through_pillow_and_gdal(data_dir):
    from pipeline.raster import _pillow_header, read_header

    paths = sorted(str(p) for p in (data_dir / "ucmerced").glob("*/*") if p.is_file())[::10]
    assert len(paths) >= 200
    assert all(_pillow_header(p) is not None for p in paths)
    assert [read_header(p) for p in paths] == [read_header(p, "gdal") for p in paths]


def test_a_grown_store_keeps_the_decoder_that_made_it(images, tmp_path, capsys):
    """A chroma-subsampled JPEG decodes differently through GDAL and Pillow. A store made with
    read.decoder gdal and grown with the default (auto) reads the new files with GDAL too, with
    a warning: a copy of a file already in the store gets the very same fingerprints. A store
    made before the setting existed (no decoder in its record) counts as GDAL-made."""
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(images["jpeg"].read_bytes())
    gdal_cfg = tmp_path / "gdal.yaml"
    gdal_cfg.write_text("read:\n  decoder: gdal\ncluster:\n  progress: false\n")
    s = tmp_path / "s.zarr"
    assert main(["ingest", str(images["jpeg"]), "--store", str(s), "--model", "probe", "--no-progress",
                 "--config", str(gdal_cfg)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["ingest", str(copy), "--store", str(s), "--model", "probe", "--no-progress"]) == 0
    assert "was read with read.decoder: gdal; this run reads with gdal too" in capsys.readouterr().err
    ds = open_store(s)
    assert ds.attrs["config"]["read"]["decoder"] == "gdal"
    fp, image = ds["fingerprint"].values, ds["image"].values
    np.testing.assert_array_equal(fp[image == 1], fp[image == 0])
    auto = tmp_path / "auto.zarr"  # the copy read with Pillow: not the store's fingerprints
    assert main(["ingest", str(copy), "--store", str(auto), "--model", "probe", "--no-progress"]) == 0
    assert np.abs(open_store(auto)["fingerprint"].values - fp[image == 0]).max() > 1e-3

    old = tmp_path / "old.zarr"  # as stores were before read.decoder: no decoder recorded
    assert main(["ingest", str(images["jpeg"]), "--store", str(old), "--model", "probe", "--no-progress",
                 "--config", str(gdal_cfg)]) == 0  # fmt: skip
    config = open_store(old).attrs["config"]
    del config["read"]["decoder"]
    set_attrs(old, config=config)
    capsys.readouterr()
    assert main(["ingest", str(copy), "--store", str(old), "--model", "probe", "--no-progress"]) == 0
    assert "was read with read.decoder: gdal" in capsys.readouterr().err
    ds = open_store(old)
    np.testing.assert_array_equal(ds["fingerprint"].values[ds["image"].values == 1], fp[image == 0])
