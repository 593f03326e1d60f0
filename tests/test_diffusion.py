"""The k-NN graph (`postprocess --knn K`) and diffusion re-ranking (`search --diffusion`,
`evaluate +diffusionK`) against NumPy: a brute-force graph and the closed form
``(I - alpha S)^-1 y`` solved densely."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline import evaluate
from pipeline.cli import main
from pipeline.errors import PostprocessError
from pipeline.search import SearchIndex
from pipeline.store import open_store
from tests.conftest import textured, write_tif


def _cos(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def _knn(x, uid, k):
    """Brute force: each row's k nearest other rows (Euclidean, ties by uid)."""
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.stack([np.lexsort((uid, d[i]))[:k] for i in range(len(x))])


def _closed_form(x, q_row, graph, k, alpha):
    """Dense oracle: nodes = every row but the query; mutual k-NN affinities cos^3 among them;
    y = cos^3 of the query to its k nearest nodes; f = (I - alpha S)^-1 y."""
    n = len(x)
    nodes = np.array([i for i in range(n) if i != q_row])
    pos = {int(v): i for i, v in enumerate(nodes)}
    cos = _cos(x, x)
    a = np.zeros((len(nodes), len(nodes)))
    for i, v in enumerate(nodes):
        for w in graph[v, :k]:
            if int(w) in pos and v in graph[w, :k]:
                a[i, pos[int(w)]] = max(cos[v, w], 0.0) ** 3
    deg = a.sum(1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0.0)
    s = inv[:, None] * a * inv[None, :]
    y = np.zeros(len(nodes))
    near = [pos[int(w)] for w in graph[q_row] if int(w) in pos][:k]
    y[near] = np.maximum(cos[q_row, nodes[near]], 0.0) ** 3
    return nodes, np.linalg.solve(np.eye(len(nodes)) - alpha * s, y)


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    """A store of 30 single-window images without a CRS (no tile overlaps another) and 5-NN."""
    root = tmp_path_factory.mktemp("chips")
    for i in range(30):
        write_tif(root / f"c{i:02d}.tif", textured(256, 256, seed=300 + i), crs=None, transform=None)
    path = root / "s.zarr"
    assert main(["ingest", str(root), "--store", str(path), "--model", "probe", "--no-progress"]) == 0
    assert main(["postprocess", "--store", str(path), "--method", "l2", "--knn", "5"]) == 0
    return root, path


def _x(path):
    ds = open_store(path)
    raw = ds["fingerprint"].values.astype(np.float64)
    return raw / np.linalg.norm(raw, axis=1, keepdims=True), ds["uid"].values, ds


def test_the_knn_graph_equals_a_brute_force_over_the_store(chips):
    _, path = chips
    x, uid, ds = _x(path)
    graph = _knn(x, uid, 5)
    np.testing.assert_array_equal(ds["knn_uid"].values, uid[graph])
    np.testing.assert_allclose(ds["knn_sim"].values, np.take_along_axis(_cos(x, x), graph, 1), rtol=1e-5)
    assert ds.attrs["postprocess"]["knn"]["k"] == 5


def test_diffusion_with_seeds_covering_the_store_equals_the_closed_form(chips):
    _, path = chips
    x, uid, _ = _x(path)
    index = SearchIndex.open(str(path))
    for q_row, alpha, k in ((4, 0.9, 5), (17, 0.5, 3)):
        queries, labels = index.queries_from_uids([int(uid[q_row])])
        [res] = index.search_diffusion(queries, 8, labels=labels, alpha=alpha, graph_k=k, seeds=1000)
        g = _knn(x, uid, k)
        nodes, f = _closed_form(x, q_row, g, k, alpha)
        order = np.lexsort((uid[nodes], -f))[:8]
        np.testing.assert_array_equal(res.uid, uid[nodes[order]])
        np.testing.assert_allclose(res.value, f[order], rtol=1e-6, atol=1e-12)  # the scores
        np.testing.assert_allclose(res.extra["distance"], np.linalg.norm(x[nodes[order]] - x[q_row], axis=1), rtol=1e-5)


