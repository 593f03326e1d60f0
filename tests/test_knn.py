"""The k-NN graph by inverted lists (pipeline.knn, `postprocess --knn K`) against NumPy brute force:
exact where every cell is probed, high recall and exact distances where few are, overlap
exclusion as search does it on overlapping flights, and growth that equals a rebuild."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline import grid, knn
from pipeline.cli import main
from pipeline.search import SearchIndex
from pipeline.search.kernels import overlaps
from pipeline.store import open_store


def manifold(n, seed=0, latent=8):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((latent, 64)) / np.sqrt(latent)
    return np.maximum(rng.standard_normal((n, latent)) @ w + 0.1 * rng.standard_normal((n, 64)), 0).astype(np.float32)


def grid_tiles(x):
    n = len(x)
    per = 20 * 20
    img = np.arange(n) // per
    within = np.arange(n) % per
    row, col = (within // 20) * 128, (within % 20) * 128
    return knn.Tiles(x, grid.pack_uid(img, row, col), np.full(n, np.nan), np.full(n, np.nan), np.ones(n, bool),
                     img, row, col, np.full(img.max() + 1, np.nan))  # fmt: skip


def brute(tiles, k, rows=None):
    """Each row's k nearest other valid rows, overlapping ones excluded, ties by uid."""
    x = tiles.x.astype(np.float64)
    out_nb, out_d = [], []
    for q in range(len(x)) if rows is None else rows:
        d = np.sqrt(((x - x[q]) ** 2).sum(1))
        im = tiles.image
        d[overlaps(im, tiles.row, tiles.col, tiles.lon, tiles.lat, tiles.half_m[im], tiles.image[q], tiles.row[q],
                   tiles.col[q], tiles.lon[q], tiles.lat[q], tiles.half_m[tiles.image[q]])] = np.inf  # fmt: skip
        d[q] = np.inf
        d[~tiles.valid] = np.inf
        order = np.lexsort((tiles.uid, d))[:k]
        order = order[np.isfinite(d[order])]
        out_nb.append(np.pad(order, (0, k - len(order)), constant_values=-1))
        out_d.append(np.pad(d[order], (0, k - len(order)), constant_values=np.inf))
    return np.array(out_nb), np.array(out_d)


def test_every_cell_probed_gives_the_exact_graph():
    tiles = grid_tiles(manifold(1500))
    nb, dist, cells, cell = knn.build(tiles, 12)
    assert cells.count == 38 and knn.nprobe_for(cells.count) == 38 and (cell >= 0).all()
    want_nb, want_d = brute(tiles, 12)
    np.testing.assert_array_equal(nb, want_nb)
    np.testing.assert_allclose(dist, want_d, rtol=1e-9)


def test_few_cells_probed_keep_a_high_recall_and_exact_distances(monkeypatch):
    """A quarter of the cells probed: most true neighbours found; every reported distance is the
    exact distance of that pair, lists ascending, no tile its own neighbour, no overlapping one."""
    monkeypatch.setattr(knn, "NPROBE", 10)
    tiles = grid_tiles(manifold(1600, seed=3))
    nb, dist, cells, _ = knn.build(tiles, 10)
    assert knn.nprobe_for(cells.count) == 10 < cells.count
    want_nb, _ = brute(tiles, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nb, want_nb)])
    assert recall > 0.9, recall
    x = tiles.x.astype(np.float64)
    np.testing.assert_allclose(dist, np.sqrt(((x[nb] - x[:, None]) ** 2).sum(-1)), rtol=1e-9)
    assert (np.diff(dist, axis=1) >= 0).all() and not (nb == np.arange(len(nb))[:, None]).any()
    same = (tiles.image[nb] == tiles.image[:, None]) & (np.abs(tiles.row[nb] - tiles.row[:, None]) < 256) & (
        np.abs(tiles.col[nb] - tiles.col[:, None]) < 256)  # fmt: skip
    assert not same.any()


