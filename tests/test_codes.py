"""Binary codes (`postprocess --codes binary`, `search --codes [--rerank R]`) against NumPy:
popcounts, the rotation, exact re-ranked distances, recall 1.0 when R covers the store, and the
codes following the store's growth."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import copy_store

from pipeline.cli import main
from pipeline.codes import BinaryCodes, hamming
from pipeline.errors import SearchError
from pipeline.search import SearchIndex
from pipeline.store import open_store


@pytest.fixture(scope="module")
def coded(flights, ingest_store, tmp_path_factory):
    """A store of two images of the shared archive (a flight and the far image), with 128-bit
    codes; b.tif, the other flight over a's ground, is what growth tests add."""
    shared = ingest_store([flights / "a.tif", flights / "c_far.tif"])
    path = copy_store(shared, tmp_path_factory.mktemp("codes") / "s.zarr")
    assert main(["postprocess", "--store", str(path), "--codes", "binary", "--bits", "128"]) == 0
    return flights, path


def _load(path):
    ds = open_store(path)
    return {n: ds[n].values for n in ("fingerprint", "valid", "uid", "image", "row", "col", "lon", "lat", "codes")}


def _exact_distances(s, q, uids):
    at = {int(u): i for i, u in enumerate(s["uid"]) if s["valid"][i]}
    x = s["fingerprint"][[at[int(u)] for u in uids]].astype(np.float64)
    return np.sqrt(((x - s["fingerprint"][q].astype(np.float64)) ** 2).sum(1))


def test_hamming_equals_a_bit_count_oracle():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (50, 16), dtype=np.uint8)
    q = rng.integers(0, 256, (3, 16), dtype=np.uint8)
    want = np.unpackbits(a[:, None, :] ^ q[None, :, :], axis=2).sum(axis=2)
    np.testing.assert_array_equal(hamming(a, q), want)
    short = np.unpackbits(a[:, None, :3] ^ q[None, :, :3], axis=2).sum(axis=2)  # not whole 64-bit words
    np.testing.assert_array_equal(hamming(a[:, :3], q[:, :3]), short)


def test_hamming_scan_steps_and_counting_selection_against_oracles():
    """The scan goes in cache-sized steps of rows and writes float32 for the masks; the counting
    selection keeps every row tied at the k-th distance and skips masked (+inf) rows: against a
    bit count and a sort, over a row count that is not a multiple of the step."""
    from pipeline import codes

    rng = np.random.default_rng(1)
    n = codes.SCAN_ROWS * 2 + 37
    a = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    a[::3] = a[0]  # many exact ties
    q = rng.integers(0, 256, (2, 8), dtype=np.uint8)
    want = np.unpackbits(a[:, None, :] ^ q[None, :, :], axis=2).sum(axis=2)
    got = codes.hamming_words(codes.words(a), q, dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(codes.hamming_words(codes.words(a), q), want)
    for j in range(2):
        d = got[:, j].copy()
        d[rng.random(n) < 0.3] = np.inf
        for k in (1, 10, 5000, n):
            finite = np.isfinite(d)
            if finite.sum() <= k:
                expect = np.flatnonzero(finite)
            else:
                kth = np.sort(d[finite])[k - 1]  # every row as near as the k-th nearest
                expect = np.flatnonzero(d <= kth)
            np.testing.assert_array_equal(codes.smallest_masked(d, k, 64), expect)
    assert len(codes.smallest_masked(np.full(5, np.inf, np.float32), 3, 64)) == 0


def test_itq_projection_is_orthonormal_and_codes_follow_the_signs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 96)).astype(np.float32) @ rng.standard_normal((96, 96)).astype(np.float32)
    enc = BinaryCodes.fit(x, 64)
    np.testing.assert_allclose(enc.projection.T @ enc.projection, np.eye(64), atol=1e-4)
    bits = np.unpackbits(enc.encode(x), axis=1, bitorder="little").astype(bool)
    np.testing.assert_array_equal(bits, (x - enc.mean) @ enc.projection > 0)
    with pytest.raises(SearchError, match="exceeds the 96 dimensions.*use --bits 64 or less"):
        BinaryCodes.fit(x, 128)
    with pytest.raises(SearchError, match="exceeds the 16 dimensions.*--dims 64 or more, or use --codes pq"):
        BinaryCodes.fit(x[:, :16], 64)  # no binary code fits: the message must not suggest --bits 64
    with pytest.raises(SearchError, match="multiple of 64"):
        BinaryCodes.fit(x, 100)


