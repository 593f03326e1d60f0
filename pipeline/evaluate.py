"""Retrieval quality on a labelled image set (UC Merced layout:
one subfolder of images per class). Every image is a query against all the others; mAP,
precision@k and per-class AP are reported as a table, JSON and pictures.

The ranking goes through the same engine as ``search`` (:class:`~pipeline.search.SearchIndex`
over an in-memory dataset, each query excluding only itself). Post-processing, query expansion
(alpha-QE) and database-side augmentation (DBA) come from :mod:`pipeline.post`; with ``tune``,
their parameters are chosen on the queries of one half of each class and reported on the other.
"""

from __future__ import annotations

import json
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import grid, post
from pipeline.backbones import ModelSpec
from pipeline.embed import describe_weights, embed_batch
from pipeline.errors import DatasetError, PostprocessError
from pipeline.search.kernels import centroid_query
from pipeline.search.memory import memory_dataset
from pipeline.search.scorers import L2Scorer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
PRECISION_AT = (5, 10, 20, 50, 100)


def list_dataset(root: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Image paths, integer labels and class names of a folder-per-class dataset (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist; pass a folder with one subfolder of images per class"
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    if len(classes) < 2 or not paths:
        raise DatasetError(f"{root} needs at least two class subfolders holding images")
    return paths, np.array(labels), classes


def average_precision(relevant: np.ndarray) -> float:
    """AP of one ranked list (bool, best first) over all its relevant items."""
    hits = np.flatnonzero(relevant)
    if not len(hits):
        return 0.0
    return float(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))


def retrieval_metrics(ranked_labels: np.ndarray, query_labels: np.ndarray) -> dict[str, Any]:
    """mAP, P@k and AP per query from ``ranked_labels`` (m, n-1): labels of each query's ranking."""
    rel = ranked_labels == query_labels[:, None]
    ap = np.array([average_precision(r) for r in rel])
    out: dict[str, Any] = {"mAP": float(ap.mean()), "ap": ap}
    for k in PRECISION_AT:
        out[f"P@{k}"] = float(rel[:, :k].mean())
    return out


INDEX: ContextVar[tuple[str, str]] = ContextVar("INDEX", default=("", ""))  # (device, dtype) of evaluate's searches


def engine(x: np.ndarray, split_every: int = 8) -> Any:
    """The search engine over in-memory fingerprints ``x``, on the device and dtype of
    :data:`INDEX` (``evaluate --index-device/--index-dtype``), persisted there when set."""
    from pipeline.search import SearchIndex

    device, dtype = INDEX.get()
    index = SearchIndex(memory_dataset(x), split_every=split_every, device=device, dtype=dtype)
    return index.persist() if device else index


def rank_all(x: np.ndarray, queries: np.ndarray | None = None, split_every: int = 8) -> np.ndarray:
    """Row indices of every database item ranked for each query (the query itself excluded).

    ``x`` (n, d) database; ``queries`` (m, d) for the rows ``0..m-1`` of ``x`` (default ``x``).
    Returns int (m, n - 1), nearest first, through :class:`SearchIndex`.
    """
    from pipeline.search import Queries

    index = engine(x, split_every)
    q = x if queries is None else queries
    m = len(q)
    qs = Queries(
        np.asarray(q, np.float32), np.arange(m), np.zeros(m, np.int64), np.zeros(m, np.int64),
        np.full(m, np.nan), np.full(m, np.nan), np.full(m, np.nan),
    )  # fmt: skip
    results = index.search(qs, len(x) - 1)
    return np.stack([grid.unpack_uid(r.uid)[0] for r in results])


@dataclass(frozen=True)
class Options:
    post: str = "none"
    dims: int = 128
    qe: int = 0  # query expansion depth (0 = off)
    dba: int = 0  # database-side augmentation depth (0 = off)
    alpha: float = 3.0
    diffusion: int = 0  # k of the mutual k-NN graph for diffusion re-ranking (0 = off)
    diffusion_alpha: float = 0.9
    seeds: int = 0  # diffusion: 0, the whole graph; R, each query's exact top-R re-ranked (the rest in exact order)

    def label(self) -> str:
        s = self.post + (f"{self.dims}" if self.post == "pca" else "")
        if self.dba:
            s += f"+DBA{self.dba}"
        if self.qe:
            s += f"+aQE{self.qe}"
        s += f" (alpha {self.alpha:g})" if (self.qe or self.dba) else ""
        if self.diffusion:
            s += f"+diffusion{self.diffusion}" + (f"+seeds{self.seeds}" if self.seeds else "")
            s += f" (alpha {self.diffusion_alpha:g})"
        return s


def run_options(raw: np.ndarray, opts: Options, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Rankings (n, n-1) of every item after post-processing, DBA and QE."""
    t = post.fit(opts.post, raw if fit_rows is None else raw[fit_rows], opts.dims)
    x = t.apply(raw)
    if opts.dba:
        order = rank_all(x)
        x = post.expand_queries(x, x[order[:, : opts.dba]], opts.alpha)
    q = x
    if opts.qe:
        order = rank_all(x)
        q = post.expand_queries(x, x[order[:, : opts.qe]], opts.alpha)
    order = rank_all(x, q)
    if opts.diffusion and opts.seeds:
        order = diffuse_rankings(x, q, order, rank_all(x)[:, : opts.diffusion], opts)
    elif opts.diffusion:
        order = whole_graph_rankings(x, q, rank_all(x)[:, : opts.diffusion], opts)
    return order


def whole_graph_rankings(x: np.ndarray, q: np.ndarray, graph: np.ndarray, opts: Options, batch: int = 256) -> np.ndarray:
    """Every item ranked by diffusion over the whole mutual k-NN graph ``graph`` (row indices of
    each item's nearest items, from the engine), each query diffusing from its own node, as
    ``search --diffusion`` ranks a tile of the archive (:mod:`pipeline.diffusion`); unreached
    items follow in exact distance order (to the query's fingerprint ``q``)."""
    from pipeline import diffusion

    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = np.einsum("ij,ikj->ik", xn, xn[graph])
    s = diffusion.normalized(diffusion.mutual_graph(graph, sims, graph.shape[1]))
    n = len(x)
    out = np.empty((len(q), n - 1), dtype=np.int64)
    ids = np.arange(n)
    sq = (x.astype(np.float64) ** 2).sum(1)
    for a in range(0, len(q), batch):
        cols = np.arange(a, min(len(q), a + batch))
        y = np.zeros((n, len(cols)))
        y[cols, np.arange(len(cols))] = 1.0
        f = diffusion.solve(s, y, opts.diffusion_alpha)
        d2 = sq[:, None] - 2 * x.astype(np.float64) @ q[cols].astype(np.float64).T + (q[cols].astype(np.float64) ** 2).sum(1)
        for c, i in enumerate(cols):
            key = diffusion.rank_key(f[:, c], np.sqrt(np.maximum(d2[:, c], 0)))
            key[i] = np.inf  # the query itself
            out[i] = np.lexsort((ids, key))[: n - 1]
    return out


def diffuse_rankings(x: np.ndarray, q: np.ndarray, order: np.ndarray, graph: np.ndarray, opts: Options) -> np.ndarray:
    """Each query's exact top-``opts.seeds`` re-ranked by diffusion on the mutual k-NN graph
    ``graph`` (row indices of each item's nearest items, from the engine), exactly as ``search
    --diffusion`` does (:mod:`pipeline.diffusion`); the rest of each ranking keeps its order."""
    from pipeline import diffusion

    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = np.einsum("ij,ikj->ik", xn, xn[graph])  # cosine of each item to its graph neighbours
    ids = np.arange(len(x), dtype=np.uint64)
    out = order.copy()
    r = min(opts.seeds, order.shape[1])
    for i in range(len(order)):
        seeds = order[i, :r]
        a = diffusion.subgraph(ids[seeds], ids[graph[seeds]], sims[seeds], graph.shape[1])
        f = diffusion.diffuse(a, diffusion.initial(q[i], x[seeds], graph.shape[1]), opts.diffusion_alpha)
        out[i, :r] = seeds[np.lexsort((seeds, -f))]
    return out


def fingerprint_images(paths: list[str], spec: ModelSpec) -> np.ndarray:
    from pipeline.query import load_image

    out = np.empty((len(paths), spec.dim), np.float32)
    step = 256
    for s in range(0, len(paths), step):
        out[s : s + step] = embed_batch(np.stack([load_image(p) for p in paths[s : s + step]]), spec)
    return out


def tune(raw: np.ndarray, labels: np.ndarray, settings: list[Options]) -> tuple[Options, list[dict]]:
    """Pick the options with the best mAP over the queries of one half of each class."""
    half_a = _halves(labels)
    trials = []
    for opts in settings:
        m = retrieval_metrics(labels[run_options(raw, opts)][half_a], labels[half_a])
        trials.append({"options": opts.label(), "mAP_tuning_half": m["mAP"]})
    best = settings[int(np.argmax([t["mAP_tuning_half"] for t in trials]))]
    return best, trials


def _halves(labels: np.ndarray) -> np.ndarray:
    """bool: the first half (even positions) of each class's images."""
    half = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        half[idx[::2]] = True
    return half


EXAMPLE_METHODS = ("single", "centroid", "nearest", "classifier")


def evaluate_examples(
    raw: np.ndarray,
    labels: np.ndarray,
    options: list[Options],
    n: int,
    draws: int = 4,
    background: int = 200,
    seed: int = 0,
) -> list[dict]:
    """Example sets against single-example queries, through the same engine.

    Per class and draw (seeded): ``n`` positives of the class and ``n`` negatives from the other
    classes; every other image is ranked (the examples excluded) by each method: each positive
    alone (``single``, averaged over the ``n``), the ``centroid`` of the set, the ``nearest``
    scoring, and the ``classifier`` (logistic regression on the examples plus ``background``
    random other images as negatives). AP and P@k are against the class, averaged over classes
    and draws. The post-processing of each ``options`` applies (their DBA / QE do not).
    """
    from sklearn.linear_model import LogisticRegression

    from pipeline.search.scorers import CentroidScorer, LinearScorer, NearestScorer

    rows = []
    classes = np.unique(labels)
    for opts in options:
        x = post.fit(opts.post, raw, opts.dims).apply(raw)
        index = engine(x)
        scores: dict[str, list[dict]] = {m: [] for m in EXAMPLE_METHODS}
        for c in classes:
            inside, outside = np.flatnonzero(labels == c), np.flatnonzero(labels != c)
            for d in range(draws):
                rng = np.random.default_rng(seed + 1000 * int(c) + d)
                pos = rng.choice(inside, min(n, len(inside) - 1), replace=False)
                neg = rng.choice(outside, n, replace=False)
                examples = np.concatenate([pos, neg])
                rest = len(x) - len(examples)
                pool = np.setdiff1d(np.arange(len(x)), examples)
                bg = rng.choice(pool, min(background, len(pool)), replace=False)

                mp, mn = x[pos], x[neg]
                clf = LogisticRegression(class_weight="balanced", max_iter=2000)
                clf.fit(np.concatenate([mp, mn, x[bg]]), np.r_[np.ones(len(mp)), np.zeros(len(mn) + len(bg))])
                runs = {
                    "single": (L2Scorer(mp.astype(np.float32)), len(pos)),
                    "centroid": (CentroidScorer(centroid_query(mp, mn, 0.5)[None].astype(np.float32)), 1),
                    "nearest": (NearestScorer((mp,), (mn,), (0.5,)), 1),
                    "classifier": (LinearScorer(clf.coef_.astype(np.float32), clf.intercept_.astype(np.float64)), 1),
                }
                for method, (scorer, columns) in runs.items():
                    results = index.run(scorer, _excluding(examples, columns), k=rest)
                    ranked = np.stack([grid.unpack_uid(r.uid)[0] for r in results])
                    m = retrieval_metrics(labels[ranked], np.full(len(ranked), c))
                    scores[method].append({k: v for k, v in m.items() if k != "ap"})
        for method in EXAMPLE_METHODS:
            got = scores[method]
            row = {"options": opts.label(), "method": method, "n_examples": n, "sets": len(got)}
            row.update({k: float(np.mean([g[k] for g in got])) for k in got[0]})
            rows.append(row)
    return rows


def _excluding(examples: np.ndarray, columns: int):
    """Every example image excluded from every column's ranking (in-memory items: one image each)."""
    from pipeline.search.kernels import Exclusions

    j = np.repeat(np.arange(columns), len(examples))
    e = np.tile(examples, columns).astype(np.int64)
    zero, nan = np.zeros(len(e), np.int64), np.full(len(e), np.nan)
    return Exclusions(j, e, zero, zero.copy(), nan, nan.copy(), nan.copy())


def evaluate(
    dataset: str,
    spec: ModelSpec,
    options: list[Options],
    out: Path | None = None,
    tune_grid: bool = False,
    n_examples: int = 0,
    index_device: str = "",
    index_dtype: str = "",
) -> dict:
    """Fingerprint the dataset once, then report every option (and a tuned one when asked; and
    example sets of ``n_examples`` positives and negatives against single examples). Rankings
    run on ``index_device`` in ``index_dtype`` (:data:`INDEX`; default the NumPy engine, float32)."""
    token = INDEX.set((index_device, index_dtype))
    try:
        return _evaluate(dataset, spec, options, out, tune_grid, n_examples)
    finally:
        INDEX.reset(token)


def _evaluate(dataset: str, spec: ModelSpec, options: list[Options], out: Path | None, tune_grid: bool,
              n_examples: int) -> dict:  # fmt: skip
    paths, labels, classes = list_dataset(dataset)
    t0 = time.perf_counter()
    raw = fingerprint_images(paths, spec)
    report: dict[str, Any] = {
        "dataset": str(Path(dataset).resolve()),
        "images": len(paths),
        "classes": classes,
        "model": spec.arch,
        "weights": describe_weights(spec.arch, spec.weights, spec.seed)["weights_id"],
        "fingerprint_seconds": time.perf_counter() - t0,
        "index_device": INDEX.get()[0] or "numpy",
        "index_dtype": INDEX.get()[1] or "float32",
        "runs": [],
    }
    half_b = ~_halves(labels)
    if tune_grid:
        depths = [(0, 0), (0, 10), (10, 0), (5, 5), (10, 10)]  # (dba, qe)
        settings = [Options(p, dba=d, qe=q, alpha=a) for p in ("l2", "hellinger") for d, q in depths
                    for a in (1.0, 3.0) if (d or q or a == 3.0)]  # fmt: skip
        settings += [Options(p, diffusion=k, diffusion_alpha=a) for p in ("l2", "hellinger") for k in (20, 30, 50)
                     for a in (0.85, 0.9, 0.95)]  # fmt: skip
        best, trials = tune(raw, labels, settings)
        report["tuning"] = {"grid": trials, "chosen": best.label()}
        options = [*options, best]
    for opts in options:
        order = run_options(raw, opts)
        m = retrieval_metrics(labels[order], labels)
        held = retrieval_metrics(labels[order][half_b], labels[half_b])
        per_class = {c: float(m["ap"][labels == i].mean()) for i, c in enumerate(classes)}
        run = {"options": opts.label(), **{k: v for k, v in m.items() if k != "ap"}, "mAP_held_out_half": held["mAP"],
               "per_class_AP": per_class}  # fmt: skip
        report["runs"].append(run)
        if out is not None and opts is options[-1]:
            _pictures(out, paths, labels, classes, order, m["ap"], per_class, opts.label())
    if n_examples:
        report["examples"] = evaluate_examples(raw, labels, options, n_examples)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def table(report: dict) -> str:
    cols = ["mAP", *[f"P@{k}" for k in PRECISION_AT], "mAP_held_out_half"]
    lines = [f"{report['model']} / {report['weights']} on {report['images']} images, {len(report['classes'])} classes",
             f"{'options':<32} " + " ".join(f"{c:>8}" for c in cols[:-1]) + "  held-out mAP"]  # fmt: skip
    for r in report["runs"]:
        lines.append(
            f"{r['options']:<32} " + " ".join(f"{r[c]:8.3f}" for c in cols[:-1]) + f"  {r['mAP_held_out_half']:12.3f}"
        )
    if report.get("examples"):
        n = report["examples"][0]["n_examples"]
        lines += ["", f"example sets: {n} positives + {n} negatives per set, 4 sets per class, examples excluded",
                  f"{'options':<20} {'method':<11} " + " ".join(f"{c:>8}" for c in cols[:-1])]  # fmt: skip
        for r in report["examples"]:
            lines.append(f"{r['options']:<20} {r['method']:<11} " + " ".join(f"{r[c]:8.3f}" for c in cols[:-1]))
    return "\n".join(lines)


def _pictures(out: Path, paths, labels, classes, order, ap, per_class, title: str) -> None:
    """per_class_ap.png (bar chart) and best_worst.png (3 best, 3 worst queries, top 5 each)."""
    from pipeline.query import load_image
    from pipeline.render import bar_chart, sheet

    out.mkdir(parents=True, exist_ok=True)
    ranked = sorted(per_class.items(), key=lambda kv: -kv[1])
    bar_chart(f"per-class AP: {title}", [c for c, _ in ranked], [v for _, v in ranked], str(out / "per_class_ap.png"))
    picks = list(np.argsort(-ap)[:3]) + list(np.argsort(ap)[:3])
    tiles, labs = [], []
    for q in picks:
        tiles.append(load_image(paths[q]))
        labs.append(f"Q {classes[labels[q]][:14]} AP {ap[q]:.2f}")
        for r in order[q, :5]:
            tiles.append(load_image(paths[r]))
            labs.append(("ok " if labels[r] == labels[q] else "x ") + classes[labels[r]][:16])
    sheet(tiles, labs, columns=6, highlight_first=False).save(out / "best_worst.png")


def parse_options(text: str, diffusion_alpha: float = 0.9) -> Options:
    """``post[:dims][+dbaN][+qeN][+diffusionN][@alpha]``, e.g. ``l2``, ``pca:128``,
    ``hellinger+dba10+qe10@3``, ``hellinger+diffusion30`` (its alpha: ``diffusion_alpha``).

    Unknown tokens are errors that list the valid ones (a typo never runs as something else)."""
    original, alpha = text, 3.0
    if "@" in text:
        text, a = text.split("@", 1)
        try:
            alpha = float(a)
        except ValueError:
            raise PostprocessError(f"--options {original!r}: alpha after '@' must be a number, got {a!r}") from None
    parts = text.split("+")
    name, _, dims = parts[0].partition(":")
    if name not in post.METHODS:
        raise PostprocessError(
            f"--options {original!r}: unknown post-processing {name!r}; choose one of {', '.join(post.METHODS)}"
        )
    kw: dict[str, Any] = {"post": name, "alpha": alpha, "diffusion_alpha": diffusion_alpha}
    if dims:
        if not dims.isdigit():
            raise PostprocessError(f"--options {original!r}: pca dimensions must be an integer, like pca:128")
        kw["dims"] = int(dims)
    for p in parts[1:]:
        m = re.fullmatch(r"(dba|qe|diffusion|seeds)(\d+)", p)
        if not m or int(m.group(2)) < 1:
            raise PostprocessError(
                f"--options {original!r}: unknown token {p!r}; valid tokens after the post-processing are "
                f"dbaN, qeN, diffusionN and seedsN with N >= 1 (e.g. hellinger+dba10+qe10@1, hellinger+diffusion30, "
                f"hellinger+diffusion30+seeds1000)"
            )
        kw[m.group(1)] = int(m.group(2))
    if kw.get("seeds") and not kw.get("diffusion"):
        raise PostprocessError(f"--options {original!r}: seedsN truncates diffusion: it needs diffusionK too")
    return Options(**kw)
