"""Search against a NumPy brute force over the same store, with the same filters."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import Config, grid, ingest, open_store
from pipeline.cli import main
from pipeline.search import Filters, SearchError, SearchIndex


@pytest.fixture(scope="module")
def archive(flights):
    """The shared archive (conftest.write_flights): two overlapping flights a and b, a far image
    with dropped windows (c_far), a geographic one (d_geo), one without a CRS (e_nocrs) and its
    identical copy (f_copy: ties)."""
    return flights


def _cfg(dtype="float32", chunk_tiles=4):
    return Config().override(
        **{
            "model.arch": "probe", "model.weights": "random",
            "read.chunk_px": 384,
            "store.chunk_tiles": chunk_tiles,
            "store.dtype": dtype,
            "cluster.progress": False,
        }
    )


@pytest.fixture(scope="module")
def stores(flights, ingest_store):
    return {"float32": ingest_store(flights, chunk_tiles=4),
            "float16": ingest_store(flights, dtype="float16", chunk_tiles=7)}  # fmt: skip


def load(path):
    ds = open_store(path)
    names = ("fingerprint", "valid", "uid", "image", "row", "col", "lon", "lat", "transform", "crs")
    return ds, {n: ds[n].values for n in names}


def footprint(t, row, col, transform):
    """Ground box (xmin, xmax, ymin, ymax) of a window from its image's affine (oracle)."""
    a, _, c, _, e, f = transform
    x0, x1 = c + a * col, c + a * (col + 256)
    y0, y1 = f + e * row, f + e * (row + 256)
    return min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)


def overlap_oracle(s, q):
    """Tiles overlapping tile q: same image within 256 px, or intersecting ground boxes (same CRS)."""
    n = len(s["uid"])
    out = np.zeros(n, bool)
    qb = footprint(None, s["row"][q], s["col"][q], s["transform"][s["image"][q]])
    for t in range(n):
        if s["image"][t] == s["image"][q]:
            out[t] = abs(int(s["row"][t]) - int(s["row"][q])) < 256 and abs(int(s["col"][t]) - int(s["col"][q])) < 256
        elif s["crs"][s["image"][t]] and s["crs"][s["image"][q]]:
            tb = footprint(None, s["row"][t], s["col"][t], s["transform"][s["image"][t]])
            out[t] = tb[0] < qb[1] and qb[0] < tb[1] and tb[2] < qb[3] and qb[2] < tb[3]
    return out


def brute(s, qvec, k, allowed):
    x = s["fingerprint"].astype(np.float64)
    d = np.sqrt(((x - qvec.astype(np.float64)) ** 2).sum(1))
    idx = np.flatnonzero(allowed & s["valid"])
    order = idx[np.lexsort((s["uid"][idx], d[idx]))][:k]
    return s["uid"][order], d[order]


def check(res, uids, dists):
    np.testing.assert_array_equal(res.uid, uids)
    np.testing.assert_allclose(res.value, dists, rtol=1e-4, atol=1e-3)


def _memory_vectors(n: int = 240, d: int = 24) -> np.ndarray:
    x = np.maximum(np.random.default_rng(5).standard_normal((n, d)), 0).astype(np.float32)
    x[200:212] = x[:12]  # exact duplicates: ties, broken by uid
    return x


@pytest.mark.parametrize("chunk", [3, 32, 512])
@pytest.mark.parametrize("split_every", [2, 3, 16])
@pytest.mark.parametrize("k", [1, 12, 60, 1000])
def test_engine_without_a_store_equals_numpy(chunk, split_every, k):
    """The whole engine (blocks, per-chunk top-k, the tree of merges, finalize, threshold mode)
    on fingerprints in memory (pipeline.search.memory), against a NumPy brute force: chunk sizes
    from one row to the whole set, fan-ins, k below a chunk, above it and beyond the set."""
    from pipeline.search import Queries
    from pipeline.search.memory import memory_dataset

    x = _memory_vectors()
    uid = grid.pack_uid(np.arange(len(x)), 0, 0)
    index = SearchIndex(memory_dataset(x, chunk=chunk), split_every=split_every)
    q = np.concatenate([x[[0, 3]], np.random.default_rng(k).standard_normal((2, x.shape[1])).astype(np.float32)])
    d = np.sqrt(((x[None].astype(np.float64) - q[:, None]) ** 2).sum(-1))
    for j, res in enumerate(index.search(Queries.from_fingerprints(q), k)):
        order = np.lexsort((uid, d[j]))[:k]
        np.testing.assert_array_equal(res.uid, uid[order])
        np.testing.assert_allclose(res.value, d[j, order], rtol=1e-5, atol=1e-6)
    cut = float(np.median(d))
    for j, res in enumerate(index.search(Queries.from_fingerprints(q), None, max_distance=cut, limit=k)):
        passed = np.flatnonzero(d[j] <= cut)
        assert res.total == len(passed)
        np.testing.assert_array_equal(res.uid, uid[passed[np.lexsort((uid[passed], d[j, passed]))][:k]])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("k", [1, 10, 40])
