"""The GPU worker layout on a CPU: a simulated device of R tiles/s (``--model standin
--standin-rate R``: each batch sleeps n / R s without the GIL, one batch at a time per device)
fed by 1 thread (the old layout: read, then compute, then read) or 2 I/O threads (reads overlap
the device), in one run.

    python benchmarks/overlap.py                  # writes benchmarks/overlap.json

For each thread count t: the feed rate F_t (R = 0, nothing to wait for) and, for each R, the
ingest's windows/s against min(R, F_t) (the layout's ceiling; target >= 0.8 with 2 threads)
and against the serial sum 1 / (1 / F_1 + 1 / R) (what 1 thread can do). Whole ingests of a
deflate-tiled 16,384 x 16,384 GeoTIFF (16,129 windows: long enough that the ingest's fixed costs,
planning and the first read before the device starts, weigh little), median of 3, torch
imported first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from feed import FORMATS, write  # noqa: E402


def rate(source: str, threads: int, standin_rate: float, work: Path, repeat: int) -> float:
    from pipeline import Config, ingest

    cfg = Config().override(**{"model.arch": "standin", "model.standin_rate": standin_rate, "model.batch_size": 64,
                               "cluster.threads": threads, "cluster.progress": False})  # fmt: skip
    times, windows = [], 0
    for k in range(repeat):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            windows = ingest([source], work / f"o-{threads}-{standin_rate}-{k}.zarr", cfg, overwrite=True).windows
            times.append(time.perf_counter() - t0)
    return windows / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=16384)
    ap.add_argument("--rates", type=float, nargs="+", default=[1000.0, 2500.0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/aerial-search-feed")
    ap.add_argument("--out", default=str(Path(__file__).with_name("overlap.json")))
    args = ap.parse_args()
    import torch  # noqa: F401  (imported before any clock starts)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source = str(write(work / f"deflate-tiled-{args.px}.tif", args.px, FORMATS["deflate tiled"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        feeds = {t: rate(source, t, 0.0, Path(tmp), args.repeat) for t in (1, 2)}
        print(json.dumps({"feed_windows_per_s": feeds}), flush=True)
        for r in args.rates:
            for t in (1, 2):
                got = rate(source, t, r, Path(tmp), args.repeat)
                row = {"R": r, "threads": t, "feed": feeds[t], "windows_per_s": got,
                       "over_ceiling": got / min(r, feeds[t]), "serial_sum": 1 / (1 / feeds[1] + 1 / r)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {"feeds": feeds, "rows": rows, "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{'R tiles/s':>9} {'threads':>7} | {'feed':>6} {'w/s':>6} {'/ min(R, feed)':>14} {'serial sum':>10}")
    for r in rows:
        print(f"{r['R']:>9.0f} {r['threads']:>7} | {r['feed']:>6.0f} {r['windows_per_s']:>6.0f} "
              f"{r['over_ceiling']:>14.2f} {r['serial_sum']:>10.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