def test_update_equals_a_build_and_only_new_tiles_are_searched(monkeypatch):
    tiles = grid_tiles(manifold(1200, seed=5))
    old = np.arange(1200) < 900
    first = knn.Tiles(**{**tiles.__dict__, "valid": old})
    nb, dist, cells, cell = knn.build(first, 8)
    asked = []
    real = knn._lists

    def spy(t, z, k, cells_, cell_, queries, targets, progress=None):
        asked.append(len(queries))
        return real(t, z, k, cells_, cell_, queries, targets, progress)

    monkeypatch.setattr(knn, "_lists", spy)
    new = np.flatnonzero(~old)
    got_nb, got_d, got_cell = knn.update(tiles, 8, nb, dist, new, cells, cell)
    assert asked == [300]  # the new tiles' own lists; the old ones only take offers
    want_nb, want_d = brute(tiles, 8)
    np.testing.assert_array_equal(got_nb, want_nb)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-9)
    assert (got_cell >= 0).all()


@pytest.fixture(scope="module")
def overlapping(flights, ingest_store):
    return ingest_store(flights)


def _tiles_of(path):
    index = SearchIndex.open(str(path))
    ds = index.ds
    x = index.postprocess.apply(ds["fingerprint"].values.astype(np.float32))
    return knn.Tiles(x, ds["uid"].values, ds["lon"].values, ds["lat"].values, ds["valid"].values.astype(bool),
                     *(ds[v].values.astype(np.int64) for v in ("image", "row", "col")), index.half_m)  # fmt: skip


def test_the_graph_of_overlapping_flights_excludes_what_search_excludes(overlapping, tmp_path):
    """The shared archive (overlapping flights on the ground, a no-CRS image and its twin):
    postprocess --knn equals a brute force with search's overlap rule, uids and cosines."""
    path = shutil.copytree(overlapping, tmp_path / "s.zarr")
    assert main(["postprocess", "--store", str(path), "--method", "l2", "--knn", "6"]) == 0
    tiles = _tiles_of(path)
    ds = open_store(path)
    valid = np.flatnonzero(tiles.valid)
    want_nb, _ = brute(tiles, 6, valid)
    got = ds["knn_uid"].values[valid]
    sims = ds["knn_sim"].values[valid]
    for w, g, s in zip(want_nb, got, sims):
        n = int((w >= 0).sum())
        np.testing.assert_array_equal(g[:n], tiles.uid[w[:n]])
        assert np.isnan(s[n:]).all()
    meta = ds.attrs["postprocess"]["knn"]
    assert meta["method"] == "ivf" and meta["k"] == 6 and "cells" in meta
    assert (ds["knn_cell"].values[valid] >= 0).all()


def test_a_grown_store_grows_its_graph_through_the_cli(overlapping, flights, tmp_path, capsys):
    """Images added: postprocess --knn K grows the graph (the new tiles searched, old lists
    offered the new tiles) and it equals a graph built from scratch; removing an image redoes the
    tiles that had neighbours there."""
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(flights / "a.tif"), str(flights / "c_far.tif"), "--store", str(path), "--model",
                 "probe", "--chunk-px", "384", "--chunk-tiles", "8", "--no-progress"]) == 0  # fmt: skip
    assert main(["postprocess", "--store", str(path), "--knn", "5"]) == 0
    extra = write_tif(tmp_path / "z_new.tif", textured(640, 640, seed=77), crs=None, transform=None)
    assert main(["ingest", str(extra), str(flights / "b.tif"), "--store", str(path), "--model", "probe",
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["postprocess", "--store", str(path), "--knn", "5"]) == 0
    out = capsys.readouterr().out
    assert "grown by" in out
    ds = open_store(path)
    assert ds.attrs["postprocess"]["knn"]["grown_by"] == int(ds["valid"].values[ds["image"].values >= 2].sum())
    tiles = _tiles_of(path)
    valid = np.flatnonzero(tiles.valid)
    want_nb, _ = brute(tiles, 5, valid)
    got = ds["knn_uid"].values[valid]
    for w, g in zip(want_nb, got):
        n = int((w >= 0).sum())
        np.testing.assert_array_equal(g[:n], tiles.uid[w[:n]])