def test_topk_equals_brute_force(stores, dtype, k):
    """The engine on real stores (chunk sizes 4 and 7, the small arrays in chunks of 16 times
    that, overlap exclusion, statuses); chunk x split_every x k is covered without a store above."""
    split_every = 3
    ds, s = load(stores[dtype])
    index = SearchIndex(ds, split_every=split_every)
    assert ds["fingerprint"].encoding["chunks"][0] < k or k < 10  # k larger than a chunk
    rng = np.random.default_rng(k)
    qslots = rng.choice(np.flatnonzero(s["valid"]), 3, replace=False)
    queries, labels = index.queries_from_uids([int(s["uid"][q]) for q in qslots])
    results = index.search(queries, k, labels=labels)
    for q, res in zip(qslots, results):
        uids, d = brute(s, s["fingerprint"][q], k, ~overlap_oracle(s, q))
        check(res, uids, d)
        assert res.query["uid"] == str(int(s["uid"][q]))


def test_overlapping_flight_tiles_are_excluded_unless_asked(stores):
    ds, s = load(stores["float32"])
    index = SearchIndex(ds)
    # A tile of a.tif that b.tif also covers: b holds the same pixels shifted.
    q = int(np.flatnonzero((s["image"] == 0) & (s["row"] == 256) & (s["col"] == 384))[0])
    ov = overlap_oracle(s, q)
    assert ov[s["image"] == 1].any()  # the other flight does overlap on the ground
    queries, _ = index.queries_from_uids([int(s["uid"][q])])
    [res] = index.search(queries, 15)
    assert not np.isin(res.uid, s["uid"][ov]).any()
    check(res, *brute(s, s["fingerprint"][q], 15, ~ov))
    [incl] = index.search(queries, 15, Filters(include_overlapping=True))
    check(incl, *brute(s, s["fingerprint"][q], 15, np.ones_like(ov)))
    assert incl.uid[0] == s["uid"][q] and incl.value[0] == 0.0


def nms_oracle(s, ranked_slots, k):
    keep = []
    for t in ranked_slots:
        if len(keep) == k:
            break
        if not any(overlap_oracle(s, t)[keep]):
            keep.append(t)
    return keep


def test_diverse_returns_k_non_overlapping_results(stores):
    ds, s = load(stores["float32"])
    index = SearchIndex(ds)
    q = int(np.flatnonzero(s["valid"] & (s["image"] == 2))[0])
    allowed = ~overlap_oracle(s, q) & s["valid"]
    x = s["fingerprint"].astype(np.float64)
    d = np.sqrt(((x - x[q]) ** 2).sum(1))
    idx = np.flatnonzero(allowed)
    ranked = idx[np.lexsort((s["uid"][idx], d[idx]))]
    k = 6
    expect = nms_oracle(s, ranked, k)
    assert len(expect) == k
    queries, _ = index.queries_from_uids([int(s["uid"][q])])
    [res] = index.search(queries, k, diverse=True)
    np.testing.assert_array_equal(res.uid, s["uid"][expect])
    [plain] = index.search(queries, k)
    assert not np.array_equal(plain.uid, res.uid)  # without NMS neighbours crowd in


def test_bbox_and_image_filters(stores):
    ds, s = load(stores["float32"])
    index = SearchIndex(ds)
    q = int(np.flatnonzero(s["valid"] & (s["image"] == 0))[3])
    lon, lat = s["lon"][s["valid"] & (s["image"] <= 1)], s["lat"][s["valid"] & (s["image"] <= 1)]
    bbox = (float(np.median(lon)), float(lat.min()), float(lon.max()), float(np.median(lat)))
    queries, _ = index.queries_from_uids([int(s["uid"][q])])
    [res] = index.search(queries, 50, Filters(bbox=bbox))
    inside = (s["lon"] >= bbox[0]) & (s["lon"] <= bbox[2]) & (s["lat"] >= bbox[1]) & (s["lat"] <= bbox[3])
    check(res, *brute(s, s["fingerprint"][q], 50, inside & ~overlap_oracle(s, q)))
    assert 0 < len(res) < 50  # fewer candidates than k: all of them
    ids = index.image_ids_matching("*nocrs*")
    [res2] = index.search(queries, 5, Filters(image_ids=ids))
    check(res2, *brute(s, s["fingerprint"][q], 5, s["image"] == ids[0]))


