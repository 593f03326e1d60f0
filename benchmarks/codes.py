"""Binary codes + exact re-ranking (`search --codes`) against exact search, and a 100M-code scan.

1. **Real stores**: `$AERIAL_SEARCH_DATA/aerial` and UC Merced (2,100 images) ingested as stores
   with the shared ImageNet SqueezeNet 1.1 (no post-processing), `postprocess --codes binary`
   (512 bits); 100 query tiles (seed 0), recall@10 of `search --codes` (default R =
   max(10 k, 100) = 100) against exact search on the same persisted index, and the bytes one
   query reads (codes + the R candidates' float32 rows) against the float32 fingerprints.
2. **Synthetic 1M**, two kinds (benchmarks/search.py's stores, 512-d): ReLU'd i.i.d. Gaussians
   (no neighbourhood structure: the worst case), and points on a 16-dimensional manifold
   (``latent=16``, like CNN features); the same recall and bytes, recall at R = 1,000 and
   10,000, and the time per query of exact and codes, median of 3 rounds of 10 queries.
   With ``--kinds pq`` (or both, the default), the same rows for 64-byte product-quantization
   codes (`postprocess --codes pq --m 64`), keyed ``<store>_pq``; on the synthetic manifold
   store also faiss ``IndexPQ`` (the same 64 x 8-bit quantizer kind, trained on the same sample
   size, the same threads): its scan time for the R = 100 candidates of one query and its own
   recall@10 without re-ranking, beside ours.
3. **100M codes** (random 64-byte codes held in memory, blocks of 2^20): the codes-only scan of
   the engine (`HammingScorer` through `chunk_topk` / `merge_topk`, one thread per core) against
   faiss `IndexBinaryFlat` with the same threads, in its own process (one 6.4 GB copy resident
   at a time); time per query (median of 3) and bytes per tile. No recall at 100M.

    python benchmarks/codes.py                  # all three; writes benchmarks/codes.json
    python benchmarks/codes.py --skip-100m
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
import numpy as np

BLOCK = 1 << 20


def recall_and_bytes(path: str, queries: int = 100, k: int = 10, timing: bool = False) -> dict:
    from pipeline.search import SearchIndex

    exact = SearchIndex.open(path).persist()
    coded = SearchIndex.open(path)
    coded.codes = True
    coded.persist()
    ds = exact.ds
    valid = ds["valid"].values
    picks = np.random.default_rng(0).choice(ds["uid"].values[valid], min(queries, int(valid.sum())), replace=False)
    q, labels = exact.queries_from_uids([int(u) for u in picks])
    want = exact.search(q, k, labels=labels)
    got = coded.search(q, k, labels=labels)
    recall = float(np.mean([len(set(a.uid) & set(b.uid)) / k for a, b in zip(want, got)]))
    qs1, lab1 = exact.queries_from_uids([int(picks[0])])  # the bytes of one query alone
    scan = coded.search(qs1, k, labels=lab1)[0].query["scan"]
    out = {
        "tiles": int(valid.sum()),
        "queries": len(picks),
        "recall_at_10": recall,
        "bytes_per_query_codes": scan["bytes_scanned"],
        "bytes_per_query_float32": scan["float32_bytes"],
        "fewer_bytes": scan["float32_bytes"] / scan["bytes_scanned"],
        "candidates": scan["candidates_per_query"],
    }
    if timing:  # how recall grows with R where the default is not enough
        out["recall_by_r"] = {}
        for r in (1000, 10000):
            coded.rerank = r
            got = coded.search(q, k, labels=labels)
            out["recall_by_r"][r] = float(np.mean([len(set(a.uid) & set(b.uid)) / k for a, b in zip(want, got)]))
        coded.rerank = None
        te, tc = [], []
        for r in range(3):
            sel = picks[r * 10 : (r + 1) * 10]
            for u in sel:
                qq, ll = exact.queries_from_uids([int(u)])
                t0 = time.perf_counter()
                exact.search(qq, k, labels=ll)
                te.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                coded.search(qq, k, labels=ll)
                tc.append(time.perf_counter() - t0)
        out["exact_ms"] = harness.median(te) * 1e3
        out["codes_ms"] = harness.median(tc) * 1e3
        out["speedup"] = out["exact_ms"] / out["codes_ms"]
    return out


def real_store(work: Path, name: str, sources: list[str], weights: Path) -> str:
    from pipeline.config import Config
    from pipeline.ingest import ingest

    path = work / f"{name}.zarr"
    cfg = Config().override(**{"model.arch": "squeezenet1_1", "model.weights": str(weights), "cluster.progress": False})
    ingest(sources, path, cfg, overwrite=True)
    return str(path)


def encode(path: str, kind: str) -> float:
    """Seconds to fit and write ``kind`` codes with the command's defaults (replacing others)."""
    from pipeline.derived import encode_store

    return harness.timed(lambda: encode_store(path, kind), repeat=1).median


