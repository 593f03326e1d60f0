"""The device search path (pipeline.search.device: a persisted index as torch tensors) on the
CPU, where CI runs it, against the NumPy engine over the same blocks (itself checked against
brute force in test_search.py) and against brute force directly: every scorer, filters, overlap
exclusion, statuses, thresholds, codes with their re-rank, ties by uid, chunk sizes, fan-ins and
the row slices of a block. The ``gpu`` tests repeat the equality on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import copy_store

from pipeline import grid
from pipeline.cli import main
from pipeline.errors import SearchError
from pipeline.search import Filters, Queries, SearchIndex
from pipeline.search import device as device_mod
from pipeline.search.kernels import ExampleSet, Exclusions
from pipeline.search.memory import memory_dataset
from pipeline.search.scorers import LinearScorer
from pipeline.store import open_store

torch = pytest.importorskip("torch")

# the CPU in CI; the same test on CUDA where a GPU is (the ``gpu`` marker)
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])
DEVICES = ["cpu", CUDA]


def assert_same(want, got, exact=True):
    assert len(want) == len(got)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a.uid, b.uid)
        if exact:
            np.testing.assert_array_equal(a.value, b.value)
        else:
            np.testing.assert_allclose(a.value, b.value, rtol=1e-6)
        assert a.total == b.total


def pair(ds, device="cpu", block_rows=None, split_every=8, dtype=None, **options):
    """The same store persisted as NumPy blocks and as device blocks."""
    host = SearchIndex(ds, split_every=split_every, **options).persist(block_rows=block_rows, dtype=dtype)
    dev = SearchIndex(ds, split_every=split_every, **options).persist(block_rows=block_rows, device=device, dtype=dtype)
    assert dev.on_device and not host.on_device
    return host, dev


def vectors(n=300, d=24, seed=5):
    x = np.maximum(np.random.default_rng(seed).standard_normal((n, d)), 0).astype(np.float32)
    x[250:262] = x[:12]  # exact duplicates: ties, broken by uid
    return x


def every_scorer(index, x, k, max_score=None, limit=10_000):
    """Results of every scorer kind for a few queries: L2 (batched), centroid and nearest example
    sets (with negatives), a linear classifier; top-k or (``max_score``) threshold mode."""
    rng = np.random.default_rng(11)
    q = np.concatenate([x[[0, 3]], rng.standard_normal((2, x.shape[1])).astype(np.float32)])
    pos, neg = Queries.from_fingerprints(x[[5, 9, 40]]), Queries.from_fingerprints(x[[77]])
    sets = [ExampleSet(pos, neg, "centroid"), ExampleSet(pos, neg, "centroid", 0.0)]
    nearest = [ExampleSet(pos, neg, "nearest"), ExampleSet(pos, Queries.from_fingerprints(x[:0]), "nearest")]
    coef = rng.standard_normal((2, x.shape[1])).astype(np.float32)
    kw = {"k": None, "max_score": max_score, "limit": limit} if max_score is not None else {"k": k}
    out = []
    out += index.search(Queries.from_fingerprints(q), kw["k"], max_distance=max_score, limit=limit)
    out += index.search_examples(sets, **kw)
    out += index.search_examples(nearest, **{**kw, "max_score": None if max_score is None else max_score / 10})
    out += index.run(LinearScorer(coef, np.array([0.5, -1.0])), Exclusions.none(),
                     **{**kw, "max_score": None if max_score is None else 0.0})  # fmt: skip
    return out


@pytest.mark.parametrize("chunk,split_every,budget", [(3, 2, None), (32, 3, 50), (512, 16, None), (32, 16, 1024)])
@pytest.mark.parametrize("k", [1, 12, 1000])
def test_every_scorer_on_the_device_equals_the_numpy_engine(chunk, split_every, budget, k, monkeypatch):
    """Top-k and threshold mode of every scorer, over chunk sizes, fan-ins and row slices
    (``budget``: scores held at once, so a block is scored in several slices)."""
    if budget:
        monkeypatch.setattr(device_mod, "SCORE_BUDGET", budget)
    x = vectors()
    host, dev = pair(memory_dataset(x, chunk=chunk), block_rows=chunk * 2, split_every=split_every)
    assert_same(every_scorer(host, x, k), every_scorer(dev, x, k))
    assert_same(every_scorer(host, x, None, max_score=float(np.median(x.sum(1))), limit=k),
                every_scorer(dev, x, None, max_score=float(np.median(x.sum(1))), limit=k))  # fmt: skip


def test_device_top_k_equals_brute_force_with_ties_by_uid():
    x = vectors()
    uid = grid.pack_uid(np.arange(len(x)), 0, 0)
    _, dev = pair(memory_dataset(x, chunk=40))
    q = x[[0, 1, 2]]
    d = np.sqrt(((x[None].astype(np.float64) - q[:, None]) ** 2).sum(-1))
    for j, res in enumerate(dev.search(Queries.from_fingerprints(q), 30)):
        order = np.lexsort((uid, d[j]))[:30]
        np.testing.assert_array_equal(res.uid, uid[order])
        np.testing.assert_allclose(res.value, d[j, order], rtol=1e-6, atol=1e-6)
        assert res.uid[0] == uid[j] and res.uid[1] == uid[250 + j]  # the duplicate: equal distance, higher uid


def test_float16_index_dtype_is_exact_where_float16_is_and_near_elsewhere():
    ints = np.random.default_rng(2).integers(0, 9, (400, 16)).astype(np.float32)  # float16 holds them exactly
    host32 = SearchIndex(memory_dataset(ints, chunk=64)).persist()
    dev16 = SearchIndex(memory_dataset(ints, chunk=64)).persist(device="cpu", dtype="float16")
    assert dev16.dtype == "float16" and dev16._blocks[0].compute().x.dtype == torch.float16
    assert_same(every_scorer(host32, ints, 25), every_scorer(dev16, ints, 25))
    x = vectors(d=32) * 3.3
    host32 = SearchIndex(memory_dataset(x, chunk=64)).persist()
    host16, dev16 = pair(memory_dataset(x, chunk=64), dtype="float16")
    assert_same(every_scorer(host16, x, 20), every_scorer(dev16, x, 20))  # the same float16 values held
    q = Queries.from_fingerprints(x[[1, 7]] + 0.05)
    for a, b in zip(host32.search(q, 20), dev16.search(q, 20)):  # float16 rounding: near-ties may swap
        np.testing.assert_allclose(a.value, b.value, rtol=2e-3)
        assert len(set(a.uid[:15]) & set(b.uid)) >= 14


@pytest.fixture(scope="module")
def stores(flights, ingest_store):
    return {"float32": ingest_store(flights, chunk_tiles=4),
            "float16": ingest_store(flights, dtype="float16", chunk_tiles=7)}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_filters_exclusion_statuses_and_diverse_on_a_store_equal_the_numpy_engine(stores, dtype, device):
    """The shared archive: overlapping flights (ground-overlap exclusion), no-CRS images, twins
    (ties), dropped windows; bbox and image filters, an unfinished image, diverse results."""
    ds = open_store(stores[dtype])
    host, dev = pair(ds, device=device, block_rows=14, split_every=2)
    s = {n: ds[n].values for n in ("uid", "valid", "image", "lon", "lat")}
    uids = [int(u) for u in s["uid"][s["valid"]][::11]]
    queries, labels = host.queries_from_uids(uids)
    assert_same(host.search(queries, 9, labels=labels), dev.search(queries, 9, labels=labels))
    assert_same(host.search(queries, 9, Filters(include_overlapping=True)), dev.search(queries, 9, Filters(include_overlapping=True)))
    lon, lat = s["lon"][s["valid"] & (s["image"] <= 1)], s["lat"][s["valid"] & (s["image"] <= 1)]
    bbox = (float(np.median(lon)), float(lat.min()), float(lon.max()), float(np.median(lat)))
    assert_same(host.search(queries, 30, Filters(bbox=bbox)), dev.search(queries, 30, Filters(bbox=bbox)))
    only = Filters(image_ids=host.image_ids_matching("*nocrs*") + host.image_ids_matching("b.tif"))
    assert_same(host.search(queries, 12, only), dev.search(queries, 12, only))
    assert_same(host.search(queries, 6, diverse=True), dev.search(queries, 6, diverse=True))
    cut = float(np.median(host.search(queries, 40)[0].value))
    assert_same(host.search(queries, None, max_distance=cut, limit=5), dev.search(queries, None, max_distance=cut, limit=5))
    usable = np.ones(ds.sizes["img"], bool)
    usable[1] = False  # b.tif not done: its tiles are not searchable
    for index in (host, dev):
        index._cache["usable"] = usable
    assert_same(host.search(queries, 15), dev.search(queries, 15))
    assert not any(grid.unpack_uid(r.uid)[0].tolist().count(1) for r in dev.search(queries, 15))


@pytest.fixture(scope="module")
def coded(flights, ingest_store, tmp_path_factory):
    shared = ingest_store([flights / "a.tif", flights / "b.tif", flights / "c_far.tif"])
    root = tmp_path_factory.mktemp("device-codes")
    binary = copy_store(shared, root / "binary.zarr")
    assert main(["postprocess", "--store", str(binary), "--codes", "binary", "--bits", "128"]) == 0
    pq = copy_store(shared, root / "pq.zarr")
    assert main(["postprocess", "--store", str(pq), "--codes", "pq", "--m", "8"]) == 0
    return {"binary": binary, "pq": pq}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["binary", "pq"])
def test_codes_scan_and_exact_rerank_on_the_device_equal_the_numpy_engine(coded, kind, device):
    ds = open_store(coded[kind])
    host, dev = pair(ds, device=device, block_rows=24, split_every=3, codes=True, rerank=40)
    assert dev._blocks_hold_codes and dev._blocks[0].compute().code_bytes == (16 if kind == "binary" else 8)
    uids = [int(u) for u in ds["uid"].values[ds["valid"].values][::13]]
    queries, labels = host.queries_from_uids(uids)
    want, got = host.search(queries, 7, labels=labels), dev.search(queries, 7, labels=labels)
    assert_same(want, got)
    assert got[0].query["scan"]["rerank_from"] == "memory"


@pytest.mark.parametrize("device", DEVICES)
def test_hamming_ties_at_the_cut_off_go_to_the_lowest_uids(device):
    """Many codes at the same distance: the device selection keeps the k lowest uids among the
    tied, as kernels.chunk_topk does (1e9 codes tie by the thousand)."""
    from pipeline.search import kernels
    from pipeline.search.scorers import HammingScorer

    rng = np.random.default_rng(3)
    n = 5000
    codes = rng.integers(0, 4, (n, 8), dtype=np.uint8)  # few distinct codes: massive ties
    uid = grid.pack_uid(rng.permutation(n), 0, 0)
    block = {"codes": codes, "valid": np.ones(n, bool), "uid": uid, "lon": np.full(n, np.nan), "lat": np.full(n, np.nan)}
    scorer = HammingScorer(rng.integers(0, 4, (3, 8), dtype=np.uint8))
    args = (Filters(), Exclusions.none(), np.zeros(0))
    dev = device_mod.to_device(block, device)
    for k in (1, 7, 300):
        want = kernels.chunk_topk(block, scorer, k, *args)
        got = device_mod.chunk_topk(dev, scorer, k, *args)
        for a, b in zip(want, got):
            a, b = np.sort(a, order=["score", "uid"]), np.sort(b, order=["score", "uid"])
            np.testing.assert_array_equal(a["uid"], b["uid"])
            np.testing.assert_array_equal(a["score"], b["score"])


def test_popcount_torch_and_triton_kernels_equal_a_bit_count():
    """Both implementations against NumPy's unpackbits; the Triton kernel in Triton's CPU
    interpreter (a subprocess: TRITON_INTERPRET must be set before Triton loads)."""
    from pipeline.codes import hamming
    from pipeline.search import popcount

    rng = np.random.default_rng(4)
    for b in (8, 12, 64):
        c, q = rng.integers(0, 256, (1000, b), dtype=np.uint8), rng.integers(0, 256, (3, b), dtype=np.uint8)
        want = hamming(c, q)
        w, qw = (torch.from_numpy(device_mod._int32_words(a)) for a in (c, q))
        np.testing.assert_array_equal(popcount.hamming_torch(w, qw).numpy(), want.T)
    pytest.importorskip("triton")
    script = (
        "import numpy as np, torch\n"
        "from pipeline.codes import hamming\nfrom pipeline.search import popcount, device\n"
        "rng = np.random.default_rng(4)\n"
        "for b in (8, 12, 64):\n"
        "    c, q = rng.integers(0, 256, (700, b), dtype=np.uint8), rng.integers(0, 256, (3, b), dtype=np.uint8)\n"
        "    got = popcount.hamming(*(torch.from_numpy(device._int32_words(a)) for a in (c, q)), method='triton')\n"
        "    assert (got.numpy() == hamming(c, q).T).all(), b\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_memory_planning_refuses_with_the_numbers_and_counts_every_byte(stores, monkeypatch):
    ds = open_store(stores["float32"])
    index = SearchIndex(ds)
    per = index.device_bytes_per_tile()
    assert per == 512 * 4 + 4 + device_mod.META_BYTES
    assert index.device_bytes_per_tile("float16") == 512 * 2 + 4 + device_mod.META_BYTES
    dev = SearchIndex(ds).persist(device="cpu")
    held = sum(b.compute().nbytes for b in dev._blocks)
    assert held == ds.sizes["tile"] * per  # what planning counts is what the blocks hold
    n = ds.sizes["tile"]
    monkeypatch.setattr(device_mod, "free_bytes", lambda device: n * per)  # fits only without the reserve
    with pytest.raises(SearchError, match=rf"{n:,} tiles x {per} B .* tiles fit") as err:
        SearchIndex(ds).persist(device="cpu")
    assert "--index-dtype float16" in str(err.value)
    SearchIndex(ds).persist(device="cpu", dtype="float16")  # half the bytes: fits


def test_device_refusals_are_clear(stores):
    ds = open_store(stores["float32"])
    with pytest.raises(SearchError, match="--index-device must be one of"):
        SearchIndex(ds).persist(device="tpu")
    with pytest.raises(SearchError, match="--index-dtype must be one of"):
        SearchIndex(ds).persist(device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(SearchError, match="sees no CUDA GPU"):
            SearchIndex(ds).persist(device="cuda")
        assert device_mod.resolve("auto") == "cpu"


def test_device_blocks_on_a_cluster_answer_like_the_local_ones(stores, cluster_client):
    from pipeline.cluster import Runtime

    ds = open_store(stores["float32"])
    host = SearchIndex(ds).persist()
    rt = Runtime("client", client=cluster_client, progress=False)
    dist = SearchIndex(ds, runtime=rt, split_every=2).persist(device="cpu")
    uids = [int(u) for u in ds["uid"].values[ds["valid"].values][::17]]
    queries, _ = host.queries_from_uids(uids)
    assert_same(host.search(queries, 8), dist.search(queries, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_every_scorer_on_cuda_equals_the_numpy_engine(stores, dtype):
    x = vectors(d=64) if dtype is None else np.random.default_rng(2).integers(0, 9, (400, 64)).astype(np.float32)
    host = SearchIndex(memory_dataset(x, chunk=50)).persist()
    dev = SearchIndex(memory_dataset(x, chunk=50)).persist(device="cuda", dtype=dtype)
    assert_same(every_scorer(host, x, 17), every_scorer(dev, x, 17))
    cut = float(np.median(x.sum(1)))
    assert_same(every_scorer(host, x, None, max_score=cut, limit=40), every_scorer(dev, x, None, max_score=cut, limit=40))
    ds = open_store(stores["float32"])
    host, dev = pair(ds, device="cuda", block_rows=14, split_every=2)
    uids = [int(u) for u in ds["uid"].values[ds["valid"].values][::11]]
    queries, _ = host.queries_from_uids(uids)
    assert_same(host.search(queries, 9), dev.search(queries, 9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_popcount_on_cuda_equals_a_bit_count():
    from pipeline.codes import hamming
    from pipeline.search import popcount

    rng = np.random.default_rng(6)
    c, q = rng.integers(0, 256, (100_000, 64), dtype=np.uint8), rng.integers(0, 256, (5, 64), dtype=np.uint8)
    w, qw = (torch.from_numpy(device_mod._int32_words(a)).cuda() for a in (c, q))
    for method in ("torch", "triton"):
        np.testing.assert_array_equal(popcount.hamming(w, qw, method).cpu().numpy(), hamming(c, q).T)


# ---- through the command line ------------------------------------------------------------------


def run_json(argv, tmp_path):
    out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    assert main([*argv, "--json", str(out)]) == 0, argv
    import json

    return json.loads(out.read_text())


def uids_of(doc):
    return [r["uid"] for r in doc["results"]]


def test_search_and_classify_index_flags_and_config(stores, tmp_path):
    store = str(stores["float32"])
    ds = open_store(store)
    u = [str(int(v)) for v in ds["uid"].values[ds["valid"].values][[3, 20, 41]]]
    plain = run_json(["search", "--store", store, "--uid", u[0], "-k", "8"], tmp_path)
    assert "index_device" not in plain["query"]  # the default here (no GPU): the NumPy engine, JSON as before
    dev = run_json(["search", "--store", store, "--uid", u[0], "-k", "8", "--index-device", "cpu"], tmp_path)
    assert uids_of(dev) == uids_of(plain) and [r["distance"] for r in dev["results"]] == [r["distance"] for r in plain["results"]]
    assert dev["query"]["index_device"] == "cpu" and dev["query"]["index_dtype"] == "float32"
    half = ["--index-dtype", "float16", "--max-distance", "1e9", "--limit", "12"]
    h_np = run_json(["search", "--store", store, "--uid", u[0], "--index-device", "numpy", *half], tmp_path)
    h_dev = run_json(["search", "--store", store, "--uid", u[0], "--index-device", "cpu", *half], tmp_path)
    assert uids_of(h_np) == uids_of(h_dev) and h_dev["query"]["index_dtype"] == h_np["query"]["index_dtype"] == "float16"
    assert h_np["query"]["index_device"] == "numpy" and h_dev["total_passed"] == h_np["total_passed"]
    cfg = tmp_path / "device.yaml"
    cfg.write_text("search:\n  device: cpu\n  dtype: float16\n")
    by_config = run_json(["search", "--store", store, "--uid", u[0], "-k", "12", "--config", str(cfg)], tmp_path)
    assert by_config["query"]["index_device"] == "cpu" and uids_of(by_config) == uids_of(h_dev)
    fit = ["classify", "--store", store, "--positive", u[1], "--positive", u[2], "--negative", u[0], "-k", "6",
           "--background", "20"]  # fmt: skip
    want = run_json(fit, tmp_path)
    got = run_json([*fit, "--index-device", "cpu", "--index-dtype", "float32"], tmp_path)
    assert uids_of(got) == uids_of(want) and got["query"]["index_device"] == "cpu"
    assert main(["search", "--store", store, "--uid", u[0], "--index-device", "tpu"]) == 2


def test_heatmap_postprocess_and_info_with_the_index_flags(stores, flights, tmp_path, capsys):
    import json

    import rasterio

    store = stores["float32"]
    ds = open_store(store)
    u = str(int(ds["uid"].values[ds["valid"].values][5]))
    assert main(["heatmap", "--store", str(store), "--uid", u, "--out", str(tmp_path / "a")]) == 0
    assert main(["heatmap", "--store", str(store), "--uid", u, "--out", str(tmp_path / "b"), "--index-device", "cpu",
                 "--index-dtype", "float32"]) == 0  # fmt: skip
    for tif in sorted((tmp_path / "a").glob("*.tif")):
        with rasterio.open(tif) as a, rasterio.open(tmp_path / "b" / tif.name) as b:
            np.testing.assert_allclose(b.read(1), a.read(1), rtol=1e-5, atol=1e-4, equal_nan=True)
    paths = {}
    for name, flags in (("numpy", []), ("cpu", ["--index-device", "cpu", "--index-dtype", "float32"])):
        paths[name] = copy_store(store, tmp_path / f"{name}.zarr")
        capsys.readouterr()
        assert main(["postprocess", "--store", str(paths[name]), "--knn", "4", "--dba", "2", *flags]) == 0
        out = capsys.readouterr().out  # no index device: inverted lists; on one: the engine, every pair
        assert ("inverted lists" in out) if name == "numpy" else ("float32 on cpu" in out), out
    a, b = open_store(paths["numpy"]), open_store(paths["cpu"])
    np.testing.assert_array_equal(a["knn_uid"].values, b["knn_uid"].values)
    np.testing.assert_allclose(a["fingerprint_dba"].values, b["fingerprint_dba"].values, rtol=1e-6, atol=1e-6)
    assert main(["info", "--store", str(paths["cpu"]), "--json"]) == 0
    need = json.loads(capsys.readouterr().out)["index_device_bytes"]
    index = SearchIndex.open(str(paths["cpu"]))
    assert need["float32"] == need["tiles"] * index.device_bytes_per_tile("float32")
    assert need["float16"] == need["tiles"] * index.device_bytes_per_tile("float16")
    assert need["knn_graph"] == need["tiles"] * 4 * 12


def test_evaluate_with_the_index_flags_ranks_as_the_numpy_engine(tmp_path):
    import json

    from conftest import textured
    from PIL import Image

    for c, seed in (("fields", 1), ("roofs", 2)):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(textured(256, 256, seed=seed * 10 + i).transpose(1, 2, 0)).save(tmp_path / "set" / c / f"{i}.png")
    runs = {}
    for name, flags in (("numpy", []), ("cpu", ["--index-device", "cpu", "--index-dtype", "float32"])):
        out = tmp_path / name
        assert main(["evaluate", str(tmp_path / "set"), "--model", "probe", "--options", "l2", "--out", str(out), *flags]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    assert runs["cpu"]["index_device"] == "cpu" and runs["numpy"]["index_device"] == "numpy"
    assert runs["cpu"]["runs"] == runs["numpy"]["runs"]


def test_serve_holds_the_index_on_the_device_and_answers_as_the_cli(stores, tmp_path):
    pytest.importorskip("fastapi")
    import httpx
    from test_serve import start_serve

    store = str(stores["float32"])
    ds = open_store(store)
    u = str(int(ds["uid"].values[ds["valid"].values][9]))
    proc, url, lines = start_serve(["--store", store, "--port", "0", "--index-device", "cpu", "--index-dtype", "float16"])
    try:
        assert any("float16 on cpu" in line for line in lines), lines
        doc = httpx.get(url + "/api/search", params={"uid": u, "k": 5}).json()
        want = run_json(["search", "--store", store, "--uid", u, "-k", "5", "--index-dtype", "float16"], tmp_path)
        assert uids_of(doc) == uids_of(want) and doc["query"]["index_dtype"] == "float16"
    finally:
        proc.terminate()
        proc.wait(30)
