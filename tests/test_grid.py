"""Tile-grid arithmetic against brute-force enumeration."""

import numpy as np
import pytest

from pipeline import grid


@pytest.mark.parametrize("n", [0, 100, 255, 256, 257, 511, 512, 1000, 2780])
def test_windows_per_axis_formula(n):
    # Brute force: every origin o = 128 k with o + 256 <= the cropped size.
    cropped = 256 * (n // 256)
    brute = len([o for o in range(0, max(cropped, 1), 128) if o + 256 <= cropped])
    assert grid.windows_per_axis(n) == brute == (max(0, 2 * (n // 256) - 1))


@pytest.mark.parametrize("n", [256, 700, 1000, 2299, 2780, 5000])
@pytest.mark.parametrize("chunk_px", [256, 384, 512, 2048])
def test_chunk_spans_cut_every_window_once(n, chunk_px):
    spans = grid.chunk_spans(n, chunk_px)
    owned = [s.first + k for s in spans for k in range(s.count)]
    assert owned == list(range(grid.windows_per_axis(n)))  # each window exactly once, in order
    for s in spans:
        assert s.start == s.first * 128
        assert s.stop - s.start == (s.count + 1) * 128  # core + 128 px halo
        assert s.stop - s.start <= chunk_px + 128
        assert s.stop <= 256 * (n // 256)  # never beyond the crop
        assert s.start % 128 == 0


@pytest.mark.parametrize("chunk_px", [100, 200, 300])
def test_chunk_spans_refuse_misaligned_chunks(chunk_px):
    with pytest.raises(ValueError, match="multiple of 128"):
        grid.chunk_spans(1000, chunk_px)


def test_uid_roundtrip_and_formula():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 2**23, 1000)
    row = rng.integers(0, 2**20, 1000) * 128
    col = rng.integers(0, 2**20, 1000) * 128
    uid = grid.pack_uid(img, row, col)
    assert uid.dtype == np.uint64
    expect = [int(i) * 2**40 + (int(r) // 128) * 2**20 + int(c) // 128 for i, r, c in zip(img, row, col)]
    assert [int(u) for u in uid] == expect
    i2, r2, c2 = grid.unpack_uid(uid)
    np.testing.assert_array_equal(i2, img)
    np.testing.assert_array_equal(r2, row)
    np.testing.assert_array_equal(c2, col)


def test_window_nodata_counts_equal_brute_force():
    rng = np.random.default_rng(1)
    nodata = rng.random((640, 512)) < 0.3
    got = grid.window_nodata_counts(nodata)
    assert got.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            assert got[i, j] == nodata[i * 128 : i * 128 + 256, j * 128 : j * 128 + 256].sum()
