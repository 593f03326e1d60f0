"""The k-NN graph in minutes (issue 25): ``postprocess --knn K`` timed through the command line
and its recall measured against brute force. Writes benchmarks/knn.json.

    python benchmarks/knn.py                      # the synthetic 1M manifold store + a real store
    python benchmarks/knn.py --n 100000 --skip-real

Stores:

- ``synthetic``: ``--n`` (1,000,000) ReLU'd 16-dimensional manifold vectors in 512 dimensions, the
  codes benchmark's store (``benchmarks/search.py`` ``synthetic_store(latent=16)``; random i.i.d.
  vectors have no neighbours worth finding);
- ``real``: the shared aerial GeoTIFFs and the UC Merced scenes ingested with ImageNet SqueezeNet
  1.1, Hellinger post-processing (from ``$AERIAL_SEARCH_DATA``; skipped without it). It is
  small, so the default probes every cell there (the exact graph); it is measured again with
  the probed fraction of cells the 1M store gets (``nprobe_as_1m``).

Recall@K: ``--queries`` (1,000) random valid tiles, each one's exact K nearest over the whole
store by brute force (float64, overlapping tiles excluded as search excludes them, ties by uid)
against its stored list: the mean fraction found. ``seconds``: the ``postprocess --knn K`` call
(the store opened, the graph built and written), one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np


def recall(path: Path, k: int, queries: int, seed: int = 0) -> float:
    from pipeline.search import SearchIndex
    from pipeline.search.kernels import overlaps

    index = SearchIndex.open(str(path))
    ds = index.ds
    valid = ds["valid"].values.astype(bool)
    x = index.postprocess.apply(np.asarray(ds["fingerprint"].values, np.float32))
    uid = ds["uid"].values
    image, row, col = (ds[v].values.astype(np.int64) for v in ("image", "row", "col"))
    lon, lat, half = ds["lon"].values, ds["lat"].values, index.half_m
    got = ds["knn_uid"].values
    sims = ds["knn_sim"].values
    rng = np.random.default_rng(seed)
    qs = rng.choice(np.flatnonzero(valid), min(queries, int(valid.sum())), replace=False)
    xx = (x.astype(np.float64) ** 2).sum(1)
    found = []
    for a in range(0, len(qs), 100):
        q = qs[a : a + 100]
        d2 = xx[:, None] - 2 * x.astype(np.float64) @ x[q].astype(np.float64).T + xx[q][None, :]
        for j, s in enumerate(q):
            d = np.sqrt(np.maximum(d2[:, j], 0))
            d[~valid] = np.inf
            d[overlaps(image, row, col, lon, lat, half[image], image[s], row[s], col[s], lon[s], lat[s],
                       half[image[s]])] = np.inf  # fmt: skip
            d[s] = np.inf
            truth = np.lexsort((uid, d))[:k]
            truth = truth[np.isfinite(d[truth])]
            mine = got[s][np.isfinite(sims[s])]
            found.append(len(set(uid[truth].tolist()) & set(mine.tolist())) / max(len(truth), 1))
    return float(np.mean(found))


def timed_knn(path: Path, k: int) -> tuple[float, dict]:
    from pipeline.cli import main
    from pipeline.store import open_store

    t0 = time.perf_counter()
    if main(["postprocess", "--store", str(path), "--knn", str(k)]) != 0:
        raise RuntimeError(f"postprocess --knn {k} failed on {path}")
    seconds = time.perf_counter() - t0
    return seconds, dict(open_store(path).attrs["postprocess"]["knn"])


def real_store(data: Path, work: Path, weights: Path) -> Path:
    from pipeline.cli import main

    store = work / "real.zarr"
    if not store.exists():
        lst = work / "real.txt"
        paths = sorted(str(p) for p in (data / "aerial").glob("*.tif")) + sorted(str(p) for p in (data / "ucmerced").rglob("*.jpg"))
        lst.write_text("\n".join(paths) + "\n")
        if main(["ingest", str(lst), "--store", str(store), "--model", "squeezenet1_1", "--weights", str(weights),
                 "--no-progress"]) != 0:  # fmt: skip
            raise RuntimeError("ingest of the real store failed")
        if main(["postprocess", "--store", str(store), "--method", "hellinger"]) != 0:
            raise RuntimeError("postprocess --method hellinger failed")
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("-k", type=int, default=30)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--real-only", action="store_true", help="keep --out's synthetic rows, measure the real store again")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "aerial-search-knn")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("knn.json"))
    args = ap.parse_args()
    from search import synthetic_store  # benchmarks/search.py

    from pipeline import knn

    args.work.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"k": args.k, "queries": args.queries, "rows": []}

    def save() -> None:
        harness.write(args.out, doc, cores=harness.machine()["cores"])

    if args.real_only:
        import json

        old = json.loads(args.out.read_text())
        doc["rows"] = [r for r in old["rows"] if r["store"] == "synthetic"]
        doc["synthetic_record"] = old["record"]  # the synthetic rows keep the record they were measured with
    else:
        base = synthetic_store(args.work / f"synth-{args.n}-float32-latent16.zarr", args.n, "float32", latent=16)
        path = args.work / "synthetic-knn.zarr"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(base, path)
        seconds, meta = timed_knn(path, args.k)
        row = {"store": "synthetic", "tiles": meta["tiles"], "seconds": seconds,
               "recall_at_k": recall(path, args.k, args.queries), "cells": meta.get("cells"), "nprobe": meta.get("nprobe"),
               "dims": meta.get("dims"), "method": meta.get("method")}  # fmt: skip
        doc["rows"].append(row)
        harness.show(row)
        save()
        shutil.rmtree(path, ignore_errors=True)
    data = os.environ.get("AERIAL_SEARCH_DATA")
    if not args.skip_real and data and Path(data, "aerial").is_dir():
        real = real_store(Path(data), args.work, Path(data).parent / "weights" / "squeezenet1_1-imagenet.pth")
        seconds, meta = timed_knn(real, args.k)
        row = {"store": "real", "tiles": meta["tiles"], "seconds": seconds, "recall_at_k": recall(real, args.k, args.queries),
               "cells": meta.get("cells"), "nprobe": meta.get("nprobe"), "dims": meta.get("dims"), "method": meta.get("method")}  # fmt: skip
        doc["rows"].append(row)
        harness.show(row)
        save()
        # the fraction of cells probed at 1M tiles (64 of 1,000), on real features
        big_cells = knn.cells_for(1_000_000)
        saved = knn.NPROBE
        knn.NPROBE = max(1, round(meta["cells"] * knn.NPROBE / big_cells))
        try:
            seconds, meta = timed_knn(real, args.k)
        finally:
            knn.NPROBE = saved
        row = {"store": "real", "variant": "nprobe_as_1m", "tiles": meta["tiles"], "seconds": seconds,
               "recall_at_k": recall(real, args.k, args.queries), "cells": meta.get("cells"), "nprobe": meta.get("nprobe"),
               "dims": meta.get("dims"), "method": meta.get("method")}  # fmt: skip
        doc["rows"].append(row)
        harness.show(row)
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