def test_ties_broken_by_uid_and_k_beyond_candidates(stores):
    ds, s = load(stores["float32"])
    index = SearchIndex(ds)
    d_id, e_id = 4, 5  # identical images (e_nocrs, f_copy): every d tile has an exact twin in e
    q = int(np.flatnonzero(s["image"] == d_id)[4])
    twin = np.flatnonzero((s["image"] == e_id) & (s["row"] == s["row"][q]) & (s["col"] == s["col"][q]))[0]
    np.testing.assert_array_equal(s["fingerprint"][q], s["fingerprint"][twin])
    queries, _ = index.queries_from_uids([int(s["uid"][q])])
    [res] = index.search(queries, 10_000)
    assert len(res) == (s["valid"] & ~overlap_oracle(s, q)).sum()
    check(res, *brute(s, s["fingerprint"][q], 10_000, ~overlap_oracle(s, q)))
    assert res.uid[0] == s["uid"][twin] and res.value[0] == 0.0
    # Tiles with equal distance appear in uid order.
    same = res.value[1:] == res.value[:-1]
    assert np.all(res.uid[1:][same] > res.uid[:-1][same])
    with pytest.raises(SearchError, match="positive"):
        index.search(queries, 0)


def test_persisted_index_and_local_cluster_equal_threads(stores, cluster_client):
    from pipeline.cluster import Runtime

    ds, s = load(stores["float32"])
    plain = SearchIndex(ds)
    uids = [int(u) for u in s["uid"][s["valid"]][::9]]
    queries, _ = plain.queries_from_uids(uids)
    ref = plain.search(queries, 7)
    mem = SearchIndex(ds).persist().search(queries, 7)
    rt = Runtime("client", client=cluster_client, progress=False)
    dist = SearchIndex(ds, runtime=rt, split_every=2).search(queries, 7)
    dist_mem = SearchIndex(ds, runtime=rt).persist().search(queries, 7)
    for a, b, c, d in zip(ref, mem, dist, dist_mem):
        for other in (b, c, d):
            np.testing.assert_array_equal(a.uid, other.uid)
            np.testing.assert_allclose(a.value, other.value, rtol=1e-6)


def test_slot_of_matches_a_scan(stores):
    ds, s = load(stores["float16"])
    index = SearchIndex(ds)
    real = np.flatnonzero(s["image"] >= 0)  # slots between batches are padding (image -1)
    assert len(real) < len(s["uid"])  # this store has several batches
    for slot in real[::5]:
        assert index.slot_of(int(s["uid"][slot])) == slot
    with pytest.raises(SearchError, match="names image 99"):
        index.slot_of(99 * 2**40)
    with pytest.raises(SearchError, match="not a window"):
        index.slot_of(int(grid.pack_uid(0, 128 * 50, 0)))


def test_cli_json_sheet_and_lonlat(stores, tmp_path, capsys):
    from PIL import Image

    from pipeline.render import GAP, LABEL_H, read_tile

    ds, s = load(stores["float32"])
    q = int(np.flatnonzero(s["valid"] & (s["image"] == 4))[0])  # no CRS: lon/lat null in JSON
    out_json, out_png = tmp_path / "r.json", tmp_path / "sheet.png"
    k = 4
    rc = main(["search", "--store", str(stores["float32"]), "-k", str(k), "--uid", str(int(s["uid"][q])),
               "--json", str(out_json), "--sheet", str(out_png), "--no-progress"])  # fmt: skip
    assert rc == 0
    doc = json.loads(out_json.read_text())
    assert doc["query"]["uid"] == str(int(s["uid"][q]))
    assert [r["rank"] for r in doc["results"]] == list(range(1, k + 1))
    uids, d = brute(s, s["fingerprint"][q], k, ~overlap_oracle(s, q))
    assert [r["uid"] for r in doc["results"]] == [str(int(u)) for u in uids]
    np.testing.assert_allclose([r["distance"] for r in doc["results"]], d, rtol=1e-4)
    first = doc["results"][0]
    if first["image_path"].endswith(("e_nocrs.tif", "f_copy.tif")):
        assert first["lon"] is None and first["lat"] is None
    img = np.asarray(Image.open(out_png).convert("RGB"))
    cols = k + 1
    assert img.shape[1] == GAP + cols * (256 + GAP)  # k + 1 tiles in one row
    for i, r in enumerate([None] + doc["results"]):  # every cell shows the right window
        y, x = GAP + LABEL_H, GAP + i * (256 + GAP)
        tile = img[y : y + 256, x : x + 256].transpose(2, 0, 1)
        if r is None:
            expect = read_tile(str(ds["image_path"].values[s["image"][q]]), int(s["row"][q]), int(s["col"][q]))
        else:
            expect = read_tile(r["image_path"], r["row"], r["col"])
        np.testing.assert_array_equal(tile, expect)

    # --lonlat picks the tile centred nearest the point; far away is an error naming the distance.
    t = int(np.flatnonzero(s["valid"] & (s["image"] == 2))[2])
    capsys.readouterr()
    assert main(["search", "--store", str(stores["float32"]), "-k", "2", f"--lonlat={s['lon'][t] + 1e-6},{s['lat'][t]}",
                 "--json", str(out_json)]) == 0  # fmt: skip
    assert json.loads(out_json.read_text())["query"]["uid"] == str(int(s["uid"][t]))
    # a western longitude as a separate argument (argparse alone would take it for a flag)
    assert s["lon"][t] < 0
    assert main(["search", "--store", str(stores["float32"]), "-k", "2", "--lonlat", f"{s['lon'][t]},{s['lat'][t]}",
                 "--json", str(out_json)]) == 0  # fmt: skip
    assert json.loads(out_json.read_text())["query"]["uid"] == str(int(s["uid"][t]))
    assert main(["search", "--store", str(stores["float32"]), "--lonlat", "10,10"]) == 2
    assert re.search(r"nearest tile centre is \d+ m away", capsys.readouterr().err)