def test_stored_codes_are_the_encoding_of_every_tile(coded):
    _, path = coded
    s = _load(path)
    ds = open_store(path)
    enc = BinaryCodes(ds["codes_mean"].values, ds["codes_projection"].values)
    assert s["codes"].shape == (len(s["uid"]), 16) and ds.attrs["postprocess"]["codes"]["bits"] == 128
    np.testing.assert_array_equal(s["codes"][s["valid"]], enc.encode(s["fingerprint"][s["valid"]]))


@pytest.mark.parametrize("persist", [False, True])
def test_reranked_distances_are_exact_and_recall_is_one_when_r_covers_the_store(coded, tmp_path, persist):
    _, path = coded
    s = _load(path)
    qs = np.flatnonzero(s["valid"])[[3, 17, 30]]
    exact = SearchIndex.open(str(path))
    index = SearchIndex.open(str(path))
    index.codes = True
    if persist:
        index.persist(block_rows=16)
    queries, labels = exact.queries_from_uids([int(s["uid"][q]) for q in qs])
    want = exact.search(queries, 8, labels=labels)
    for r in (None, 12):  # the default R, and one smaller than the store: distances stay exact
        index.rerank = r
        for q, res in zip(qs, index.search(queries, 8, labels=labels)):
            np.testing.assert_allclose(res.value, _exact_distances(s, q, res.uid), rtol=1e-6)
            assert list(res.value) == sorted(res.value)
            assert res.query["scan"]["candidates_per_query"] == (r or 100)
    index.rerank = len(s["uid"])  # R covers the store: the exact answer, tie for tie
    for w, got in zip(want, index.search(queries, 8, labels=labels)):
        np.testing.assert_array_equal(got.uid, w.uid)
        np.testing.assert_allclose(got.value, w.value, rtol=1e-9)
    scan = got.query["scan"]
    assert scan["codes_bytes"] == len(s["uid"]) * 16 and scan["float32_bytes"] == s["fingerprint"].nbytes
    assert scan["rerank_from"] == ("memory" if persist else f"{-(-len(s['uid']) // 8)} store chunk(s)")


