"""Lazy reads: sources, headers, bad files, and chunk blocks against rasterio reads."""

import numpy as np
import pytest
import rasterio
from conftest import textured, write_tif

from pipeline import grid, raster
from pipeline.ingest.graph import lazy_overlapped


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
    raster.check_image(grey, (1, 1, 1), None)
    u16 = raster.read_header(str(write_tif(tmp_path / "u16.tif", textured(300, 300, dtype="uint16"))))
    with pytest.raises(raster.RasterError, match=r"u16.tif.*uint16.*--scale"):
        raster.check_image(u16, (1, 2, 3), None)
    raster.check_image(u16, (1, 2, 3), (0, 255))
    small = raster.read_header(str(write_tif(tmp_path / "small.tif", textured(200, 900))))
    with pytest.warns(UserWarning, match="small.tif.*no tiles"):
        raster.check_image(small, (1, 2, 3), None)


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


READS: list[int] = []


class CountingReader(raster.RasterReader):
    """Records how many pixels each read returns (module level: dask may pickle the task)."""

    def read(self, rows, cols):
        out = super().read(rows, cols)
        READS.append(out.shape[1] * out.shape[2])
        return out


def test_lazy_overlapped_blocks_are_chunk_plus_halo(tmp_path):
    h, w = 1100, 900
    data = textured(h, w)
    path = write_tif(tmp_path / "img.tif", data, tiled=True)

    reads = READS
    reads.clear()
    reader = CountingReader(str(path))
    arr = lazy_overlapped(reader, h, w, 384)
    ys, xs = grid.chunk_spans(h, 384), grid.chunk_spans(w, 384)
    assert arr.numblocks == (1, len(ys), len(xs))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            block = arr.blocks[0, i, j].compute(scheduler="sync")
            np.testing.assert_array_equal(block[:3], data[:, y.start : y.stop, x.start : x.stop])
            assert reads[-1] == (y.stop - y.start) * (x.stop - x.start) <= (384 + 128) ** 2
    # Every pixel of the crop is read at most (1 + halo/core)^2 times, never the whole image per task.
    assert len(reads) == len(ys) * len(xs)
    with rasterio.open(path) as ds:
        assert ds.width == w
