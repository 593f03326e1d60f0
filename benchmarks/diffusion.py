"""The k-NN graph's build cost and query-time diffusion latency, next to a plain search.

1. **Build**: `postprocess --knn 30` (`pipeline.derived.build_knn`: every tile's 30 nearest
   through the search engine, batches of 512 queries) on a 100,000-tile synthetic store with a
   16-dimensional structure (benchmarks/search.py, ``latent=16``): seconds, tiles/s, and the
   projection to a million tiles (the brute-force graph costs n^2).
2. **Query**: a 1M-tile synthetic store of groups of 30 tiles around shared centres
   (``cluster=30``), whose 29-NN graph is each tile's group (written with the store's own
   `write_knn`, similarities computed exactly; a brute force at 1M would take hours here), the
   index persisted; per query, `search` (k = 10) against `search --diffusion` (exact top-1,000
   seeds, 29-NN graph, alpha 0.9), median of 7 queries after 2 warm-ups.

    python benchmarks/diffusion.py                 # writes benchmarks/diffusion.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import harness
import numpy as np


def build(work: Path, n: int, k: int) -> dict:
    from search import synthetic_store

    from pipeline.derived import build_knn

    path = synthetic_store(work / f"synth-{n}-float32-latent16.zarr", n, "float32", latent=16)
    info = build_knn(str(path), k)
    sec = info["seconds"]
    return {
        "tiles": n,
        "k": k,
        "seconds": sec,
        "tiles_per_s": n / sec,
        "projected_hours_per_million": sec * (1e6 / n) ** 2 / 3600,
    }


def clustered_graph(path: Path, group: int) -> None:
    from pipeline import store

    ds = store.open_store(path)
    n = ds.sizes["tile"]
    uid = ds["uid"].values
    z = int(ds["fingerprint"].data.chunksize[0])
    k = group - 1

    def rows():
        for a in range(0, n, z):
            b = min(n, a + z)
            lo, hi = a - a % group, min(n, b + (-b) % group)  # whole groups around the chunk
            x = ds["fingerprint"][lo:hi].values.astype(np.float64)
            out_u = np.zeros((b - a, k), np.uint64)
            out_s = np.full((b - a, k), np.nan, np.float32)
            for i in range(a, b):
                g0 = i - i % group
                mates = np.array([j for j in range(g0, min(n, g0 + group)) if j != i])
                xi, xm = x[i - lo], x[mates - lo]
                d = np.linalg.norm(xm - xi, axis=1)
                o = np.lexsort((uid[mates], d))
                out_u[i - a, : len(o)] = uid[mates[o]]
                out_s[i - a, : len(o)] = (xm[o] @ xi) / (np.linalg.norm(xm[o], axis=1) * np.linalg.norm(xi))
            yield a, out_u, out_s

    store.write_knn(path, n, k, {"k": k, "tiles": n, "seconds": 0.0, "synthetic": f"groups of {group}"}, rows())


def latency(work: Path, n: int, group: int, repeat: int) -> dict:
    from search import synthetic_store

    from pipeline.search import SearchIndex
    from pipeline.store import open_store

    path = synthetic_store(work / f"synth-{n}-float32-cluster{group}.zarr", n, "float32", cluster=group)
    if "knn" not in (open_store(path).attrs.get("postprocess") or {}):
        t0 = time.perf_counter()
        clustered_graph(path, group)
        print(f"graph written in {time.perf_counter() - t0:.0f} s", flush=True)
    index = SearchIndex.open(str(path)).persist()
    uids = np.random.default_rng(0).choice(index.ds["uid"].values, repeat + 2, replace=False)
    plain, diff, seeds_s = [], [], []
    for i, u in enumerate(uids):
        q, lab = index.queries_from_uids([int(u)])
        t0 = time.perf_counter()
        index.search(q, 10, labels=lab)
        t1 = time.perf_counter()
        index.search(q, 1000, labels=lab)
        t2 = time.perf_counter()
        [res] = index.search_diffusion(q, 10, labels=lab, alpha=0.9)
        t3 = time.perf_counter()
        if i >= 2:
            plain.append(t1 - t0)
            seeds_s.append(t2 - t1)
            diff.append(t3 - t2)
    return {"tiles": n, "graph": f"{group - 1}-NN of groups of {group}", "seeds": 1000, "plain_ms": harness.median(plain) * 1e3,
            "seeds_search_ms": harness.median(seeds_s) * 1e3, "diffusion_ms": harness.median(diff) * 1e3,
            "diffusion_over_plain": harness.median(diff) / harness.median(plain)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-n", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workdir", default="/tmp/aerial-search-bench")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).with_name("diffusion.json")))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if not args.skip_build:
        b = res["build"] = build(work, args.build_n, 30)
        print(f"k-NN graph, {b['tiles']:,} tiles, k = 30: {b['seconds']:.0f} s ({b['tiles_per_s']:.0f} tiles/s); "
              f"a million tiles: ~{b['projected_hours_per_million']:.1f} h (n^2)", flush=True)  # fmt: skip
    q = res["query"] = latency(work, args.n, 30, args.repeat)
    print(f"{q['tiles']:,} tiles: plain search {q['plain_ms']:.0f} ms, diffusion {q['diffusion_ms']:.0f} ms per query "
          f"({q['diffusion_over_plain']:.1f}x; its exact top-1,000 seeds alone {q['seeds_search_ms']:.0f} ms)")  # fmt: skip
    harness.write(args.out, res)


if __name__ == "__main__":
    main()