def test_search_codes_and_rerank_through_the_cli(coded, tmp_path, capsys):
    _, path = coded
    s = _load(path)
    q = int(np.flatnonzero(s["valid"])[5])
    out = tmp_path / "r.json"
    base = ["search", "--store", str(path), "--uid", str(int(s["uid"][q])), "-k", "5"]
    assert main([*base, "--codes", "--rerank", str(len(s["uid"])), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert main([*base, "--json", str(tmp_path / "e.json")]) == 0
    plain = json.loads((tmp_path / "e.json").read_text())
    assert [r["uid"] for r in doc["results"]] == [r["uid"] for r in plain["results"]]
    assert doc["query"]["scan"]["bytes_scanned"] > 0 and "scan" not in plain["query"]
    # threshold mode is exact only; --rerank needs --codes; a store without codes says how to make them
    assert main([*base[:-2], "--max-distance", "10", "--codes"]) == 2
    assert "threshold mode" in capsys.readouterr().err
    assert main([*base, "--rerank", "50"]) == 2
    assert "--rerank applies to --codes" in capsys.readouterr().err
    bare = tmp_path / "bare.zarr"
    shutil.copytree(path, bare)
    assert main(["postprocess", "--store", str(bare), "--method", "l2"]) == 0  # a refit drops the codes
    assert main(["search", "--store", str(bare), "--uid", str(int(s["uid"][q])), "--codes"]) == 2
    assert f"postprocess --store {bare} --codes binary" in capsys.readouterr().err
    assert main(["search", "--store", str(path), "--positive", str(int(s["uid"][q])), "--score", "nearest",
                 "--codes"]) == 2  # fmt: skip
    assert "--codes answers single queries" in capsys.readouterr().err


def test_codes_follow_the_store_growth_and_are_marked_stale(coded, tmp_path, capsys):
    root, built = coded
    path = tmp_path / "g.zarr"
    shutil.copytree(built, path)
    assert main(["ingest", str(root / "b.tif"), "--store", str(path), "--model", "probe", "--chunk-px", "384",
                 "--no-progress"]) == 0  # fmt: skip
    ds = open_store(path)
    assert ds["codes"].shape[0] == ds.sizes["tile"]
    capsys.readouterr()
    assert main(["info", "--store", str(path)]) == 0
    assert "codes are stale" in capsys.readouterr().out
    uid = str(int(ds["uid"].values[np.flatnonzero(ds["valid"].values)[0]]))
    assert main(["search", "--store", str(path), "--uid", uid, "--codes"]) == 2
    assert "postprocess --store STORE --codes binary --bits 128" in capsys.readouterr().err
    assert main(["search", "--store", str(path), "--uid", uid]) == 0  # exact search is unaffected
    assert (
        main(["postprocess", "--store", str(path), "--codes", "binary", "--bits", "128", "--codes-sample", "50"]) == 0
    )
    assert main(["search", "--store", str(path), "--uid", uid, "--codes"]) == 0
    meta = open_store(path).attrs["postprocess"]["codes"]
    assert "stale" not in meta and meta["fitted_on_tiles"] == 50


def test_a_persisted_index_on_a_cluster_answers_like_the_local_one_with_and_without_codes(coded):
    from distributed import Client, LocalCluster, futures_of, wait

    from pipeline.cluster import runtime
    from pipeline.config import ClusterConfig

    _, path = coded
    s = _load(path)
    uids = [int(s["uid"][q]) for q in np.flatnonzero(s["valid"])[[2, 11]]]
    local = SearchIndex.open(str(path))
    queries, labels = local.queries_from_uids(uids)
    want = local.search(queries, 6, labels=labels)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client, runtime(ClusterConfig(progress=False), client=client) as rt:
            for codes in (False, True):
                index = SearchIndex.open(str(path), rt)
                index.codes, index.rerank = codes, len(s["uid"])
                index.persist(block_rows=16)
                wait(futures_of(index._blocks))
                held = client.who_has(futures_of(index._blocks))
                assert held and all(held.values())  # every block lives in a worker's memory
                for w, got in zip(want, index.search(queries, 6, labels=labels)):
                    np.testing.assert_array_equal(got.uid, w.uid)
                    np.testing.assert_allclose(got.value, w.value, rtol=1e-9)


def test_codes_asked_for_after_persist_read_the_codes_from_the_store(coded):
    _, path = coded
    s = _load(path)
    index = SearchIndex.open(str(path)).persist(block_rows=16)  # persisted without codes
    queries, labels = index.queries_from_uids([int(s["uid"][np.flatnonzero(s["valid"])[7]])])
    want = index.search(queries, 5, labels=labels)
    index.codes, index.rerank = True, len(s["uid"])
    [got] = index.search(queries, 5, labels=labels)
    np.testing.assert_array_equal(got.uid, want[0].uid)
    assert got.query["scan"]["rerank_from"] == "memory"


def test_pq_table_scan_in_steps_against_a_direct_sum():
    """The PQ scan adds each subspace's table look-up a cache-sized step of rows at a time: the
    same sums (in the same order) as adding the tables' entries row by row."""
    from pipeline import codes

    rng = np.random.default_rng(2)
    n, m = codes.SCAN_ROWS + 41, 8
    c = rng.integers(0, 256, (n, m), dtype=np.uint8)
    tables = rng.random((3, m, 256), dtype=np.float32)
    want = np.zeros((n, 3), dtype=np.float32)
    for s in range(m):
        want += tables[:, s, :][:, c[:, s]].T
    np.testing.assert_array_equal(codes.adc(codes.columns(c), tables), want)
