"""Soak: ingest the same sources again and again on a 2-worker LocalCluster, SIGKILLing a
worker at a random point in most runs, and check every resulting store against a clean run,
while a second process searches the store being written, again and again.

    python benchmarks/soak.py --seconds 300          # prints and writes benchmarks/soak.json

Each run starts a store with the first image, then starts the searcher, then ingests all the
sources into it (batches committed one by one, in place). A mismatch is any difference in uids,
valid mask or statuses, or a fingerprint off by more than 1e-5; lost tiles are kept windows of
the clean run missing from a soak run. A wrong answer is a search whose uids differ from a NumPy
brute force over the images that were done when that search started and when it ended.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
from ingest import synthetic_tif

from pipeline import Config, faults, ingest, open_store


def compare(a: Path, b: Path) -> tuple[bool, int]:
    x, y = open_store(a), open_store(b)
    same = all(np.array_equal(x[n].values, y[n].values) for n in ("uid", "valid", "status"))
    same = same and np.allclose(x["fingerprint"].values, y["fingerprint"].values, atol=1e-5)
    lost = int((y["valid"].values & ~x["valid"].values).sum()) if x.sizes == y.sizes else int(y["valid"].values.sum())
    return same, lost


SEARCHER = r"""
import json, os, sys, time, numpy as np
from pipeline.search import Queries, SearchIndex
from pipeline.store import open_store
path, qfile, stop = sys.argv[1:4]
q = np.load(qfile).astype(np.float32)[None]
while not os.path.exists(stop):
    before = open_store(path)["status"].values.astype(object).tolist()
    index = SearchIndex.open(path)
    [res] = index.search(Queries.from_fingerprints(q), 8)
    used = ["done" if u else "" for u in index.usable]  # the statuses the search itself read
    after = open_store(path)["status"].values.astype(object).tolist()
    print(json.dumps({"uids": [str(u) for u in res.uid], "before": before, "used": used, "after": after}), flush=True)
"""


def wrong_answers(store: Path, answers: list[dict], q: np.ndarray) -> int:
    """Answers that differ from a brute force over the images done when the search read the
    statuses (between its start and its end; the final store holds every fingerprint those
    images had then), or whose statuses were not between those at its start and its end."""
    ds = open_store(store)
    x = ds["fingerprint"].values.astype(np.float64)
    d = np.sqrt(((x - q) ** 2).sum(1))
    image, valid, uid = ds["image"].values, ds["valid"].values, ds["uid"].values
    wrong = 0
    for a in answers:
        done = {name: {i for i, s in enumerate(a[name]) if s == "done"} for name in ("before", "used", "after")}
        idx = np.flatnonzero(valid & np.isin(image, sorted(done["used"])))
        expect = [str(u) for u in uid[idx[np.lexsort((uid[idx], d[idx]))][:8]]]
        wrong += a["uids"] != expect or not (done["before"] <= done["used"] <= done["after"])
    return wrong


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
    stats = {"runs": 0, "kills": 0, "mismatches": 0, "lost_tiles": 0, "worker_respawns_by_scale": 0,
             "searches": 0, "searches_during_partial_states": 0, "wrong_answers": 0, "seconds": 0.0}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        for k, px in enumerate((1024, 768, 1280)):
            synthetic_tif(src / f"img{k}.tif", px, px + 256, block=512, seed=k)
        ref = work / "ref.zarr"
        ingest([src / "img0.tif"], ref, cfg)
        ingest([src], ref, cfg)  # the clean run, built as the soak runs build theirs
        q = open_store(ref)["fingerprint"].values[5].astype(np.float64)
        np.save(work / "q.npy", q)
        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                while time.perf_counter() - t0 < args.seconds:
                    run = stats["runs"]
                    marker = work / f"kill-{run}"
                    kill = rng.random() < 0.8
                    if not kill:
                        marker.write_text("no kill this run")
                    store = work / f"run-{run}.zarr"
                    ingest([src / "img0.tif"], store, cfg, client=client)  # an existing store, grown in place
                    stop = work / f"stop-{run}"
                    searcher = subprocess.Popen(
                        [sys.executable, "-c", SEARCHER, str(store), str(work / "q.npy"), str(stop)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    )  # fmt: skip
                    time.sleep(2.0)  # let it import and start searching
                    client.run(faults.arm, str(marker), rng.randrange(0, 6))
                    ingest([src], store, cfg, client=client)
                    stop.write_text("done")
                    out, err = searcher.communicate(timeout=120)
                    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
                    partial = sum(0 < a["before"].count("done") < len(a["before"]) for a in answers)
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
                    wrong = wrong_answers(store, answers, q)
                    stats["searches"] += len(answers)
                    stats["searches_during_partial_states"] += partial
                    stats["wrong_answers"] += wrong
                    print(f"run {run}: worker killed={fired} identical={same} lost tiles={lost} "
                          f"searches={len(answers)} (during partial states {partial}) wrong={wrong}", flush=True)  # fmt: skip
        stats["seconds"] = time.perf_counter() - t0
    harness.show(stats)
    harness.write(args.out, stats)


if __name__ == "__main__":
    main()
