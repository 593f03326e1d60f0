"""`aerial-search serve` latency on loopback against the same search in-process.

A synthetic store of 1M tiles (512-d float32, as benchmarks/search.py makes it) is served by
`aerial-search serve` in its own process (default settings: the index held in memory, dask
threads = cores). This process then times, in alternating rounds so that machine noise hits
both alike:

- **in-process**: `SearchIndex.search` of one tile uid (k=10, the uid's fingerprint looked up
  in the store as the server does), on an index persisted the same way;
- **1 client**: `GET /api/search?uid=U&k=10`, one request at a time (keep-alive);
- **16 clients**: 16 threads, each with its own connection, requests back to back.

Printed: p50 / p95 latency per contender, the 1-client p50 over the in-process p50 (target
<= 1.3), requests per second and errors with 16 clients. Results go to benchmarks/serve.json.

    python benchmarks/serve.py                 # 1M tiles
    python benchmarks/serve.py --n 100000      # quicker
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import harness
import numpy as np
from search import synthetic_store

from pipeline.search import SearchIndex


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def start_server(store: Path) -> tuple[subprocess.Popen, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--store", str(store), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for line in proc.stdout:
        print("  server:", line.rstrip(), flush=True)
        m = re.search(r"serving (http://\S+?)/ ", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain
            return proc, m.group(1), time.perf_counter() - t0
    raise RuntimeError("the server did not start")


def in_process(index: SearchIndex, uids: list[str]) -> list[float]:
    out = []
    for u in uids:
        t0 = time.perf_counter()
        q, labels = index.queries_from_uids([int(u)])
        index.search(q, 10, labels=labels)
        out.append(time.perf_counter() - t0)
    return out


def one_client(url: str, uids: list[str]) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=120) as c:
        for u in uids:
            t0 = time.perf_counter()
            r = c.get(url + "/api/search", params={"uid": u, "k": 10})
            out.append(time.perf_counter() - t0)
            r.raise_for_status()
    return out


def many_clients(url: str, uids: list[str], clients: int, per_client: int) -> dict:
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(j: int) -> None:
        with httpx.Client(timeout=300) as c:
            for i in range(per_client):
                u = uids[(j * per_client + i) % len(uids)]
                t0 = time.perf_counter()
                try:
                    r = c.get(url + "/api/search", params={"uid": u, "k": 10})
                    ok = r.status_code == 200 and len(r.json()["results"]) == 10
                    why = "" if ok else f"{r.status_code} {r.text[:80]}"
                except Exception as e:  # a refused or dropped connection counts as an error
                    why = f"{type(e).__name__}: {e}"
                with lock:
                    lat.append(time.perf_counter() - t0)
                    if why:
                        errors.append(why)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(j,)) for j in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": lat, "errors": errors, "wall_s": wall, "requests": len(lat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="tiles in the synthetic store")
    ap.add_argument("--workdir", default="/tmp/aerial-search-bench")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of in-process and 1-client timing")
    ap.add_argument("--per-round", type=int, default=10, help="queries per contender per round")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).with_name("serve.json")))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = synthetic_store(work / f"synth-{args.n}-float32.zarr", args.n, "float32")
    index = SearchIndex.open(str(store))
    rng = np.random.default_rng(0)
    all_uids = index.ds["uid"].values
    uids = [str(int(u)) for u in rng.choice(all_uids, args.rounds * args.per_round + 64, replace=False)]

    proc, url, load_s = start_server(store)
    try:
        t0 = time.perf_counter()
        index.persist()
        persist_s = time.perf_counter() - t0
        one_client(url, uids[-4:])  # warm: connections, first-call imports
        in_process(index, uids[-4:])
        inproc, http1 = [], []
        for r in range(args.rounds):
            batch = uids[r * args.per_round : (r + 1) * args.per_round]
            inproc += in_process(index, batch)
            http1 += one_client(url, batch)
            print(f"round {r + 1}: in-process p50 {harness.median(inproc) * 1e3:.1f} ms, "
                  f"1 client p50 {harness.median(http1) * 1e3:.1f} ms", flush=True)  # fmt: skip
        index = None  # free the in-process copy before the concurrent run
        many = many_clients(url, uids, args.clients, args.per_client)
    finally:
        proc.terminate()
        proc.wait(30)

    res = {
        "tiles": args.n,
        "server_start_s": load_s,
        "in_process_persist_s": persist_s,
        "in_process": {"p50_ms": pct(inproc, 50) * 1e3, "p95_ms": pct(inproc, 95) * 1e3, "n": len(inproc)},
        "http_1_client": {"p50_ms": pct(http1, 50) * 1e3, "p95_ms": pct(http1, 95) * 1e3, "n": len(http1)},
        f"http_{args.clients}_clients": {
            "p50_ms": pct(many["latencies"], 50) * 1e3,
            "p95_ms": pct(many["latencies"], 95) * 1e3,
            "n": many["requests"],
            "errors": len(many["errors"]),
            "error_examples": many["errors"][:3],
            "requests_per_s": many["requests"] / many["wall_s"],
        },  # fmt: skip
        "http1_p50_over_in_process_p50": pct(http1, 50) / pct(inproc, 50),
    }
    harness.write(args.out, res)
    print(f"\n{args.n:,} tiles, {os.cpu_count()} cores")
    print(f"{'contender':<22} {'p50 ms':>8} {'p95 ms':>8} {'n':>5}")
    for name in ("in_process", "http_1_client", f"http_{args.clients}_clients"):
        r = res[name]
        print(f"{name:<22} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['n']:>5}")
    m = res[f"http_{args.clients}_clients"]
    print(f"\n1-client p50 / in-process p50: {res['http1_p50_over_in_process_p50']:.2f} (target <= 1.3)")
    print(f"{args.clients} clients: {m['requests_per_s']:.1f} requests/s, {m['errors']} errors")


if __name__ == "__main__":
    main()