def test_image_query_uses_the_store_model(stores, archive, tmp_path):
    from PIL import Image

    ds, s = load(stores["float32"])
    q = int(np.flatnonzero(s["valid"] & (s["image"] == 0))[5])
    from pipeline.render import read_tile

    px = read_tile(str(ds["image_path"].values[0]), int(s["row"][q]), int(s["col"][q]))
    png = tmp_path / "q.png"
    Image.fromarray(px.transpose(1, 2, 0)).save(png)
    out = tmp_path / "r.json"
    assert main(["search", "--store", str(stores["float32"]), "-k", "3", "--image", str(png),
                 "--include-overlapping", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["results"][0]["uid"] == str(int(s["uid"][q])) and doc["results"][0]["distance"] < 1e-3
    assert doc["query"]["type"] == "image"


def test_bad_queries_are_clear(stores, archive, tmp_path, capsys):
    ds, s = load(stores["float32"])
    store = str(stores["float32"])
    cases = [
        (["--uid", str(7 * 2**40)], "names image 7"),
        (["--uid", "abc"], "uids must be integers"),
        (["--image", str(tmp_path / "missing.png")], "does not exist"),
        (["--lonlat", "0,0"], "m away"),
        ([], "no query given"),
        (["--uid", str(int(s["uid"][0])), "-k", "0"], "positive"),
    ]
    bad_png = tmp_path / "bad.png"
    bad_png.write_text("not a png")
    cases.append((["--image", str(bad_png)], "cannot be read"))
    dropped = int(s["uid"][~s["valid"] & (s["image"] >= 0)][0])
    cases.append((["--uid", str(dropped)], "dropped window"))
    for extra, msg in cases:
        capsys.readouterr()
        assert main(["search", "--store", store] + extra) == 2, extra
        assert msg in capsys.readouterr().err, (extra, msg)
    # A store made by another model: its tiles are not comparable.
    other = tmp_path / "other.zarr"
    ingest([archive / "a.tif"], other, _cfg().override(**{"model.arch": "standin"}))
    capsys.readouterr()
    other_uid = str(int(open_store(other)["uid"].values[0]))
    assert main(["search", "--store", store, "--query-store", str(other), "--uid", other_uid]) == 2
    err = capsys.readouterr().err
    assert "fingerprinted differently" in err and "standin" in err
    # Fingerprints of another dimension through the API.
    from pipeline.search import Queries

    with pytest.raises(SearchError, match="2048 dimensions but the store holds 512-d"):
        SearchIndex.open(store).search(Queries.from_fingerprints(np.zeros((1, 2048))), 3)


def _numpy_post(method: str, x: np.ndarray, valid: np.ndarray, dims: int = 16) -> np.ndarray:
    x = x.astype(np.float64)
    if method == "l2":
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, n, out=np.zeros_like(x), where=n > 0)
    if method == "hellinger":
        return _numpy_post("l2", np.sqrt(x), valid)
    c = x - x[valid].mean(0)
    val, vec = np.linalg.eigh(np.cov(c[valid], rowvar=False))
    top = np.argsort(val)[::-1][:dims]
    return _numpy_post("l2", c @ (vec[:, top] / np.sqrt(val[top] + 1e-6)), valid)


@pytest.mark.parametrize("method", ["l2", "hellinger", "pca"])
def test_store_postprocessing_applies_at_search_time(stores, tmp_path, method):
    """postprocess fits into the store; search ranks as NumPy does on the transformed raw fingerprints."""
    from pipeline.derived import fit_store

    path = tmp_path / "p.zarr"
    shutil.copytree(stores["float32"], path)
    ds, s = load(path)
    t = fit_store(str(path), method, dims=16)
    assert open_store(path).attrs["postprocess"]["method"] == method and t.method == method
    np.testing.assert_array_equal(open_store(path)["fingerprint"].values, s["fingerprint"])  # raw kept
    index = SearchIndex.open(str(path))
    xt = _numpy_post(method, s["fingerprint"], s["valid"])
    for q in np.flatnonzero(s["valid"])[[2, 17]]:
        queries, _ = index.queries_from_uids([int(s["uid"][q])])
        [res] = index.search(queries, 8)
        allowed = ~overlap_oracle(s, q)
        uids, d = brute({**s, "fingerprint": xt}, xt[q], 8, allowed)
        np.testing.assert_array_equal(res.uid, uids)
        np.testing.assert_allclose(res.value, d, atol=1e-4)
    raw = SearchIndex.open(str(path))
    raw.use_post = False
    [r0] = raw.search(index.queries_from_uids([int(s["uid"][q])])[0], 8)
    check(r0, *brute(s, s["fingerprint"][q], 8, ~overlap_oracle(s, q)))


def test_query_expansion_in_search_equals_numpy(stores):
    ds, s = load(stores["float32"])
    index = SearchIndex(ds)
    q = int(np.flatnonzero(s["valid"])[9])
    allowed = ~overlap_oracle(s, q)
    first, _ = brute(s, s["fingerprint"][q], 3, allowed)
    x = s["fingerprint"].astype(np.float64)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    qn = unit(x[q])
    acc = qn.copy()
    for u in first:
        nb = unit(x[np.flatnonzero(s["uid"] == u)[0]])
        acc += max(float(qn @ nb), 0.0) ** 3.0 * nb
    expanded = unit(acc)
    queries, _ = index.queries_from_uids([int(s["uid"][q])])
    [res] = index.search(queries, 6, expand=(3, 3.0))
    check(res, *brute(s, expanded.astype(np.float32), 6, allowed))


def test_database_side_augmentation_is_a_rebuildable_derived_array(stores, tmp_path):
    """postprocess --dba: each tile becomes alpha-QE of itself and its nearest tiles (overlaps
    excluded); search ranks with those vectors; the raw fingerprints are untouched."""
    from pipeline.cli import main

    path = tmp_path / "d.zarr"
    shutil.copytree(stores["float32"], path)
    ds, s = load(path)
    assert main(["postprocess", "--store", str(path), "--method", "l2", "--dba", "3", "--alpha", "1"]) == 0
    dba = open_store(path)["fingerprint_dba"].values
    xn = _numpy_post("l2", s["fingerprint"], s["valid"])
    expect = np.zeros_like(xn)
    for t in np.flatnonzero(s["valid"]):
        near, _ = brute({**s, "fingerprint": xn}, xn[t], 3, ~overlap_oracle(s, t))
        acc = xn[t].copy()
        for u in near:
            nb = xn[np.flatnonzero(s["uid"] == u)[0]]
            acc += max(float(xn[t] @ nb), 0.0) * nb
        expect[t] = acc / np.linalg.norm(acc)
    np.testing.assert_allclose(dba, expect, atol=1e-5)
    q = int(np.flatnonzero(s["valid"])[5])
    index = SearchIndex.open(str(path))
    [res] = index.search(index.queries_from_uids([int(s["uid"][q])])[0], 5)
    uids, d = brute({**s, "fingerprint": expect}, xn[q].astype(np.float32), 5, ~overlap_oracle(s, q))
    np.testing.assert_array_equal(res.uid, uids)
    np.testing.assert_array_equal(open_store(path)["fingerprint"].values, s["fingerprint"])


def test_same_search_twice_is_bit_identical_and_store_block_names_are_stable(stores):
    from pipeline.search.graph import store_blocks

    a, b = SearchIndex.open(str(stores["float32"])), SearchIndex.open(str(stores["float32"]))
    ds, s = load(stores["float32"])
    queries, _ = a.queries_from_uids([int(u) for u in s["uid"][s["valid"]][::11]])
    first, second = a.search(queries, 9), a.search(queries, 9)
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x.uid, y.uid)
        assert x.value.tobytes() == y.value.tobytes()  # bit-equal, not merely close
    blocks_a, blocks_b = store_blocks(a.ds), store_blocks(b.ds)
    assert [blk.key for blk in blocks_a] == [blk.key for blk in blocks_b]
    assert set(blocks_a[0].dask.layers) == set(blocks_b[0].dask.layers)  # every layer name, reads included
    assert str(blocks_a[0].key[0]).startswith("store-block-")