def faiss_pq(path: str, threads: int, queries: int = 100, k: int = 10, r: int = 100, sample: int = 100_000) -> dict:
    """faiss IndexPQ (m = 64, 8 bits) on the store's fingerprints: training on ``sample`` rows as
    ``postprocess`` fits on, the scan time of one query for ``r`` candidates (median of 3 rounds
    of 10 queries) and faiss's own recall@10 (its approximate distances, no re-ranking)."""
    import faiss

    from pipeline.search import SearchIndex

    faiss.omp_set_num_threads(threads)
    exact = SearchIndex.open(path).persist()
    ds = exact.ds
    valid = ds["valid"].values
    x = np.ascontiguousarray(exact.postprocess.apply(ds["fingerprint"].values[valid]), dtype=np.float32)
    uids = ds["uid"].values[valid]
    index = faiss.IndexPQ(x.shape[1], 64, 8)
    rng = np.random.default_rng(0)
    index.train(x[np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))])
    index.add(x)
    picks = np.random.default_rng(0).choice(uids, min(queries, len(uids)), replace=False)
    q, labels = exact.queries_from_uids([int(u) for u in picks])
    want = exact.search(q, k, labels=labels)
    qx = np.ascontiguousarray(exact.postprocess.apply(q.fingerprints), dtype=np.float32)
    _, got = index.search(qx, k + 50)
    from pipeline.grid import unpack_uid

    recalls = []
    for w, g, u in zip(want, got, picks):  # search's own exclusion: the query's tile and those overlapping it
        img, row, col = unpack_uid(uids[g[g >= 0]])
        qi, qr, qc = unpack_uid(np.array([u], dtype=np.uint64))
        keep = ~((img == qi[0]) & (np.abs(row - qr[0]) < 256) & (np.abs(col - qc[0]) < 256))
        recalls.append(len(set(w.uid) & set(uids[g[g >= 0]][keep][:k])) / k)
    recall = float(np.mean(recalls))
    times = []
    for i in range(30):
        t0 = time.perf_counter()
        index.search(qx[i : i + 1], r)
        times.append(time.perf_counter() - t0)
    rounds = [harness.median(times[a : a + 10]) for a in (0, 10, 20)]
    return {"scan_ms": harness.median(rounds) * 1e3, "recall_at_10_no_rerank": recall, "threads": threads}


def random_codes(n: int, seed: int = 0):
    """The same 100M codes in every process: block b from seed (seed, b)."""
    for b in range(0, n, BLOCK):
        yield np.random.default_rng([seed, b]).integers(0, 256, (min(BLOCK, n - b), 64), dtype=np.uint8)


def engine_scan(n: int, threads: int, rounds: int) -> list[float]:
    from pipeline.codes import words
    from pipeline.search import kernels, scorers, topk

    uid = np.arange(BLOCK, dtype=np.uint64)
    nan = np.full(BLOCK, np.nan)
    valid = np.ones(BLOCK, bool)
    dicts = [
        {
            "code_words": words(c),
            "valid": valid[: len(c)],
            "uid": uid[: len(c)],
            "lon": nan[: len(c)],
            "lat": nan[: len(c)],
        }
        for c in random_codes(n)
    ]  # fmt: skip (as an index holds them)
    half = np.full(1, np.nan)
    none = kernels.Exclusions.none()
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for r in range(rounds):
            q = np.random.default_rng(100 + r).integers(0, 256, (1, 64), dtype=np.uint8)
            scorer = scorers.HammingScorer(q)
            t0 = time.perf_counter()
            parts = list(pool.map(lambda b: kernels.chunk_topk(b, scorer, 100, kernels.Filters(), none, half), dicts))
            topk.finalize(topk.merge_topk(parts, 100))
            times.append(time.perf_counter() - t0)
    return times


