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
import tempfile
from pathlib import Path

import harness
from feed import FORMATS, write


def rate(source: str, threads: int, standin_rate: float, work: Path, repeat: int) -> float:
    from pipeline import Config

    cfg = Config().override(**{"model.arch": "standin", "model.standin_rate": standin_rate, "model.batch_size": 64,
                               "cluster.threads": threads, "cluster.progress": False})  # fmt: skip
    t = harness.timed_ingest([source], work, f"o-{threads}-{standin_rate}", cfg, repeat)
    return t.value.windows / t.median


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
        harness.show({"feed_windows_per_s": feeds})
        for r in args.rates:
            for t in (1, 2):
                got = rate(source, t, r, Path(tmp), args.repeat)
                row = {"R": r, "threads": t, "feed": feeds[t], "windows_per_s": got,
                       "over_ceiling": got / min(r, feeds[t]), "serial_sum": 1 / (1 / feeds[1] + 1 / r)}  # fmt: skip
                rows.append(row)
                harness.show(row)
    harness.write(args.out, {"feeds": feeds, "rows": rows})
    print(f"\n{'R tiles/s':>9} {'threads':>7} | {'feed':>6} {'w/s':>6} {'/ min(R, feed)':>14} {'serial sum':>10}")
    for r in rows:
        print(f"{r['R']:>9.0f} {r['threads']:>7} | {r['feed']:>6.0f} {r['windows_per_s']:>6.0f} "
              f"{r['over_ceiling']:>14.2f} {r['serial_sum']:>10.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