def test_search_diffusion_through_the_cli(chips, tmp_path, capsys):
    _, path = chips
    x, uid, _ = _x(path)
    out = tmp_path / "r.json"
    base = ["search", "--store", str(path), "--uid", str(int(uid[4])), "-k", "6"]
    assert main([*base, "--diffusion", "--alpha", "0.9", "--diffusion-k", "5", "--diffusion-seeds", "1000",
                 "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    nodes, f = _closed_form(x, 4, _knn(x, uid, 5), 5, 0.9)
    assert [r["uid"] for r in doc["results"]] == [str(int(u)) for u in uid[nodes[np.lexsort((uid[nodes], -f))[:6]]]]
    raw = open_store(path)["fingerprint"].values.astype(np.float64)
    xl2 = raw / np.linalg.norm(raw, axis=1, keepdims=True)  # the store's l2 post-processing
    for r in doc["results"]:  # each result also carries its exact distance to the query
        j = int(np.flatnonzero(uid == int(r["uid"]))[0])
        assert r["distance"] == pytest.approx(float(np.linalg.norm(xl2[j] - xl2[4])), rel=1e-5)
    assert doc["query"]["diffusion"] == {"alpha": 0.9, "k": 5, "seeds": len(uid) - 1}
    assert main([*base, "--diffusion", "--diffusion-k", "9"]) == 2
    assert "exceeds the 5 neighbours stored" in capsys.readouterr().err
    assert main([*base, "--diffusion-k", "3"]) == 2
    assert "--diffusion-k and --diffusion-seeds apply to --diffusion" in capsys.readouterr().err
    assert main([*base[:-2], "--max-distance", "1", "--diffusion"]) == 2
    assert "use it with -k" in capsys.readouterr().err


def test_the_graph_follows_growth_is_marked_stale_and_rebuilt(chips, tmp_path, capsys):
    root, built = chips
    path = tmp_path / "g.zarr"
    shutil.copytree(built, path)
    extra = write_tif(tmp_path / "new.tif", textured(256, 256, seed=399), crs=None, transform=None)
    assert main(["ingest", str(extra), "--store", str(path), "--model", "probe", "--no-progress"]) == 0
    ds = open_store(path)
    assert ds["knn_uid"].shape[0] == ds.sizes["tile"]
    uid = str(int(ds["uid"].values[0]))
    capsys.readouterr()
    assert main(["info", "--store", str(path)]) == 0
    assert "k-NN graph is stale" in capsys.readouterr().out
    assert main(["search", "--store", str(path), "--uid", uid, "--diffusion"]) == 2
    assert "postprocess --store STORE --knn 5" in capsys.readouterr().err
    assert main(["postprocess", "--store", str(path), "--knn", "5"]) == 0
    assert "k-NN graph written" in capsys.readouterr().out
    assert main(["search", "--store", str(path), "--uid", uid, "--diffusion"]) == 0
    bare = tmp_path / "bare.zarr"
    shutil.copytree(built, bare)
    assert main(["postprocess", "--store", str(bare), "--method", "hellinger"]) == 0  # a refit drops the graph
    assert main(["search", "--store", str(bare), "--uid", uid, "--diffusion"]) == 2
    assert f"postprocess --store {bare} --knn 30" in capsys.readouterr().err


def test_evaluate_diffusion_equals_the_closed_form_and_tokens_are_checked():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16))
    raw = np.maximum(np.repeat(centres, 10, axis=0) + 0.6 * rng.standard_normal((40, 16)), 0).astype(np.float32) + 0.01
    opts = evaluate.parse_options("l2+diffusion5+seeds1000", diffusion_alpha=0.8)
    assert (opts.post, opts.diffusion, opts.diffusion_alpha, opts.seeds) == ("l2", 5, 0.8, 1000)
    order = evaluate.run_options(raw, opts)
    x = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    ids = np.arange(40)
    graph = _knn(x, ids, 5)
    for q in (0, 13, 39):
        nodes, f = _closed_form(x, q, graph, 5, 0.8)
        np.testing.assert_array_equal(order[q], nodes[np.lexsort((nodes, -f))])
    for bad in ("hellinger+dab10", "l2+diffusion", "l2+diffusion0", "l2+knn5"):
        with pytest.raises(PostprocessError, match="diffusionN"):
            evaluate.parse_options(bad)
    with pytest.raises(PostprocessError, match="needs diffusionK"):
        evaluate.parse_options("l2+seeds100")


def _whole_graph(x, graph, k, alpha, y):
    """Dense oracle of the whole-graph mode: every row a node, mutual k-NN affinities cos^3,
    f = (I - alpha S)^-1 y solved densely."""
    n = len(x)
    cos = _cos(x, x)
    a = np.zeros((n, n))
    for v in range(n):
        for w in graph[v, :k]:
            if v in graph[w, :k]:
                a[v, w] = max(cos[v, w], 0.0) ** 3
    deg = a.sum(1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0.0)
    return np.linalg.solve(np.eye(n) - alpha * (inv[:, None] * a * inv[None, :]), y)


def _whole_order(f, d, ids, skip=()):
    key = np.where(f > 1e-12, -f, d / (1 + d))
    key[list(skip)] = np.inf
    order = np.lexsort((ids, key))
    return order[: len(order) - len(skip)]


