"""Product-quantization codes (`postprocess --codes pq [--m M]`, `search --codes`) against NumPy:
nearest centroids, table distances equal to distances to the reconstructions, exact re-ranked
distances, recall 1.0 when R covers the store, refusals and staleness naming the pq command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.codes import PQCodes, adc, columns
from pipeline.errors import SearchError
from pipeline.search import SearchIndex
from pipeline.store import open_store
from tests.conftest import textured, write_tif

PX = 0.5
M = 16


@pytest.fixture(scope="module")
def pq_store(tmp_path_factory):
    """A store of two images (random weights, 512 dims) with 16-byte PQ codes."""
    root = tmp_path_factory.mktemp("pq")
    write_tif(root / "a.tif", textured(768, 768, seed=301), transform=(PX, 0, 400000.0, 0, -PX, 3300000.0))
    write_tif(root / "c.tif", textured(512, 768, seed=302), transform=(PX, 0, 460000.0, 0, -PX, 3300000.0))
    write_tif(root / "b.tif", textured(512, 512, seed=303), transform=(PX, 0, 470000.0, 0, -PX, 3300000.0))
    path = root / "s.zarr"
    assert main(["ingest", str(root / "a.tif"), str(root / "c.tif"), "--store", str(path), "--model", "probe",
                 "--chunk-px", "384", "--chunk-tiles", "8", "--no-progress"]) == 0  # fmt: skip
    assert main(["postprocess", "--store", str(path), "--codes", "pq", "--m", str(M)]) == 0
    return root, path


def _load(path):
    ds = open_store(path)
    return {n: ds[n].values for n in ("fingerprint", "valid", "uid", "codes")}, ds


def test_pq_encodes_to_the_nearest_centroid_and_tables_give_distances_to_reconstructions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    enc = PQCodes.fit(x, 6, iterations=5)
    assert enc.centroids.shape == (6, 256, 4) and enc.bits == 48
    got = enc.encode(x, batch=700)
    for s in range(6):  # brute force over every centroid of the subspace
        d = ((x[:, None, 4 * s : 4 * s + 4] - enc.centroids[s][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(got[:, s], d.argmin(1))
    q = rng.standard_normal((3, 24)).astype(np.float32)
    recon = enc.decode(got)
    want = ((q[None, :, :].astype(np.float64) - recon[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(adc(columns(got), enc.tables(q)), want, rtol=1e-4, atol=1e-4)


def test_pq_k_means_recovers_a_product_codebook():
    """Rows built from 16 points per subspace (plus small noise) are reconstructed within the
    noise; random rows of the data as centroids (no k-means steps) are not."""
    rng = np.random.default_rng(1)
    book = rng.standard_normal((4, 16, 8)).astype(np.float32) * 3
    pick = rng.integers(0, 16, (4000, 4))
    x = np.concatenate([book[s][pick[:, s]] for s in range(4)], axis=1) + rng.normal(0, 0.01, (4000, 32))
    x = x.astype(np.float32)
    err = float(((x - PQCodes.fit(x, 4).decode(PQCodes.fit(x, 4).encode(x))) ** 2).sum(1).mean())
    assert err < 32 * 0.01**2 * 1.5
    with pytest.raises(SearchError, match="does not divide the 32 dimensions.*32"):
        PQCodes.fit(x, 5)


def test_stored_pq_codes_are_the_encoding_of_every_tile(pq_store):
    _, path = pq_store
    s, ds = _load(path)
    enc = PQCodes(ds["codes_centroids"].values)
    meta = ds.attrs["postprocess"]["codes"]
    assert s["codes"].shape == (len(s["uid"]), M) and meta["kind"] == "pq" and meta["m"] == M and meta["bits"] == 8 * M
    np.testing.assert_array_equal(s["codes"][s["valid"]], enc.encode(s["fingerprint"][s["valid"]]))


@pytest.mark.parametrize("persist", [False, True])
def test_pq_reranked_distances_are_exact_and_recall_is_one_when_r_covers_the_store(pq_store, persist):
    _, path = pq_store
    s, _ = _load(path)
    valid = np.flatnonzero(s["valid"])
    qs = valid[[2, 9, 21]]
    exact = SearchIndex.open(str(path))
    index = SearchIndex.open(str(path))
    index.codes = True
    if persist:
        index.persist(block_rows=16)
    queries, labels = exact.queries_from_uids([int(s["uid"][q]) for q in qs])
    want = exact.search(queries, 8, labels=labels)
    at = {int(u): i for i, u in enumerate(s["uid"])}
    index.rerank = 10
    for q, res in zip(qs, index.search(queries, 8, labels=labels)):
        x = s["fingerprint"][[at[int(u)] for u in res.uid]].astype(np.float64)
        oracle = np.sqrt(((x - s["fingerprint"][q].astype(np.float64)) ** 2).sum(1))
        np.testing.assert_allclose(res.value, oracle, rtol=1e-6)
        assert res.query["scan"]["codes"] == f"pq {8 * M} bits (m = {M})"
    index.rerank = len(s["uid"])
    for w, got in zip(want, index.search(queries, 8, labels=labels)):
        np.testing.assert_array_equal(got.uid, w.uid)
        np.testing.assert_allclose(got.value, w.value, rtol=1e-9)
    assert got.query["scan"]["codes_bytes"] == len(s["uid"]) * M


def test_pq_through_the_cli_refusals_and_staleness(pq_store, tmp_path, capsys):
    root, built = pq_store
    path = tmp_path / "g.zarr"
    shutil.copytree(built, path)
    s, _ = _load(path)
    uid = str(int(s["uid"][np.flatnonzero(s["valid"])[4]]))
    base = ["search", "--store", str(path), "--uid", uid, "-k", "5"]
    assert main([*base, "--codes", "--rerank", str(len(s["uid"])), "--json", str(tmp_path / "c.json")]) == 0
    assert main([*base, "--json", str(tmp_path / "e.json")]) == 0
    got, plain = (json.loads((tmp_path / f).read_text()) for f in ("c.json", "e.json"))
    assert [r["uid"] for r in got["results"]] == [r["uid"] for r in plain["results"]]
    assert got["query"]["scan"]["codes"].startswith("pq")
    capsys.readouterr()
    for args, msg in (
        (["--codes", "binary", "--m", "8"], "--m sets pq codes"),
        (["--codes", "pq", "--bits", "64"], "pq codes take --m"),
        (["--codes", "pq", "--m", "7"], "--m 7 does not divide the 512 dimensions"),
        (["--m", "8"], "add --codes binary (with --bits) or --codes pq"),
    ):
        assert main(["postprocess", "--store", str(path), *args]) == 2, args
        assert msg in capsys.readouterr().err, args
    assert main(["ingest", str(root / "b.tif"), "--store", str(path), "--model", "probe", "--chunk-px", "384",
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*base, "--codes"]) == 2
    assert f"postprocess --store STORE --codes pq --m {M}" in capsys.readouterr().err
    assert main(["postprocess", "--store", str(path), "--codes", "pq", "--m", "8", "--codes-sample", "40"]) == 0
    assert "8-byte pq codes written" in capsys.readouterr().out
    assert main([*base, "--codes", "--json", str(tmp_path / "c2.json")]) == 0
    assert json.loads((tmp_path / "c2.json").read_text())["query"]["scan"]["codes"] == "pq 64 bits (m = 8)"
