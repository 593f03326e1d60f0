"""Decoding on the device (``read.decoder: device``, pipeline.decode) on the CPU, where CI runs the
same code (``$AERIAL_SEARCH_DECODE_DEVICE=cpu``: torchvision's libjpeg-turbo decoder): the
byte-level tile reader against GDAL's own block offsets, sizes and JPEGTables and against GDAL's
decode of the same tiles; the ingest through the CLI (resolution, fallbacks with their reasons,
the store's record, growth, refusals, corrupt files). The ``gpu`` test compares nvJPEG's
fingerprints with the CPU's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import textured
from PIL import Image
from rasterio.windows import Window

from pipeline import decode
from pipeline.cli import main
from pipeline.errors import RasterError
from pipeline.store import open_store

torch = pytest.importorskip("torch")
pytest.importorskip("tifffile")

TRANSFORM = Affine(0.1, 0, 400000, 0, -0.1, 3300000)


def write(path, data, **opts):
    kw = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
          "dtype": str(data.dtype), "crs": "EPSG:32617", "transform": TRANSFORM, **opts}  # fmt: skip
    with rasterio.open(path, "w", **kw) as f:
        f.write(data)
    return path


@pytest.fixture(scope="module")
def tifs(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-decode")
    img = textured(700, 900, seed=21)
    tiled = {"tiled": True, "blockxsize": 256, "blockysize": 256}
    return {
        "ycbcr": write(root / "ycbcr.tif", img, compress="JPEG", photometric="YCBCR", **tiled),
        "rgb": write(root / "rgb.tif", img, compress="JPEG", photometric="RGB", **tiled),
        "strips": write(root / "strips.tif", img, compress="JPEG", photometric="RGB", blockysize=64),
        "deflate": write(root / "deflate.tif", img, compress="DEFLATE", **tiled),
        "lzw": write(root / "lzw.tif", img, compress="LZW"),
        "nodata": write(root / "nodata.tif", img, compress="JPEG", photometric="RGB", nodata=0, **tiled),
        "image": img,
    }


def gdal(path, rows, cols):
    with rasterio.open(path) as ds:
        return ds.read(window=Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0]))


@pytest.mark.parametrize("kind", ["ycbcr", "rgb", "strips"])
def test_tile_layout_equals_gdals_block_offsets_sizes_and_tables(tifs, kind):
    """tifffile's offsets, byte counts and JPEGTables against GDAL's TIFF metadata of each block;
    the raw bytes through fsspec (object storage's ranged reads) equal the local reads."""
    import fsspec

    path = str(tifs[kind])
    layout = decode.layout_of(path)
    assert isinstance(layout, decode.TileLayout), layout
    assert (layout.width, layout.height) == (900, 700)
    with rasterio.open(path) as ds:
        bw, bh = ds.block_shapes[0][1], ds.block_shapes[0][0]
        assert (layout.block_w, layout.block_h) == (bw, bh)
        across, down = -(-900 // bw), -(-700 // bh)
        assert len(layout.offsets) == across * down
        for y in range(down):
            for x in range(across):
                i = y * across + x
                assert layout.offsets[i] == int(ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1))
                assert layout.counts[i] == int(ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=1))
        assert layout.tables.hex().upper() == ds.get_tag_item("JPEGTABLES", "TIFF", bidx=1)
    assert layout.photometric == ("YCbCr" if kind == "ycbcr" else "RGB")
    uri = f"memory://decode/{kind}.tif"
    with fsspec.open(uri, "wb") as f:
        f.write(tifs[kind].read_bytes())
    remote = decode.layout_of(uri)
    some = [0, len(layout.offsets) // 2, len(layout.offsets) - 1]
    assert remote.offsets == layout.offsets and remote.raw(some) == layout.raw(some)
    streams = layout.streams(some)
    assert all(s[:2] == b"\xff\xd8" and s[-2:] == b"\xff\xd9" for s in streams)


@pytest.mark.parametrize("kind", ["ycbcr", "rgb", "strips"])
def test_regions_decoded_on_the_device_path_equal_gdals_decode(tifs, kind, monkeypatch):
    """Regions across block edges, at the image's edge (partial blocks) and whole: an RGB JPEG
    decodes exactly as GDAL decodes it; a YCbCr (4:2:0) one as libjpeg-turbo decodes each block
    (GDAL's upsampling of the chroma differs by about a level on average)."""
    monkeypatch.setenv(decode.DEVICE_ENV, "cpu")
    path = str(tifs[kind])
    regions = [((0, 700), (0, 900)), ((128, 640), (100, 612)), ((300, 700), (640, 900)), ((250, 260), (250, 260))]
    got = decode.read_regions([decode.Request(path, r, c) for r, c in regions])
    layout = decode.layout_of(path)
    for (r, c), block in zip(regions, got):
        block = block.numpy()
        assert block.shape == (4, r[1] - r[0], c[1] - c[0]) and (block[3] == 255).all()
        want = gdal(path, r, c)
        if kind != "ycbcr":
            np.testing.assert_array_equal(block[:3], want)
            continue
        diff = np.abs(block[:3].astype(int) - want)
        assert diff.mean() < 2.0, diff.mean()
        for i, y0, x0 in layout.blocks_for(r, c):  # each block as Pillow (libjpeg-turbo) decodes the merged stream
            pil = np.asarray(Image.open(io.BytesIO(layout.streams([i])[0])).convert("RGB")).transpose(2, 0, 1)
            ya, yb, xa, xb = max(r[0], y0), min(r[1], y0 + layout.block_h, 700), max(c[0], x0), min(c[1], x0 + layout.block_w, 900)
            np.testing.assert_array_equal(block[:3, ya - r[0] : yb - r[0], xa - c[0] : xb - c[0]],
                                          pil[:, ya - y0 : yb - y0, xa - x0 : xb - x0])  # fmt: skip


def test_support_names_why_a_file_stays_on_the_cpu(tifs, tmp_path):
    def why(key, bands=(1, 2, 3), masked=False):
        return decode.support(str(tifs[key]), bands, None, masked, 3, "uint8")

    assert why("ycbcr") is None and why("rgb") is None and why("strips") is None
    assert "deflate" in why("deflate") and "LZW" in why("lzw") and "nvCOMP" in why("deflate")
    assert "mask" in why("rgb", masked=True) and "bands" in why("rgb", bands=(1, 1, 1))
    Image.fromarray(tifs["image"][:, :300, :300].transpose(1, 2, 0)).save(tmp_path / "a.png")
    Image.fromarray(tifs["image"][:, :300, :300].transpose(1, 2, 0)).save(tmp_path / "a.jpg", quality=90)
    assert "PNG" in decode.support(str(tmp_path / "a.png"), (1, 2, 3), None, False, 3, "uint8")
    assert decode.support(str(tmp_path / "a.jpg"), (1, 2, 3), None, False, 3, "uint8") is None
    assert decode.support(str(tmp_path / "a.jpg"), (1, 2, 3), (0, 255), False, 3, "uint8") is not None


@pytest.fixture(scope="module")
def mixed(tifs, tmp_path_factory):
    """An archive for the ingest: JPEG GeoTIFFs (RGB tiled, YCbCr tiled), a deflate one, plain JPEG
    chips and a PNG."""
    root = tmp_path_factory.mktemp("mixed")
    files = {k: root / tifs[k].name for k in ("rgb", "ycbcr", "deflate")}
    for k, p in files.items():
        p.write_bytes(tifs[k].read_bytes())
    img = tifs["image"]
    for i in range(3):
        Image.fromarray(img[:, 100 * i : 100 * i + 256, :256].transpose(1, 2, 0)).save(root / f"chip{i}.jpg", quality=92,
                                                                                       subsampling=0)  # fmt: skip
    Image.fromarray(img[:, :256, 300:556].transpose(1, 2, 0)).save(root / "chip.png")
    return root


def run_ingest(sources, store, *extra):
    return main(["ingest", *map(str, sources), "--store", str(store), "--model", "probe", "--no-progress",
                 "--chunk-px", "384", *extra])  # fmt: skip


def by_path(store):
    ds = open_store(store)
    paths = [str(p) for p in ds["image_path"].values]
    image, valid, fp = ds["image"].values, ds["valid"].values, ds["fingerprint"].values
    return {paths[i].rsplit("/", 1)[-1]: (fp[image == i], valid[image == i]) for i in range(len(paths))}


def test_ingest_with_the_device_decoder_through_the_cli(mixed, tmp_path, monkeypatch, capsys):
    """``--decoder device`` (the device path on the CPU here): JPEG GeoTIFFs and JPEG chips go
    through :func:`pipeline.decode.read_regions` (one batched decode per unit), the rest through
    the CPU path with one warning per reason; the store records ``device``; the fingerprints equal
    those of the CPU decoders where the decodes are equal (RGB JPEG tiles: GDAL's; JPEG chips:
    Pillow's; deflate and PNG: the very same path)."""
    monkeypatch.setenv(decode.DEVICE_ENV, "cpu")
    calls = []
    real = decode.read_regions

    def spy(requests, device=None):
        calls.append([r.path.rsplit("/", 1)[-1] for r in requests])
        return real(requests, device)

    monkeypatch.setattr(decode, "read_regions", spy)
    files = sorted(mixed.iterdir())
    dev, cpu = tmp_path / "device.zarr", tmp_path / "pillow.zarr"
    assert run_ingest(files, dev, "--decoder", "device") == 0
    err = capsys.readouterr().err
    assert "read.decoder device: 1 file(s) decoded on the CPU instead: deflate compression" in err
    assert "read.decoder device: 1 file(s) decoded on the CPU instead: PNG" in err
    decoded = {name for call in calls for name in call}
    assert decoded == {"rgb.tif", "ycbcr.tif", "chip0.jpg", "chip1.jpg", "chip2.jpg"}
    assert any(len(call) == 3 for call in calls)  # the chips of one unit in one batch
    assert open_store(dev).attrs["config"]["read"]["decoder"] == "device"
    calls.clear()
    assert run_ingest(files, cpu, "--decoder", "pillow") == 0 and not calls
    assert open_store(cpu).attrs["config"]["read"]["decoder"] == "pillow"
    a, b = by_path(dev), by_path(cpu)
    for name in ("rgb.tif", "deflate.tif", "chip0.jpg", "chip1.jpg", "chip2.jpg", "chip.png"):
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
    # YCbCr 4:2:0 tiles: libjpeg-turbo's chroma upsampling against GDAL's, close fingerprints
    fa, fb = a["ycbcr.tif"][0], b["ycbcr.tif"][0]
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    assert cos.min() > 0.99, cos.min()
    # dense mode reads the same device blocks
    calls.clear()
    dense = tmp_path / "dense.zarr"
    assert run_ingest([mixed / "rgb.tif"], dense, "--decoder", "device", "--mode", "dense") == 0 and calls
    dense_cpu = tmp_path / "dense-cpu.zarr"
    assert run_ingest([mixed / "rgb.tif"], dense_cpu, "--decoder", "gdal", "--mode", "dense") == 0
    np.testing.assert_array_equal(open_store(dense)["fingerprint"].values, open_store(dense_cpu)["fingerprint"].values)


def test_auto_resolves_once_and_a_grown_store_keeps_its_decoder(mixed, tmp_path, monkeypatch, capsys):
    """``auto`` takes the device where the workers decode there and a source does; the store
    records the choice, and growing it keeps it: without a GPU for it, growth is refused, naming
    the fix, and the store is unchanged."""
    s = tmp_path / "s.zarr"
    monkeypatch.setenv(decode.DEVICE_ENV, "cpu")
    assert run_ingest([mixed / "rgb.tif"], s) == 0
    assert open_store(s).attrs["config"]["read"]["decoder"] == "device"
    only_png = tmp_path / "png.zarr"  # nothing decodes on the device: auto is pillow
    assert run_ingest([mixed / "chip.png"], only_png) == 0
    assert open_store(only_png).attrs["config"]["read"]["decoder"] == "pillow"
    monkeypatch.delenv(decode.DEVICE_ENV)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: growth would decode there")
    before = open_store(s).sizes["img"]
    capsys.readouterr()
    assert run_ingest([mixed / "ycbcr.tif"], s) == 2
    err = capsys.readouterr().err
    assert "was read with read.decoder: device" in err and "--decoder device (read.decoder: device) needs a CUDA GPU" in err
    assert open_store(s).sizes["img"] == before


def test_the_device_decoder_without_cuda_is_refused_before_any_store_is_touched(mixed, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    store = tmp_path / "never.zarr"
    assert run_ingest([mixed / "rgb.tif"], store, "--decoder", "device") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "--decoder auto" in err[0]
    assert not any(tmp_path.iterdir())  # no store, no partial store, no lock


def test_a_corrupt_jpeg_tile_fails_its_file_alone_with_the_file_named(mixed, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(decode.DEVICE_ENV, "cpu")
    bad = tmp_path / "bad.tif"
    data = bytearray((mixed / "rgb.tif").read_bytes())
    layout = decode.layout_of(str(mixed / "rgb.tif"))
    off, n = layout.offsets[5], layout.counts[5]
    data[off + n // 3 : off + n] = b"\x00" * (n - n // 3)  # the entropy-coded data of one tile zeroed, its EOI too
    bad.write_bytes(bytes(data))
    with pytest.raises(RasterError, match="bad.tif"):
        decode.read_regions([decode.Request(str(bad), (0, 700), (0, 900))])
    s = tmp_path / "s.zarr"
    assert run_ingest([bad, mixed / "chip0.jpg"], s, "--decoder", "device") == 1
    assert "bad.tif" in capsys.readouterr().out
    ds = open_store(s)
    status = {str(p): str(s) for p, s in zip(ds["image_path"].values, ds["status"].values)}
    assert status[str(bad)] == "failed" and status[str(mixed / "chip0.jpg")] == "done"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_fingerprints_match_the_cpu_decode(mixed, tmp_path):
    """nvJPEG against libjpeg-turbo on the same streams: pixels within a few levels, ResNet-free
    probe fingerprints with cosine >= 0.999 (gpu_ingest.py measures ResNet-18's)."""
    for kind in ("rgb.tif", "ycbcr.tif", "chip0.jpg"):
        path = str(mixed / kind)
        r, c = ((0, 512), (0, 768)) if kind.endswith(".tif") else ((0, 256), (0, 256))
        cpu = decode.read_regions([decode.Request(path, r, c)], "cpu")[0].numpy().astype(int)
        gpu = decode.read_regions([decode.Request(path, r, c)], "cuda")[0].cpu().numpy().astype(int)
        assert np.abs(cpu - gpu).mean() < 1.0, kind
    dev, cpu = tmp_path / "d.zarr", tmp_path / "c.zarr"
    assert run_ingest(sorted(mixed.iterdir()), dev, "--decoder", "device") == 0
    assert run_ingest(sorted(mixed.iterdir()), cpu, "--decoder", "pillow") == 0
    a, b = open_store(dev)["fingerprint"].values, open_store(cpu)["fingerprint"].values
    keep = np.linalg.norm(b, axis=1) > 0
    cos = (a[keep] * b[keep]).sum(1) / np.linalg.norm(a[keep], axis=1) / np.linalg.norm(b[keep], axis=1)
    assert cos.mean() >= 0.999, cos.mean()
