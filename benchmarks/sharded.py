"""A sharded index on a cluster: query latency and bytes moved per query against worker processes.

`SearchIndex.persist()` on a distributed client keeps each block in the memory of the worker
that loaded it (``client.persist``); a search sends the query to every block's worker and only
each block's top-k (a few hundred bytes) travels: to a peer worker for the tree reduction, then
the final top-k to the client. This script measures that on a LocalCluster of 1 and then 2
worker processes (the machine's cores split between them) over the synthetic 1M-tile store of
`benchmarks/search.py`:

- where the shards live (bytes of blocks per worker, from the scheduler's ``who_has`` and
  ``nbytes``), and that no fingerprint reached the client (the client's process holds no block);
- single-query latency, exact and with codes (if the store has them), median of ``--repeat``;
- bytes moved per query: worker-to-worker transfers (``transfer_outgoing_bytes_total`` summed over
  workers, before and after) plus the result returned to the client; against the bytes held.

    python benchmarks/sharded.py              # writes benchmarks/sharded.json
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from pathlib import Path

import harness
import numpy as np


def moved(client) -> int:
    return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def measure(path: str, workers: int, repeat: int, codes: bool) -> dict:
    from distributed import Client, LocalCluster, futures_of, wait

    from pipeline.cluster import runtime
    from pipeline.config import ClusterConfig
    from pipeline.search import SearchIndex

    cores = os.cpu_count() or 1
    threads = max(1, cores // workers)
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as client:  # fmt: skip
        with runtime(ClusterConfig(progress=False), client=client) as rt:
            out: dict = {"workers": workers, "threads_per_worker": threads}
            for use_codes in (False, True) if codes else (False,):
                index = SearchIndex.open(path, rt)
                index.codes = use_codes
                t0 = time.perf_counter()
                index.persist()
                wait(futures_of(index._blocks))
                persist_s = time.perf_counter() - t0
                keys = {b.key for b in index._blocks}
                info = client.run_on_scheduler(
                    lambda dask_scheduler, keys=keys: {
                        str(k): ([w.address for w in dask_scheduler.tasks[k].who_has], dask_scheduler.tasks[k].nbytes)
                        for k in dask_scheduler.tasks
                        if k in keys
                    }  # fmt: skip
                )
                per_worker: dict[str, int] = {}
                for holders, nbytes in info.values():
                    for w in holders:
                        per_worker[w] = per_worker.get(w, 0) + int(nbytes)
                rng = np.random.default_rng(0)
                uids = rng.choice(index.ds["uid"].values[:200_000], repeat + 2, replace=False)
                times, per_query = [], []
                for i, u in enumerate(uids):
                    q, labels = index.queries_from_uids([int(u)])
                    before = moved(client)
                    t0 = time.perf_counter()
                    [res] = index.search(q, 10, labels=labels)
                    dt = time.perf_counter() - t0
                    if i >= 2:  # two warm-up queries
                        times.append(dt)
                        per_query.append(moved(client) - before + len(pickle.dumps(res)))
                name = "codes" if use_codes else "exact"
                out[name] = {
                    "persist_s": persist_s,
                    "blocks": len(keys),
                    "bytes_held_per_worker": per_worker,
                    "latency_ms_median": harness.median(times) * 1e3,
                    "latency_ms_all": [t * 1e3 for t in times],
                    "bytes_moved_per_query_median": harness.median(per_query),
                    "bytes_held_total": sum(per_worker.values()),
                }
                client.cancel(futures_of(index._blocks))
                index._blocks = None
                del index
            return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workdir", default="/tmp/aerial-search-bench")
    ap.add_argument("--out", default=str(Path(__file__).with_name("sharded.json")))
    args = ap.parse_args()
    from search import synthetic_store

    from pipeline.store import open_store

    path = synthetic_store(Path(args.workdir) / f"synth-{args.n}-float32.zarr", args.n, "float32")
    meta = (open_store(path).attrs.get("postprocess") or {}).get("codes")
    codes = bool(meta) and not meta.get("stale")
    res = {"tiles": args.n, "runs": []}
    for workers in (1, 2):
        r = measure(str(path), workers, args.repeat, codes)
        res["runs"].append(r)
        for name in ("exact", "codes"):
            if name in r:
                m = r[name]
                held = ", ".join(f"{v / 2**20:.0f} MiB" for v in m["bytes_held_per_worker"].values())
                print(f"{workers} worker(s) x {r['threads_per_worker']} threads, {name}: {m['latency_ms_median']:.0f} ms "
                      f"per query, {m['bytes_moved_per_query_median'] / 1024:.1f} KiB moved per query; "
                      f"held per worker: {held}", flush=True)  # fmt: skip
    harness.write(args.out, res)


if __name__ == "__main__":
    main()
