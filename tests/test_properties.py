"""Property-based tests (hypothesis): the grid arithmetic and uid packing against brute-force
enumerations, and damaged TIFF bytes against the ingest (a clear error, searches unchanged)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import textured, write_tif
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import Config, grid, ingest, open_store
from pipeline.errors import RasterError


@given(n=st.integers(0, 5000))
def test_windows_per_axis_counts_the_windows_inside_the_crop(n):
    crop = 256 * (n // 256)
    brute = len([start for start in range(0, max(crop, 0), 128) if start + 256 <= crop])
    assert grid.windows_per_axis(n) == brute


@given(n=st.integers(0, 6000), per=st.integers(2, 40))
def test_chunk_spans_partition_the_windows_and_read_core_plus_halo(n, per):
    chunk_px = per * 128
    spans = grid.chunk_spans(n, chunk_px)
    total = grid.windows_per_axis(n)
    assert [i for s in spans for i in range(s.first, s.first + s.count)] == list(range(total))  # each window once
    for s in spans:
        assert 1 <= s.count <= per and s.first % per == 0
        assert (s.start, s.stop) == (s.first * 128, (s.first + s.count - 1) * 128 + 256)  # its windows' pixels, no more
        assert s.stop <= 256 * (n // 256)


@given(
    image=st.integers(0, grid.MAX_IMAGE_ID),
    i=st.integers(0, grid.MAX_GRID_INDEX),
    j=st.integers(0, grid.MAX_GRID_INDEX),
)
def test_uid_pack_unpack_round_trip_and_formula(image, i, j):
    uid = grid.pack_uid(image, i * 128, j * 128)
    assert int(uid) == image * 2**40 + i * 2**20 + j  # the documented formula, in Python integers
    assert tuple(int(v) for v in grid.unpack_uid(uid)) == (image, i * 128, j * 128)


@given(h=st.integers(256, 1800), w=st.integers(256, 1800), per=st.integers(2, 12))
@settings(max_examples=60)
def test_slot_in_image_follows_chunks_row_major_then_windows_row_major(h, w, per):
    chunk_px = per * 128
    order = []  # brute force: the slot order the store layout documents
    for sy in grid.chunk_spans(h, chunk_px):
        for sx in grid.chunk_spans(w, chunk_px):
            for i in range(sy.first, sy.first + sy.count):
                for j in range(sx.first, sx.first + sx.count):
                    order.append((i * 128, j * 128))
    got = [grid.slot_in_image(r, c, h, w, chunk_px) for r, c in order]
    assert got == list(range(len(order)))
    assert grid.slot_in_image(64, 0, h, w, chunk_px) is None  # not on the grid
    assert grid.slot_in_image(grid.windows_per_axis(h) * 128, 0, h, w, chunk_px) is None  # past the last window


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    good = write_tif(root / "good.tif", textured(512, 512, seed=3))
    full = write_tif(root / "full.tif", textured(768, 512, seed=4), tiled=True)
    cfg = Config().override(**{"model.arch": "standin", "read.chunk_px": 256, "store.chunk_tiles": 4,
                               "cluster.progress": False})  # fmt: skip
    path = root / "base.zarr"
    ingest([good], path, cfg)
    return path, full.read_bytes(), cfg


@given(data=st.data())
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_damaged_tiff_bytes_give_a_clear_error_and_leave_searches_unchanged(good_store, tmp_path_factory, data):
    base, raw, cfg = good_store
    damaged = bytearray(raw)
    if data.draw(st.booleans(), label="truncate"):
        damaged = damaged[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        at = data.draw(st.integers(0, len(raw) - 1), label="offset")
        n = data.draw(st.integers(1, 4096), label="bytes")
        damaged[at : at + n] = data.draw(st.binary(min_size=n, max_size=n), label="garbage")
    work = tmp_path_factory.mktemp("dmg")
    path = work / "s.zarr"
    shutil.copytree(base, path)
    bad = work / "bad.tif"
    bad.write_bytes(bytes(damaged))
    before = open_store(path)
    keep = {n: before[n].values.copy() for n in ("fingerprint", "valid", "uid")}
    try:
        ingest([bad], path, cfg, strict=True)
    except RasterError as e:
        assert str(e).startswith(f"{bad}: ") and len(str(e)) > len(str(bad)) + 20, e  # names the file and why
    after = open_store(path)
    status = after["status"].values.astype(object)
    assert status[0] == "done"  # the finished image is untouched and still searchable
    n = len(keep["uid"])
    for name, v in keep.items():
        np.testing.assert_array_equal(after[name].values[:n], v)
    if len(status) > 1 and status[1] != "done":  # a failed read leaves the new image invisible
        assert status[1] == "pending"