def test_a_new_scorer_plugs_into_the_same_reduction(stores):
    """The scorer seam: a scorer that ranks by negative inner product, through the engine's map
    and tree reduction, equals a NumPy brute force; the reduction never learns what it ranked."""
    from dataclasses import dataclass
    from typing import ClassVar

    from pipeline.search.kernels import Exclusions
    from pipeline.search.scorers import as_float32

    @dataclass(frozen=True)
    class NegDot:
        queries: np.ndarray
        name: ClassVar[str] = "score"

        def __len__(self):
            return len(self.queries)

        def scores(self, block):
            return -(as_float32(block["fingerprint"]).astype(np.float64) @ self.queries.T.astype(np.float64))

        def exact(self, block, rows, j):
            return -(as_float32(block["fingerprint"][rows]).astype(np.float64) @ self.queries[j].astype(np.float64))

        def report(self, score):
            return score

    ds, s = load(stores["float32"])
    index = SearchIndex(ds, split_every=2)
    q = np.random.default_rng(3).random((2, 512)).astype(np.float32)
    none = Exclusions(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.int64, np.int64, float, float, float)))
    got = index.topk(NegDot(q), 12, Filters(), none)
    x = s["fingerprint"].astype(np.float64)
    for j, res in enumerate(got):
        score = -(x @ q[j].astype(np.float64))
        idx = np.flatnonzero(s["valid"])
        order = idx[np.lexsort((s["uid"][idx], score[idx]))][:12]
        np.testing.assert_array_equal(res["uid"], s["uid"][order])
        np.testing.assert_allclose(res["score"], score[order], rtol=1e-12)