def faiss_scan(n: int, threads: int, rounds: int) -> list[float]:
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexBinaryFlat(512)
    for c in random_codes(n):
        index.add(c)
    times = []
    for r in range(rounds):
        q = np.random.default_rng(100 + r).integers(0, 256, (1, 64), dtype=np.uint8)
        t0 = time.perf_counter()
        index.search(q, 100)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic store tiles")
    ap.add_argument("--codes-n", type=int, default=100_000_000, help="codes in the codes-only scan")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-100m", action="store_true")
    ap.add_argument("--only-manifold", action="store_true", help="synthetic: the 16-d manifold store only")
    ap.add_argument("--kinds", nargs="+", choices=["binary", "pq"], default=["binary", "pq"], help="codes to measure")
    ap.add_argument("--against", metavar="REV", help="the 100M scan: also commit REV's engine, same run")
    ap.add_argument("--merge", help="update this JSON (an earlier run's) instead of starting afresh")
    ap.add_argument("--workdir", default="/tmp/aerial-search-bench")
    ap.add_argument("--scan-only", choices=["engine", "faiss"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--out", default=str(Path(__file__).with_name("codes.json")))
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    if args.scan_only:
        fn = engine_scan if args.scan_only == "engine" else faiss_scan
        print(json.dumps(fn(args.codes_n, threads, 3)))
        return

    res: dict = json.loads(Path(args.merge).read_text()) if args.merge else {}
    res.pop("record", None)  # the merged run's record replaces it
    data = os.environ.get("AERIAL_SEARCH_DATA")
    if not args.skip_real:
        if not data:
            raise SystemExit("set AERIAL_SEARCH_DATA (or pass --skip-real)")
        weights = Path(data).parent / "weights" / "squeezenet1_1-imagenet.pth"
        with tempfile.TemporaryDirectory(prefix="aerial-codes-") as tmp:
            ucm = sorted(str(p) for p in Path(data, "ucmerced").glob("*/*") if p.is_file())
            for name, sources in (("aerial", [str(Path(data, "aerial"))]), ("ucmerced", ucm)):
                path = real_store(Path(tmp), name, sources, weights)
                for kind in args.kinds:
                    key = name if kind == "binary" else f"{name}_pq"
                    encoded = encode(path, kind)
                    r = res[key] = recall_and_bytes(path) | {"encode_s": encoded}
                    print(f"{name} {kind}: {r['tiles']} tiles, recall@10 {r['recall_at_10']:.3f} (R={r['candidates']}), "
                          f"{r['fewer_bytes']:.1f}x fewer bytes per query", flush=True)  # fmt: skip
    if not args.skip_synthetic:
        from search import synthetic_store

        from pipeline.store import open_store

        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        for kind, latent in (("synthetic", 0), ("synthetic_manifold16", 16)):
            if args.only_manifold and not latent:
                continue
            name = f"synth-{args.n}-float32.zarr" if not latent else f"synth-{args.n}-float32-latent{latent}.zarr"
            path = synthetic_store(work / name, args.n, "float32", latent=latent)
            for codes in args.kinds:
                if codes == "pq" and not latent:
                    continue  # pq on the manifold store (and the real ones) only
                key = kind if codes == "binary" else f"{kind}_pq"
                meta = (open_store(path).attrs.get("postprocess") or {}).get("codes")
                if not meta or meta.get("stale") or meta.get("kind", "binary") != codes:
                    res[f"{key}_encode_s"] = encode(str(path), codes)
                r = recall_and_bytes(str(path), timing=True)
                res[key] = r
                print(f"{key} {args.n:,}: recall@10 {r['recall_at_10']:.3f} (R={r['candidates']}), "
                      f"{r['fewer_bytes']:.1f}x fewer bytes, exact {r['exact_ms']:.0f} ms vs codes {r['codes_ms']:.0f} ms "
                      f"per query ({r['speedup']:.2f}x); recall by R {r['recall_by_r']}", flush=True)  # fmt: skip
                if codes == "pq":
                    f = res[f"{key}_faiss"] = faiss_pq(str(path), threads)
                    print(f"faiss IndexPQ (64 x 8 bits, {threads} threads): scan for R=100 {f['scan_ms']:.0f} ms per "
                          f"query, its recall@10 without re-ranking {f['recall_at_10_no_rerank']:.3f}", flush=True)  # fmt: skip
    if not args.skip_100m:
        # each contender in its own process; with --against, commit REV's engine too (its own script)
        runs: list[tuple[str, str, Path]] = [("engine", "engine", harness.ROOT), ("faiss", "faiss", harness.ROOT)]
        if args.against:
            runs.insert(0, ("engine_old", "engine", harness.worktree(args.against, Path(args.workdir))))
        scans = {}
        for name, who, tree in runs:
            argv = [sys.executable, str(tree / "benchmarks" / "codes.py"), "--scan-only", who, "--codes-n", str(args.codes_n)]
            out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=tree,
                                 env=harness.tree_env(tree)).stdout  # fmt: skip
            scans[name] = json.loads(out.strip().splitlines()[-1])
        med = {w: harness.median(t) for w, t in scans.items()}
        res["codes_100m"] = {"codes": args.codes_n, "bytes_per_tile": 64, "threads": threads, "runs_s": scans,
                             "median_s": med, "engine_over_faiss": med["engine"] / med["faiss"]}  # fmt: skip
        if args.against:
            res["codes_100m"] |= {"against": args.against, "new_over_old": med["engine"] / med["engine_old"]}
            print(f"engine at {args.against}: {med['engine_old']:.2f} s per query; this tree {med['engine'] / med['engine_old']:.2f}x that")
        print(f"{args.codes_n:,} codes, {threads} threads: engine {med['engine']:.2f} s, faiss IndexBinaryFlat "
              f"{med['faiss']:.2f} s per query ({med['engine'] / med['faiss']:.2f}x), 64 bytes per tile")  # fmt: skip
    harness.write(args.out, res)


if __name__ == "__main__":
    main()