def test_whole_graph_diffusion_equals_the_dense_closed_form(chips, tmp_path):
    """A tile of the archive diffuses from its own node, an outside image joins its k nearest;
    tiles the diffusion does not reach follow in distance order; filters apply to the ranking."""
    root, path = chips
    x, uid, _ = _x(path)
    index = SearchIndex.open(str(path))
    n = len(x)
    for q_row, alpha, k in ((4, 0.9, 5), (17, 0.5, 3)):
        queries, labels = index.queries_from_uids([int(uid[q_row])])
        [res] = index.search_diffusion(queries, 12, labels=labels, alpha=alpha, graph_k=k)
        f = _whole_graph(x, _knn(x, uid, k), k, alpha, np.eye(n)[q_row])
        d = np.linalg.norm(x - x[q_row], axis=1)
        want = _whole_order(f, d, uid, skip=[q_row])[:12]
        np.testing.assert_array_equal(res.uid, uid[want])
        np.testing.assert_allclose(res.value, np.where(f[want] > 1e-12, f[want], 0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(res.extra["distance"], d[want], rtol=1e-5)
        assert res.query["diffusion"] == {"alpha": alpha, "k": k, "graph": "whole"}
    # an outside query (a fingerprint near chip 9's) joins its k nearest tiles; an image filter
    from pipeline.search import Filters, Queries

    raw = open_store(path)["fingerprint"].values.astype(np.float64)
    fp = raw[9] * (1 + 0.3 * np.random.default_rng(4).random(raw.shape[1]))
    q = fp / np.linalg.norm(fp)  # the store's l2 post-processing
    d = np.linalg.norm(x - q, axis=1)
    near = np.lexsort((uid, d))[:5]
    y = np.zeros(n)
    y[near] = np.maximum(_cos(q[None], x[near])[0], 0) ** 3
    f = _whole_graph(x, _knn(x, uid, 5), 5, 0.9, y)
    only = index.image_ids_matching("*/c1*")
    [res] = index.search_diffusion(Queries.from_fingerprints(fp.astype(np.float32)), 6, Filters(image_ids=tuple(only)),
                                   graph_k=5)  # fmt: skip
    allowed = np.isin(np.arange(n), np.asarray(only))  # one window per image: image id = row
    want = [i for i in _whole_order(f, d, uid) if allowed[i]][:6]
    np.testing.assert_array_equal(res.uid, uid[want])
    # an image query through the CLI, with the filter
    from PIL import Image

    Image.fromarray(textured(256, 256, seed=309).transpose(1, 2, 0)).save(tmp_path / "q.png")
    out = tmp_path / "r.json"
    assert main(["search", "--store", str(path), "--image", str(tmp_path / "q.png"), "-k", "7", "--diffusion",
                 "--diffusion-k", "5", "--images", "*/c1*", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    got = [int(r["uid"]) for r in doc["results"]]
    assert len(got) == 7 and set(got) <= set(uid[np.asarray(only)].tolist())
    assert all(doc["results"][i]["score"] >= doc["results"][i + 1]["score"] for i in range(6))


def test_evaluate_whole_graph_diffusion_equals_the_dense_closed_form():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 16))
    raw = np.maximum(np.repeat(centres, 10, axis=0) + 0.6 * rng.standard_normal((40, 16)), 0).astype(np.float32) + 0.01
    order = evaluate.run_options(raw, evaluate.parse_options("l2+diffusion5", diffusion_alpha=0.8))
    x = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    ids = np.arange(40)
    graph = _knn(x, ids, 5)
    for q in (0, 13, 39):
        f = _whole_graph(x, graph, 5, 0.8, np.eye(40)[q])
        d = np.linalg.norm(x.astype(np.float64) - x[q], axis=1)
        np.testing.assert_array_equal(order[q], _whole_order(f, d, ids, skip=[q]))


def test_evaluate_diffusion_alpha_and_tune_through_the_cli(tmp_path):
    from PIL import Image

    for c in range(3):
        (tmp_path / "set" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            px = textured(256, 256, seed=500 + c * 10 + i % 2).transpose(1, 2, 0)
            Image.fromarray(px).save(tmp_path / "set" / f"class{c}" / f"{i}.png")
    out = tmp_path / "ev"
    assert main(["evaluate", str(tmp_path / "set"), "--model", "probe", "--options", "l2", "l2+diffusion3",
                 "--diffusion-alpha", "0.7", "--tune", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    labels = [r["options"] for r in report["runs"]]
    assert labels[:2] == ["l2", "l2+diffusion3 (alpha 0.7)"]
    assert any("diffusion" in t["options"] for t in report["tuning"]["grid"])
