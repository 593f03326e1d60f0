"""Lazy reads: sources, headers, bad files, and chunk blocks against rasterio reads."""

import re

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline import raster


def test_expand_sources_folder_list_and_duplicates(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    p1 = write_tif(tmp_path / "a" / "one.tif", textured(300, 300))
    p2 = write_tif(tmp_path / "a" / "deep" / "Two.TIFF", textured(300, 300, 1))
    (tmp_path / "a" / "notes.md").write_text("x")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{p1}\n\na/deep/Two.TIFF\n")
    with pytest.warns(UserWarning, match="duplicate"):
        got = raster.expand_sources([tmp_path / "a", lst, p1])
    assert got == sorted([str(p1.resolve()), str(p2.resolve())])
    with pytest.raises(raster.RasterError, match="does not exist"):
        raster.expand_sources([tmp_path / "missing.tif"])


def _picture(path, seed=0, size=300):
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(textured(size, size, seed).transpose(1, 2, 0))).save(path)
    return path


def test_a_folder_without_geotiffs_gives_its_jpeg_and_png_images(tmp_path):
    scenes = tmp_path / "scenes"
    (scenes / "beach").mkdir(parents=True)
    (scenes / "forest").mkdir()
    pictures = [_picture(scenes / "beach" / "b1.jpg"), _picture(scenes / "forest" / "F2.PNG", 1)]
    (scenes / "labels.csv").write_text("x")
    assert raster.expand_sources([scenes]) == sorted(str(p.resolve()) for p in pictures)
    # beside GeoTIFFs, JPEG/PNG files are previews: left out, with a warning that says how to take them
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    tif = write_tif(mixed / "scene.tif", textured(300, 300))
    preview = _picture(mixed / "scene_preview.jpg")
    with pytest.warns(UserWarning, match=r"1 JPEG/PNG file\(s\) beside its 1 GeoTIFF\(s\) left out.*\.txt"):
        assert raster.expand_sources([mixed]) == [str(tif.resolve())]
    (tmp_path / "list.txt").write_text("mixed/scene_preview.jpg\n")
    assert raster.expand_sources([tmp_path / "list.txt"]) == [str(preview.resolve())]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x")
    with pytest.warns(UserWarning, match=r"holds no \*\.tif/\*\.tiff \(or \*\.jpg"):
        assert raster.expand_sources([tmp_path / "docs"]) == []


def test_header_and_bad_files(tmp_path):
    good = write_tif(tmp_path / "g.tif", textured(300, 520))
    info = raster.read_header(str(good))
    assert (info.width, info.height, info.count, info.dtype) == (520, 300, 3, "uint8")
    assert info.crs == "EPSG:32617" and not info.masked and info.n_windows == 1 * 3

    fake = tmp_path / "fake.tif"
    fake.write_text("not an image")
    with pytest.raises(raster.RasterError, match="fake.tif.*complete GeoTIFF"):
        raster.read_header(str(fake))

    big = write_tif(tmp_path / "big.tif", textured(1024, 1024))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(raster.RasterError, match="cut.tif"):
        raster.read_header(str(cut))


def test_check_image_bands_and_dtype(tmp_path):
    grey = raster.read_header(str(write_tif(tmp_path / "grey.tif", textured(300, 300, bands=1))))
    with pytest.raises(raster.RasterError, match=r"grey.tif.*1 band.*\[1, 1, 1\]"):
        raster.check_image(grey, (1, 2, 3), None)
    assert raster.check_image(grey, (1, 1, 1), None) == []
    u16 = raster.read_header(str(write_tif(tmp_path / "u16.tif", textured(300, 300, dtype="uint16"))))
    with pytest.raises(raster.RasterError, match=r"u16.tif.*uint16.*--scale"):
        raster.check_image(u16, (1, 2, 3), None)
    raster.check_image(u16, (1, 2, 3), (0, 255))
    small = raster.read_header(str(write_tif(tmp_path / "small.tif", textured(200, 900))))
    [(kind, note)] = raster.check_image(small, (1, 2, 3), None)
    assert kind == "small" and re.search("small.tif.*no tiles", note)


def test_reader_matches_rasterio_and_masks(tmp_path):
    data = textured(700, 650, bands=4)
    data[3] = 255
    data[3, :100, :] = 0  # alpha: top 100 rows transparent
    path = write_tif(tmp_path / "rgba.tif", data, alpha=True)
    info = raster.read_header(str(path))
    assert info.masked
    reader = raster.RasterReader(str(path), (1, 2, 3), None, info.masked)
    block = reader.read((0, 384), (128, 640))
    np.testing.assert_array_equal(block[:3], data[:3, 0:384, 128:640])
    np.testing.assert_array_equal(block[3] == 0, data[3, 0:384, 128:640] == 0)

    nod = data[:3].copy()
    nod[:, 200:300, :] = 7
    path2 = write_tif(tmp_path / "nodata.tif", nod, nodata=7)
    reader2 = raster.RasterReader(str(path2), (1, 2, 3), None, raster.read_header(str(path2)).masked)
    block2 = reader2.read((0, 512), (0, 512))
    assert (block2[3, 200:300] == 0).all() and (block2[3, :200] == 255).all()


def test_uint16_scaling(tmp_path):
    data = (textured(300, 300).astype(np.uint16) * 16).astype(np.uint16)
    path = write_tif(tmp_path / "u16.tif", data)
    block = raster.RasterReader(str(path), (1, 2, 3), (0.0, 4080.0)).read((0, 256), (0, 256))
    expect = np.clip(np.round(data[:, :256, :256] / 16.0), 0, 255)
    np.testing.assert_array_equal(block[:3], expect)
