"""Retrieval metrics and post-processing against hand-written NumPy implementations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import evaluate, post


def numpy_rankings(x: np.ndarray, q: np.ndarray | None = None) -> np.ndarray:
    """Brute force: every row ranked by Euclidean distance to each query row, itself excluded,
    ties by index (the engine breaks ties by uid, which grows with the index here)."""
    q = x if q is None else q
    d = np.sqrt(((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    out = []
    for i in range(len(q)):
        idx = np.array([j for j in range(len(x)) if j != i])
        out.append(idx[np.lexsort((idx, d[i, idx]))])
    return np.stack(out)


def hand_map(order: np.ndarray, labels: np.ndarray) -> tuple[float, dict[int, float]]:
    aps = []
    for i, row in enumerate(order):
        hits, prec = 0, []
        for rank, j in enumerate(row, start=1):
            if labels[j] == labels[i]:
                hits += 1
                prec.append(hits / rank)
        aps.append(sum(prec) / len(prec))
    pk = {k: np.mean([np.mean(labels[row[:k]] == labels[i]) for i, row in enumerate(order)]) for k in (5, 10)}
    return float(np.mean(aps)), pk


@pytest.fixture
def labelled():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    centres = rng.normal(0, 1, (4, 32))
    x = np.maximum(centres[labels] + rng.normal(0, 1.2, (60, 32)), 0).astype(np.float32)
    return x, labels


def test_metrics_equal_a_hand_computation(labelled):
    x, labels = labelled
    order = evaluate.rank_all(x)
    np.testing.assert_array_equal(order, numpy_rankings(x))  # the engine's ranking
    m = evaluate.retrieval_metrics(labels[order], labels)
    ref_map, ref_p = hand_map(order, labels)
    assert m["mAP"] == pytest.approx(ref_map, abs=1e-12)
    assert m["P@5"] == pytest.approx(ref_p[5]) and m["P@10"] == pytest.approx(ref_p[10])
    assert 0.3 < m["mAP"] < 1.0  # neither trivial nor chance on this set


@pytest.mark.parametrize("method", ["none", "l2", "hellinger", "pca"])
def test_post_processing_rankings_equal_numpy(labelled, method):
    x, _ = labelled
    t = post.fit(method, x, dims=8)
    if method == "none":
        ref = x
    elif method == "l2":
        ref = x / np.linalg.norm(x, axis=1, keepdims=True)
    elif method == "hellinger":
        h = np.sqrt(x)
        ref = h / np.linalg.norm(h, axis=1, keepdims=True)
    else:
        c = x.astype(np.float64) - x.mean(0)
        val, vec = np.linalg.eigh(np.cov(c, rowvar=False))
        top = np.argsort(val)[::-1][:8]
        z = c @ (vec[:, top] / np.sqrt(val[top] + 1e-6))
        ref = z / np.linalg.norm(z, axis=1, keepdims=True)
    got = t.apply(x)
    # eigenvector signs are arbitrary: compare rankings, which do not depend on them
    np.testing.assert_array_equal(evaluate.rank_all(got), numpy_rankings(ref.astype(np.float32)))


def test_query_expansion_equals_numpy(labelled):
    x, labels = labelled
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    order = numpy_rankings(xn)
    depth, alpha = 4, 3.0
    ref = []
    for i in range(len(xn)):
        acc = xn[i].astype(np.float64).copy()
        for j in order[i, :depth]:
            acc += max(float(xn[i] @ xn[j]), 0.0) ** alpha * xn[j]
        ref.append(acc / np.linalg.norm(acc))
    got = post.expand_queries(xn, xn[order[:, :depth]], alpha)
    np.testing.assert_allclose(got, np.array(ref), atol=1e-5)
    ranked = evaluate.run_options(x, evaluate.Options("l2", qe=depth, alpha=alpha))
    np.testing.assert_array_equal(ranked, numpy_rankings(xn, got))


def test_option_strings():
    o = evaluate.parse_options("hellinger+dba10+qe5@2")
    assert (o.post, o.dba, o.qe, o.alpha) == ("hellinger", 10, 5, 2.0)
    assert evaluate.parse_options("pca:64").dims == 64
    with pytest.raises(ValueError, match="unknown post-processing"):
        evaluate.parse_options("bogus")


def test_evaluate_three_ucmerced_classes_end_to_end(data_dir, tmp_path):
    """The CLI on real labelled imagery matches a NumPy evaluation of the same fingerprints."""
    from PIL import Image

    from pipeline.cli import main
    from pipeline.embed import ModelSpec

    root = tmp_path / "ucm3"
    for c in ("airplane", "beach", "forest"):
        (root / c).mkdir(parents=True)
        for p in sorted((data_dir / "ucmerced" / c).iterdir())[:12]:
            (root / c / p.name).symlink_to(p)
    out = tmp_path / "ev"
    assert main(["evaluate", str(root), "--model", "probe", "--options", "none", "l2", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 36 and report["classes"] == ["airplane", "beach", "forest"]
    paths, labels, _ = evaluate.list_dataset(root)
    raw = evaluate.fingerprint_images(paths, ModelSpec(arch="probe", weights="random"))
    for run, x in zip(report["runs"], (raw, raw / np.linalg.norm(raw, axis=1, keepdims=True))):
        ref_map, ref_p = hand_map(numpy_rankings(x), labels)
        assert run["mAP"] == pytest.approx(ref_map, abs=1e-6) and run["P@5"] == pytest.approx(ref_p[5])
    for name in ("per_class_ap.png", "best_worst.png"):
        Image.open(out / name).verify()
    # 256 x 256 rule: UC Merced holds a few smaller images; all became one window each.
    sizes = {Image.open(p).size for p in paths}
    assert (256, 256) in sizes


def test_unknown_option_tokens_are_errors_that_list_the_valid_ones():
    for text, msg in [("hellinger+dab10", "unknown token 'dab10'"), ("l2+knn30", "dbaN, qeN, diffusionN and seedsN"),
                      ("l2@x", "must be a number"), ("pca:x", "integer")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            evaluate.parse_options(text)


def test_evaluate_without_options_runs_the_default(tmp_path, capsys):
    """`evaluate DATASET` with no --options: the default is parsed like a given option."""
    from conftest import textured
    from PIL import Image

    from pipeline.cli import main

    for c, seed in (("fields", 1), ("roofs", 2)):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(3):
            px = textured(256, 256, seed=seed * 10 + i)
            Image.fromarray(px.transpose(1, 2, 0)).save(tmp_path / "set" / c / f"{i}.png")
    out = tmp_path / "ev"
    assert main(["evaluate", str(tmp_path / "set"), "--model", "probe", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert [r["options"] for r in report["runs"]] == ["none"] and report["images"] == 6
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "nothing"), "--model", "probe"]) == 2
    assert "does not exist" in capsys.readouterr().err
