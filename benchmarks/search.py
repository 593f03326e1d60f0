"""Search speed versus k and N: this project (in memory, and from the store in a fresh process),
a NumPy reference and faiss IndexFlatL2, in one run. Writes benchmarks/search.json.

    pip install faiss-cpu          # benchmark-only dependency
    python benchmarks/search.py    # N = 45,000 / 1,000,000 (float32) / 10,000,000 (float16)
    python benchmarks/search.py --sizes 45000 1000000    # skip the 10M store (10 GB on disk)
    python benchmarks/search.py --against 6438984        # this tree against an older commit, same run
    python benchmarks/search.py --classifier             # a classifier's scoring pass against a search, 1M

Fingerprints are synthetic (ReLU'd Gaussian 512-d vectors, like pooled CNN features), written as
real stores with the project's schema. At 10M only the project's float16 paths run: a float32
copy for NumPy or faiss (20 GB) does not fit in 24 GiB next to the store's page cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import harness
import numpy as np

from pipeline import grid
from pipeline.resources import cpu_count
from pipeline.schema import META_CHUNK_FACTOR, SCHEMA_VERSION
from pipeline.search import Queries, SearchIndex
from pipeline.store import consolidate, fingerprint_compressors, open_store

DIM = 512
IMAGE_SIDE = 10_240  # px: 79 x 79 windows per synthetic image


def synthetic_store(
    path: Path, n: int, dtype: str, chunk_tiles: int = 8192, seed: int = 0, latent: int = 0, cluster: int = 0
) -> Path:
    """A store with ``n`` synthetic tiles laid out like an ingest of 10,240 px images.

    Fingerprints: ReLU'd i.i.d. Gaussians (``latent`` 0: no neighbourhood structure at all, the
    worst case for any approximate search), or, with ``latent`` d, ReLU(z W + 0.1 e) with z
    ~ N(0, I_d), a fixed W (d x 512) and noise e: points on a d-dimensional manifold, as CNN
    features of imagery are (their intrinsic dimension is tens, not 512). With ``cluster`` c:
    consecutive groups of c tiles around shared centres (ReLU(centre + 0.3 e)), so that each
    tile's c - 1 nearest tiles are its group (a k-NN graph known without a brute force)."""
    import dask.array as da
    import xarray as xr

    if (path / "zarr.json").exists():
        if _current(path):
            return path
        shutil.rmtree(path)  # made by an older version of this script: made again
    per_img = grid.windows_per_axis(IMAGE_SIDE) ** 2
    n_img = -(-n // per_img)
    slot = np.arange(n, dtype=np.int64)
    image, within = slot // per_img, slot % per_img
    side = grid.windows_per_axis(IMAGE_SIDE)
    row, col = (within // side) * grid.STRIDE, (within % side) * grid.STRIDE
    lon = -100.0 + image * 0.01 + col * 1e-6
    lat = 40.0 + row * 1e-6
    rs = da.random.RandomState(seed)
    if cluster:
        groups = -(-n // cluster)
        centres = rs.standard_normal((groups, DIM), chunks=(max(1, chunk_tiles // cluster), DIM)).astype(np.float32)
        rep = da.repeat(centres, cluster, axis=0)[:n].rechunk((chunk_tiles, DIM))
        noise = rs.standard_normal((n, DIM), chunks=(chunk_tiles, DIM)).astype(np.float32)
        fp = da.maximum(rep + 0.3 * noise, 0).astype(dtype)
    elif latent:
        w = np.random.default_rng(seed).standard_normal((latent, DIM)).astype(np.float32) / np.sqrt(latent)
        z = rs.standard_normal((n, latent), chunks=(chunk_tiles, latent)).astype(np.float32)
        noise = rs.standard_normal((n, DIM), chunks=(chunk_tiles, DIM)).astype(np.float32)
        fp = da.maximum(z @ w + 0.1 * noise, 0).astype(dtype)
    else:
        fp = da.maximum(rs.standard_normal((n, DIM), chunks=(chunk_tiles, DIM)), 0).astype(dtype)
    ch = lambda a: da.from_array(a, chunks=chunk_tiles * META_CHUNK_FACTOR)  # noqa: E731 (as ingest writes)
    ds = xr.Dataset(
        {
            "fingerprint": (("tile", "feature"), fp),
            "valid": ("tile", da.ones(n, dtype=bool, chunks=chunk_tiles)),
            "uid": ("tile", ch(grid.pack_uid(image, row, col))),
            "image": ("tile", ch(image.astype(np.int32))),
            "row": ("tile", ch(row.astype(np.int32))),
            "col": ("tile", ch(col.astype(np.int32))),
            "lon": ("tile", ch(lon)),
            "lat": ("tile", ch(lat)),
            "image_path": ("img", np.array([f"synthetic/img_{i:06d}.tif" for i in range(n_img)], dtype=object)),
            "width": ("img", np.full(n_img, IMAGE_SIDE, np.int64)),
            "height": ("img", np.full(n_img, IMAGE_SIDE, np.int64)),
            "crs": ("img", np.array([""] * n_img, dtype=object)),
            "transform": (("img", "affine"), np.tile([1.0, 0, 0, 0, 1.0, 0], (n_img, 1))),
            "tile_start": ("img", np.arange(n_img, dtype=np.int64) * per_img),
            "tile_count": ("img", np.minimum(per_img, n - np.arange(n_img) * per_img)),
            "status": ("img", np.array(["done"] * n_img, dtype=object)),
            **_other_image_columns(n_img),
        },
        attrs={
            "schema_version": SCHEMA_VERSION,
            "model": {"arch": "synthetic", "dim": DIM},
            "layout": {"chunk_tiles": chunk_tiles, "chunk_px": 2**20},
        },  # fmt: skip
    )
    print(f"writing synthetic store {path} ({n:,} x {DIM} {dtype}) ...", flush=True)
    encoding = {"fingerprint": {"compressors": fingerprint_compressors("lz4")}}  # the ingest default
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    consolidate(path)  # schema 2: readers open the consolidated metadata
    return path


def _other_image_columns(n_img: int) -> dict:
    """The image table's other columns (the schema's), at their fill values: a whole store, so
    that `aerial-search info` and the server's `GET /api/info` work on it too."""
    from pipeline.schema import VAR

    given = {"image_path", "width", "height", "crs", "transform", "tile_start", "tile_count", "status"}
    out = {}
    for name in (n for n, v in VAR.items() if v.role == "img" and n not in given):
        v = VAR[name]
        if v.dtype == "str":
            out[name] = ("img", np.array([""] * n_img, dtype=object))
        elif v.dtype.startswith("datetime64"):
            out[name] = ("img", np.full(n_img, np.datetime64("NaT"), dtype=v.dtype))
        else:
            out[name] = ("img", np.full(n_img, 0 if v.fill is None else v.fill, dtype=v.dtype))
    return out


def _current(path: Path) -> bool:
    """Whether a cached synthetic store has this schema version, a boolean ``valid`` and the image
    table's time columns (without them `aerial-search info` and `GET /api/info` failed on it)."""
    from pipeline.errors import StoreError

    try:
        ds = open_store(path)
        return ds["valid"].dtype == bool and "acquired" in ds
    except StoreError:
        return False


def timed(fn, repeat: int) -> tuple[float, object]:
    """The median seconds of ``repeat`` runs and the last result (harness.timed, no warm-up)."""
    t = harness.timed(fn, repeat)
    return t.median, t.value


def numpy_reference(x: np.ndarray, sqnorm: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Precomputed norms + one matrix product + argpartition; sort only the top k. Distances
    tile-major ``(n, m)``: the selection runs down strided columns."""
    d2 = sqnorm[:, None] - 2.0 * (x @ q.T) + np.einsum("ij,ij->i", q, q)[None, :]
    top = np.argpartition(d2, k - 1, axis=0)[:k]
    order = np.take_along_axis(d2, top, axis=0).argsort(axis=0)
    return np.take_along_axis(top, order, axis=0).T


def numpy_reference_by_query(x: np.ndarray, sqnorm: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The same with distances query-major ``(m, n)``: each query's row contiguous for the
    selection. The benchmark reports the faster of the two layouts as NumPy's time."""
    d2 = sqnorm[None, :] - 2.0 * (q @ x.T) + np.einsum("ij,ij->i", q, q)[:, None]
    top = np.argpartition(d2, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(d2, top, axis=1).argsort(axis=1)
    return np.take_along_axis(top, order, axis=1)


def best_numpy(x, sqnorm, q, k, repeat) -> tuple[float, np.ndarray, str]:
    """NumPy's time in its faster layout (both computed, same runs), its result and the layout."""
    t_rows, ref = timed(lambda: numpy_reference(x, sqnorm, q, k), repeat)
    t_cols, ref2 = timed(lambda: numpy_reference_by_query(x, sqnorm, q, k), repeat)
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(ref, ref2)), "NumPy layouts disagree"
    return (t_rows, ref, "tile-major") if t_rows <= t_cols else (t_cols, ref2, "query-major")


def child_store_search(path: str, k: int, seed: int) -> None:
    """Fresh process: open the store and answer one query from it (no index in memory)."""
    t0 = time.perf_counter()
    index = SearchIndex.open(path)
    index.half_m  # noqa: B018 (reads the image table)
    q = np.maximum(np.random.default_rng(seed).standard_normal((1, DIM)), 0).astype(np.float32)
    t1 = time.perf_counter()
    [res] = index.search(Queries.from_fingerprints(q), k)
    t2 = time.perf_counter()
    nbytes = index.ds["fingerprint"].nbytes
    print(json.dumps({"open_s": t1 - t0, "search_s": t2 - t1, "fingerprint_bytes": int(nbytes),
                      "uids": [str(u) for u in res.uid]}))  # fmt: skip


CHILD_TIMING = """
import json, statistics, sys, time
import numpy as np
from pipeline.resources import keep_freed_memory
from pipeline.search import Queries, SearchIndex
keep_freed_memory()  # as the CLI (serve, search) sets malloc before any work
index = SearchIndex.open({store!r}).persist()
q = np.maximum(np.random.default_rng(7).standard_normal(({m}, {dim})), 0).astype(np.float32)
queries = Queries.from_fingerprints(q)
for _ in range(5):
    res = index.search(queries, {k})  # warm-up: first-touch costs are not search costs
times = []
for _ in range({repeat}):
    t0 = time.perf_counter()
    res = index.search(queries, {k})
    times.append(time.perf_counter() - t0)
print(json.dumps({{"times": times, "uids": [[str(u) for u in r.uid] for r in res[:3]]}}))
"""


def compare_commits(rev: str, sizes: list[int], work: Path, repeat: int, rounds: int, out: Path,
                    dtype: str = "float32") -> None:  # fmt: skip
    """This working tree ("new") against commit ``rev`` ("old"): the same synthetic stores, the
    same child script, each contender in its own fresh process, interleaved old/new ``rounds``
    times so that machine drift hits both; medians over all timed searches. Several processes
    matter: on the 2-core machine a process's 1M x 100 searches run at either ~2.6 s or ~3.9 s
    for its whole life (BLAS thread placement), whichever commit it runs."""
    trees = {"old": harness.worktree(rev, work), "new": harness.ROOT}
    rows = []
    for n in sizes:
        path = synthetic_store(work / f"synth-{n}-{dtype}.zarr", n, dtype)
        for m in (1, 100) if n >= 1_000_000 else (1,):
            times: dict[str, list[float]] = {"old": [], "new": []}
            uids = {}
            for _ in range(rounds):
                for name in ("old", "new"):
                    reps = repeat if n >= 1_000_000 else max(repeat, 50)  # small N: ms each, so more
                    code = CHILD_TIMING.format(store=str(path), m=m, dim=DIM, k=10, repeat=reps)
                    doc = harness.child(code, trees[name])
                    times[name] += doc["times"]
                    uids[name] = doc["uids"]
            assert uids["old"] == uids["new"], "old and new commits disagree on the results"
            med = {name: harness.median(t) for name, t in times.items()}
            per_process = {name: [harness.median(t[i : i + len(t) // rounds]) for i in range(0, len(t), len(t) // rounds)]
                           for name, t in times.items()}  # fmt: skip
            row = {"n": n, "dtype": dtype, "queries": m, "k": 10, "old_rev": rev, "old_ms": med["old"] * 1e3, "new_ms": med["new"] * 1e3,
                   "new_over_old": med["new"] / med["old"], "new_minus_old_ms": (med["new"] - med["old"]) * 1e3,
                   "timed_searches_each": len(times["new"]),
                   "per_process_median_ms": {k2: [round(v * 1e3, 2) for v in vs] for k2, vs in per_process.items()}}  # fmt: skip
            rows.append(row)
            harness.show(row)
    harness.write(out, {"rows": rows, "note": "medians over all timed searches of all rounds"}, against=rev)
    print(f"\n{'N':>11} {'q':>4} | {'old ms':>9} {'new ms':>9} | new/old  new-old ms")
    for r in rows:
        print(f"{r['n']:>11,} {r['queries']:>4} | {r['old_ms']:9.2f} {r['new_ms']:9.2f} | "
              f"{r['new_over_old']:7.3f}  {r['new_minus_old_ms']:9.2f}")  # fmt: skip


def classifier_pass(work: Path, n: int, repeat: int, out: Path) -> None:
    """A classifier's scoring pass over a persisted index against a single-query search, same
    run, same index (k = 10 both, median of ``repeat``); fitting timed apart."""
    from pipeline.classify import fit
    from pipeline.search.kernels import ExampleSet, Exclusions

    path = synthetic_store(work / f"synth-{n}-float32.zarr", n, "float32")
    index = SearchIndex.open(str(path)).persist()
    q = np.maximum(np.random.default_rng(1).standard_normal((1, DIM)), 0).astype(np.float32)
    queries = Queries.from_fingerprints(q)
    uids = open_store(path)["uid"].values
    pos = index.queries_from_uids([int(u) for u in uids[[10, 20_000, 400_000, 700_000, 999_000]]])[0]
    neg = index.queries_from_uids([int(u) for u in uids[[50, 60_000, 500_000, 800_000, 990_000]]])[0]
    fitting = harness.timed(lambda: fit(index, ExampleSet(pos, neg), background=200), repeat=1)
    model, fit_s = fitting.value, fitting.median
    scorer = model.scorer()
    index.search(queries, 10)
    index.run(scorer, Exclusions.none(), k=10)
    search_s, _ = timed(lambda: index.search(queries, 10), repeat)
    classify_s, _ = timed(lambda: index.run(scorer, Exclusions.none(), k=10), repeat)
    row = {"n": n, "single_query_search_s": search_s, "classifier_pass_s": classify_s,
           "classifier_over_search": classify_s / search_s, "fit_s": fit_s, "repeat": repeat}  # fmt: skip
    harness.show(row)
    harness.write(out, row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[45_000, 1_000_000, 10_000_000])
    ap.add_argument("--workdir", default="/tmp/aerial-search-bench")
    ap.add_argument("--out", default=str(Path(__file__).with_name("search.json")))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--against", metavar="REV", help="compare this tree with commit REV (k = 10, 1 and 100 queries)")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="--against: the stores' dtype")
    ap.add_argument("--rounds", type=int, default=5, help="--against: interleaved old/new process pairs per row")
    ap.add_argument("--classifier", action="store_true", help="time a classifier's scoring pass against a search, 1M")
    args = ap.parse_args()
    if args.child:
        child_store_search(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    if args.classifier:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        classifier_pass(work, 1_000_000, max(args.repeat, 7), Path(__file__).with_name("classifier.json"))
        return
    if args.against:
        sizes = args.sizes if args.sizes != ap.get_default("sizes") else [45_000, 1_000_000]
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        given = args.out != ap.get_default("out")  # an --out given names the file, else search_split.json
        out = Path(args.out) if given else Path(__file__).with_name("search_split.json")
        compare_commits(args.against, sizes, work, max(args.repeat, 7), args.rounds, out, args.dtype)
        return
    try:
        import faiss

        faiss.omp_set_num_threads(cpu_count())  # the same threads as the project's dask threads
    except ImportError:
        faiss = None
        print("faiss-cpu not installed: its column stays empty (pip install faiss-cpu)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    ks = (2, 5, 10, 100)
    for n in args.sizes:
        dtype = "float32" if n <= 1_000_000 else "float16"
        path = synthetic_store(work / f"synth-{n}-{dtype}.zarr", n, dtype)
        index = SearchIndex.open(str(path))
        t0 = time.perf_counter()
        index.persist()
        load_s = time.perf_counter() - t0
        q = np.maximum(np.random.default_rng(1).standard_normal((1, DIM)), 0).astype(np.float32)
        queries = Queries.from_fingerprints(q)
        x = sqnorm = fidx = None
        if dtype == "float32":
            x = open_store(path)["fingerprint"].values
            sqnorm = np.einsum("ij,ij->i", x, x)
            if faiss is not None:
                fidx = faiss.IndexFlatL2(DIM)
                fidx.add(x)
        repeat = args.repeat if n <= 1_000_000 else min(args.repeat, 3)  # 10M: ~6 s per query
        for k in ks if n <= 1_000_000 else (10,):
            row = {"n": n, "dtype": dtype, "k": k, "queries": 1, "index_load_s": load_s}
            row["project_memory_s"], [res] = timed(lambda: index.search(queries, k), repeat)
            if x is not None:
                row["numpy_s"], ref, row["numpy_layout"] = best_numpy(x, sqnorm, q, k, repeat)
                uid = open_store(path)["uid"].values
                assert np.array_equal(res.uid, uid[ref[0]]), "project and NumPy disagree"
            if fidx is not None:
                row["faiss_s"], (fd, fi) = timed(lambda: fidx.search(q, k), repeat)
                assert set(fi[0].tolist()) == set(ref[0].tolist()), "faiss and NumPy disagree"
            children = []
            for _ in range(max(3, min(repeat, 5))):  # fresh processes: the median of 3 or more
                _, out = harness.wall([sys.executable, __file__, "--child", str(path), str(k), "1"], check=True)
                children.append(json.loads(out.stdout.strip().splitlines()[-1]))
                assert children[-1]["uids"] == [str(u) for u in res.uid], "store path and in-memory path disagree"
            total = [c["open_s"] + c["search_s"] for c in children]
            child = children[total.index(statistics.median_low(total))]
            row["project_store_s"] = child["open_s"] + child["search_s"]
            row["project_store_runs_s"] = total
            row["store_open_s"] = child["open_s"]
            row["store_read_gb_per_s"] = child["fingerprint_bytes"] / child["search_s"] / 1e9
            rows.append(row)
            harness.show(row)
        if n == 1_000_000 and x is not None:
            qb = np.maximum(np.random.default_rng(2).standard_normal((100, DIM)), 0).astype(np.float32)
            row = {"n": n, "dtype": dtype, "k": 10, "queries": 100}
            row["project_memory_s"], res100 = timed(lambda: index.search(Queries.from_fingerprints(qb), 10), 3)
            row["numpy_s"], ref100, row["numpy_layout"] = best_numpy(x, sqnorm, qb, 10, 3)
            uid = open_store(path)["uid"].values
            assert all(np.array_equal(r.uid, uid[f]) for r, f in zip(res100, ref100))
            if fidx is not None:
                row["faiss_s"], _ = timed(lambda: fidx.search(qb, 10), 3)
            rows.append(row)
            harness.show(row)
        x = sqnorm = fidx = index = None  # free memory before the next size
    meta = {"threads": cpu_count(), "repeat": args.repeat, "faiss_threads": cpu_count() if faiss is not None else None}
    harness.write(args.out, {**meta, "rows": rows, "page_cache": "warm (stores were just written or read)"})
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    def ms(v):
        return f"{v * 1e3:9.1f}" if v is not None else "        -"

    print(
        f"\n{'N':>11} {'dtype':>8} {'k':>4} {'q':>4} | {'memory ms':>9} {'store ms':>9} {'numpy ms':>9} {'faiss ms':>9} | mem/numpy  mem/faiss  store GB/s (search phase; open s)"
    )
    for r in rows:
        ratio = r["project_memory_s"] / r["numpy_s"] if r.get("numpy_s") else float("nan")
        fratio = r["project_memory_s"] / r["faiss_s"] if r.get("faiss_s") else float("nan")
        gbs = r.get("store_read_gb_per_s")
        opened = f"{gbs:.2f} ({r['store_open_s']:.2f} s)" if gbs else "-"
        print(f"{r['n']:>11,} {r['dtype']:>8} {r['k']:>4} {r['queries']:>4} | {ms(r['project_memory_s'])} {ms(r.get('project_store_s'))} "
              f"{ms(r.get('numpy_s'))} {ms(r.get('faiss_s'))} | {ratio:9.2f}  {fratio:9.2f}  {opened}")  # fmt: skip


if __name__ == "__main__":
    main()