def test_dba_follows_the_store_growth_and_is_marked_stale(archive, tmp_path, capsys):
    """postprocess --dba, then ingest one more image: the store still opens for search, info and
    postprocess; search ignores the stale DBA and says how to rebuild it; a rerun rebuilds it."""
    path = tmp_path / "g.zarr"
    ingest([archive / "a.tif", archive / "c_far.tif"], path, _cfg())
    assert main(["postprocess", "--store", str(path), "--method", "l2", "--dba", "2"]) == 0
    ingest([archive / "b.tif"], path, _cfg())  # grows the tile arrays
    ds, s = load(path)  # opens: fingerprint_dba grew with the store
    assert ds["fingerprint_dba"].shape[0] == ds.sizes["tile"]
    capsys.readouterr()
    assert main(["info", "--store", str(path)]) == 0
    assert "fingerprint_dba is stale" in capsys.readouterr().out
    q = int(np.flatnonzero(s["valid"] & (s["image"] == 1))[0])  # a tile of the new image (b is image 1)
    xn = _numpy_post("l2", s["fingerprint"], s["valid"])
    index = SearchIndex.open(str(path))
    with pytest.warns(UserWarning, match=r"fingerprint_dba is stale.*postprocess --store STORE --method l2 --dba 2"):
        [res] = index.search(index.queries_from_uids([int(s["uid"][q])])[0], 6)
    uids, d = brute({**s, "fingerprint": xn}, xn[q], 6, ~overlap_oracle(s, q))  # plain l2: no stale DBA
    np.testing.assert_array_equal(res.uid, uids)
    np.testing.assert_allclose(res.value, d, atol=1e-4)
    capsys.readouterr()
    assert main(["search", "--store", str(path), "--uid", str(int(s["uid"][q])), "-k", "3"]) == 0
    assert "fingerprint_dba is stale" in capsys.readouterr().err
    assert main(["postprocess", "--store", str(path), "--method", "l2", "--dba", "2"]) == 0
    rebuilt = open_store(path)
    assert "stale" not in rebuilt.attrs["postprocess"]["dba"]
    assert np.abs(rebuilt["fingerprint_dba"].values[q]).sum() > 0  # the new tile is augmented now


