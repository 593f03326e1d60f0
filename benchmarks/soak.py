"""Soak: ingest the same sources again and again on a 2-worker LocalCluster, SIGKILLing a
worker at a random point in most runs, and check every resulting store against a clean run.

    python benchmarks/soak.py --seconds 300          # prints and writes benchmarks/soak.json

A mismatch is any difference in uids, valid mask or statuses, or a fingerprint off by more
than 1e-5; lost tiles are kept windows of the clean run missing from a soak run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import synthetic_tif  # noqa: E402

from pipeline import Config, faults, ingest, open_store  # noqa: E402


def compare(a: Path, b: Path) -> tuple[bool, int]:
    x, y = open_store(a), open_store(b)
    same = all(np.array_equal(x[n].values, y[n].values) for n in ("uid", "valid", "status"))
    same = same and np.allclose(x["fingerprint"].values, y["fingerprint"].values, atol=1e-5)
    lost = int((y["valid"].values & ~x["valid"].values).sum()) if x.sizes == y.sizes else int(y["valid"].values.sum())
    return same, lost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--out", default=str(Path(__file__).with_name("soak.json")))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    rng = random.Random(args.seed)
    cfg = Config().override(**{"model.weights": "random", "read.chunk_px": 512, "store.chunk_tiles": 16,
                               "store.batch_tiles": 32, "cluster.progress": False})  # fmt: skip
    stats = {"runs": 0, "kills": 0, "mismatches": 0, "lost_tiles": 0, "worker_respawns_by_scale": 0, "seconds": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        for k, px in enumerate((1024, 768, 1280)):
            synthetic_tif(src / f"img{k}.tif", px, px + 256, block=512, seed=k)
        ref = work / "ref.zarr"
        ingest([src], ref, cfg)
        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                while time.perf_counter() - t0 < args.seconds:
                    run = stats["runs"]
                    marker = work / f"kill-{run}"
                    kill = rng.random() < 0.8
                    if not kill:
                        marker.write_text("no kill this run")
                    client.run(faults.arm, str(marker), rng.randrange(0, 6))
                    store = work / f"run-{run}.zarr"
                    ingest([src], store, cfg, client=client)
                    try:
                        client.wait_for_workers(2, timeout=120)
                    except Exception:  # the nanny was slow to bring the killed worker back: add one
                        cluster.scale(2)
                        client.wait_for_workers(2, timeout=120)
                        stats["worker_respawns_by_scale"] += 1
                    fired = kill and marker.exists()
                    same, lost = compare(store, ref)
                    stats["runs"] += 1
                    stats["kills"] += int(fired)
                    stats["mismatches"] += int(not same)
                    stats["lost_tiles"] += lost
                    print(f"run {run}: worker killed={fired} identical={same} lost tiles={lost}", flush=True)
        stats["seconds"] = time.perf_counter() - t0
    print(json.dumps(stats))
    Path(args.out).write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