def test_a_store_left_with_a_short_dba_array_still_opens(stores, tmp_path):
    """Stores grown by an older release kept a fingerprint_dba shorter than the tiles: they open,
    with the array left out and reported stale."""
    import zarr

    from pipeline.store import consolidate
    from pipeline.summary import summarize

    path = tmp_path / "old.zarr"
    shutil.copytree(stores["float32"], path)
    assert main(["postprocess", "--store", str(path), "--method", "l2", "--dba", "2"]) == 0
    g = zarr.open_group(str(path), mode="r+")
    g["fingerprint_dba"].resize((g["fingerprint"].shape[0] - 5, 512))  # what the old grow() left
    consolidate(path)  # as `aerial-search migrate` does for such a store
    ds = open_store(path)
    assert "fingerprint_dba" not in ds and ds.sizes["tile"] == g["fingerprint"].shape[0]
    assert "stale" in summarize(path)["derived"]["fingerprint_dba"]
    uid = int(ds["uid"].values[np.flatnonzero(ds["valid"].values)[0]])
    assert main(["search", "--store", str(path), "--uid", str(uid), "-k", "2"]) == 0


def test_search_tasks_share_the_cores_with_blas(stores):
    """Tasks of the threaded scheduler that each run a multi-threaded BLAS oversubscribe the cores
    (1M tiles in two blocks on 2 cores: 107 ms against 68 ms with one BLAS thread per block). While
    a search computes, NumPy's BLAS has the cores shared by the blocks that run at once (threadpoolctl,
    read inside the scorer, is the oracle); outside, its own setting again. The answers do not change."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import dataclasses

    from pipeline import resources
    from pipeline.cluster import Runtime
    from pipeline.search.scorers import L2Scorer

    seen = []

    @dataclasses.dataclass(frozen=True)
    class Recording(L2Scorer):
        def scores(self, block):
            seen.append(threadpoolctl.threadpool_info())
            return super().scores(block)

    def blas(info):  # NumPy's BLAS (its wheel's copy), not SciPy's
        mine = [i for i in info if i["user_api"] == "blas" and "numpy" in Path(i["filepath"]).parent.name]
        return {i["num_threads"] for i in mine or [i for i in info if i["user_api"] == "blas"]}

    before = blas(threadpoolctl.threadpool_info())
    cores = resources.cpu_count()
    n = open_store(stores["float32"]).sizes["tile"]
    for threads, block_rows in ((2, -(-n // 2)), (2, n), (1, n), (None, n)):
        runtime = Runtime("threads", dask_threads=threads) if threads else None
        index = SearchIndex.open(str(stores["float32"]), runtime=runtime).persist(block_rows=block_rows)
        queries, _ = index.queries_from_uids([int(index.ds["uid"].values[index.ds["valid"].values][0])])
        seen.clear()
        [res] = index.run(Recording(queries.fingerprints), queries.exclusions(), k=5)
        running = min(threads or cores, len(index.blocks()))
        assert seen and all(blas(info) == {max(1, cores // running)} for info in seen), (threads, block_rows, seen)
        [plain] = index.search(queries, k=5)
        assert np.array_equal(res.uid, plain.uid)
    assert blas(threadpoolctl.threadpool_info()) == before
    # overlapping limits in two threads, either leaving first: limited while one is in, restored by the last out
    for a_leaves_first in (False, True):
        inside = _overlapping_blas_limits(resources, lambda: blas(threadpoolctl.threadpool_info()), a_leaves_first)
        assert inside == {1} and blas(threadpoolctl.threadpool_info()) == before, (a_leaves_first, inside)
    assert resources.threads_per_task(2, 1, cores=2) == 2 and resources.threads_per_task(2, 5, cores=2) == 1
    assert resources.threads_per_task(4, None, cores=16) == 4 and resources.threads_per_task(8, 3, cores=2) == 1


def test_float16_rows_are_multiplied_a_cached_step_at_a_time():
    """float16 blocks (a persisted float16 index) are converted and multiplied a few hundred rows
    at a time, never as a whole float32 copy: the products, the norms and every scorer's top-k
    against float64 NumPy over a block of more rows than a step and not a multiple of it."""
    pytest.importorskip("torch")
    from pipeline.search import scorers
    from pipeline.search.kernels import Exclusions, Filters, chunk_topk

    assert scorers.use_torch_conversion()
    rng = np.random.default_rng(3)
    n = scorers.PRODUCT_ROWS_MANY * 2 + 77
    x16 = np.maximum(rng.standard_normal((n, 64)), 0).astype(np.float16)
    x = x16.astype(np.float64)
    for m in (1, 40):  # few queries: small steps; many: larger ones
        a = rng.standard_normal((64, m)).astype(np.float32)
        got, norms = scorers.products(x16, a, norms=True)
        assert got.dtype == np.float32 and got.shape == (n, m)
        np.testing.assert_allclose(got, x @ a.astype(np.float64), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(norms, (x**2).sum(1), rtol=1e-5)
    valid = rng.random(n) > 0.1
    block = {"fingerprint": x16, "valid": valid, "uid": np.arange(n, dtype=np.uint64) * 7,
             "lon": np.full(n, np.nan), "lat": np.full(n, np.nan)}  # fmt: skip
    q = np.maximum(rng.standard_normal((2, 64)), 0).astype(np.float32)
    pos, neg = (q[:1] + 0.1).astype(np.float32), np.maximum(rng.standard_normal((2, 64)), 0).astype(np.float32)
    coef, icpt = rng.standard_normal((1, 64)).astype(np.float32), np.zeros(1)
    d = ((x[:, None, :] - q[None].astype(np.float64)) ** 2).sum(-1)
    near = np.sqrt(((x[:, None] - pos[None].astype(np.float64)) ** 2).sum(-1)).min(1) - 0.5 * np.sqrt(
        ((x[:, None] - neg[None].astype(np.float64)) ** 2).sum(-1)).min(1)  # fmt: skip
    lin = -(x @ coef[0].astype(np.float64))
    for scorer, oracle in ((scorers.L2Scorer(q), d), (scorers.NearestScorer((pos,), (neg,), (0.5,)), near[:, None]),
                           (scorers.LinearScorer(coef, icpt), lin[:, None])):  # fmt: skip
        res = chunk_topk(block, scorer, 10, Filters(), Exclusions.none(), np.full(1, np.nan))
        for j, r in enumerate(res):
            o = np.where(valid, oracle[:, j], np.inf)
            want = np.lexsort((block["uid"], o))[:10]
            assert sorted(r["uid"].tolist()) == sorted(block["uid"][want].tolist()), type(scorer).__name__


def _overlapping_blas_limits(resources, blas, a_leaves_first):
    """Threads A and B each hold ``blas_threads(1)``, overlapping; what B sees once A has left
    (``a_leaves_first``) or before B leaves."""
    import threading

    a_in, b_out, a_out, seen = threading.Event(), threading.Event(), threading.Event(), []

    def a():
        with resources.blas_threads(1):
            a_in.set()
            if not a_leaves_first:
                b_out.wait()
        a_out.set()

    def b():
        a_in.wait()
        with resources.blas_threads(1):
            if a_leaves_first:
                a_out.wait()
            seen.append(blas())
        b_out.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return seen[0] if seen else None


def test_query_tiles_of_a_held_index_come_from_memory_and_equal_the_store(stores, tmp_path):
    """A persisted index reads a query tile's fingerprint and place from its blocks in memory
    (27 ms of a served 1M-tile query went into decompressing store chunks for one row): the same
    values as the store's, over several blocks, for float32 and float16 stores; a dropped window is
    refused alike; post-processed blocks are not raw, so such an index reads the store."""
    from pipeline.search import index as index_mod

    for name, path in stores.items():
        fresh = SearchIndex.open(str(path))
        ds = fresh.ds
        valid = ds["valid"].values.astype(bool)
        uids = [int(u) for u in ds["uid"].values[valid][:: max(1, valid.sum() // 9)]]
        want, want_labels = fresh.queries_from_uids(uids)
        held = SearchIndex.open(str(path)).persist(block_rows=int(ds["fingerprint"].data.chunksize[0]) * 2)
        assert len(held.blocks()) > 2
        assert all(held._held_row(held.slot_of(u)) for u in uids)
        got, labels = held.queries_from_uids(uids)
        assert labels == want_labels
        for field in ("fingerprints", "image", "row", "col", "lon", "lat", "half_m"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=f"{name} {field}")
        assert got.fingerprints.dtype == np.float32
        dropped = [int(u) for u, ok in zip(ds["uid"].values, valid) if not ok and u]
        if dropped:
            with pytest.raises(SearchError, match="dropped window"):
                held.queries_from_uids(dropped[:1])
    # blocks of another dtype or post-processed ones hold other values: the query tile comes from the store
    assert SearchIndex.open(str(stores["float32"])).persist(dtype="float16")._held_row(0) is None
    post_store = tmp_path / "post.zarr"
    shutil.copytree(stores["float32"], post_store)
    assert main(["postprocess", "--store", str(post_store), "--method", "l2"]) == 0
    held = SearchIndex.open(str(post_store)).persist()
    assert held._held_row(0) is None
    u = int(held.ds["uid"].values[held.ds["valid"].values.astype(bool)][0])
    np.testing.assert_array_equal(held.queries_from_uids([u])[0].fingerprints,
                                  SearchIndex.open(str(post_store)).queries_from_uids([u])[0].fingerprints)  # fmt: skip
    assert index_mod.HELD_VARS >= {"fingerprint", "uid"}
