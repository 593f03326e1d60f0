"""Resume after a crash: kill an ingest with SIGKILL at 60 % of a clean run's time, rerun it,
and compare the rerun's time and store with the clean run's.

    python benchmarks/resume.py --data $AERIAL_SEARCH_DATA --weights ../shared/weights/squeezenet1_1-imagenet.pth

Every run is the command a user types, `aerial-search ingest DATA/aerial --store S --model
squeezenet1_1 --weights W`, every other setting at its default, timed as a whole process. Each
repetition: a clean run (time T), a run killed at 0.6 T, then the rerun (time R); R / T and the
store compared with the clean one (uids, valid mask exactly, fingerprints within 1e-5).
Writes benchmarks/resume.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np

from pipeline import locations, open_store
from pipeline.ingest import staging


def command(data: Path, store: Path, weights: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "ingest", str(data / "aerial"), "--store", str(store),
            "--model", "squeezenet1_1", "--weights", str(weights)]  # fmt: skip


def timed(cmd: list[str]) -> float:
    return harness.wall(cmd, check=True)[0]


def same(a: Path, b: Path) -> bool:
    x, y = open_store(a), open_store(b)
    return all(np.array_equal(x[n].values, y[n].values) for n in ("uid", "valid", "status")) and np.allclose(
        x["fingerprint"].values, y["fingerprint"].values, atol=1e-5
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("AERIAL_SEARCH_DATA"), required=False)
    ap.add_argument("--weights", default=None, help="SqueezeNet 1.1 ImageNet weights (default: DATA/../weights/...)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--at", type=float, default=0.6, help="kill at this fraction of the clean run's time")
    ap.add_argument("--out", default=str(Path(__file__).with_name("resume.json")))
    args = ap.parse_args()
    data = Path(args.data)
    weights = Path(args.weights or data.parent / "weights" / "squeezenet1_1-imagenet.pth")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rep in range(args.repeat):
            clean = work / f"clean-{rep}.zarr"
            t_clean = timed(command(data, clean, weights))
            target = work / f"killed-{rep}.zarr"
            proc = subprocess.Popen(command(data, target, weights), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(args.at * t_clean)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            staged = len(staging.staged(locations.partial_path(target)))
            t_rerun = timed(command(data, target, weights))
            row = {"clean_s": t_clean, "killed_at_s": args.at * t_clean, "staged_units_at_kill": staged,
                   "rerun_s": t_rerun, "rerun_over_clean": t_rerun / t_clean, "store_equal": same(target, clean)}  # fmt: skip
            rows.append(row)
            harness.show(row)
            shutil.rmtree(clean)
            shutil.rmtree(target)
    summary = {
        "command": " ".join(["aerial-search", *command(data, Path("S"), weights)[3:]]),
        "median_rerun_over_clean": harness.median([r["rerun_over_clean"] for r in rows]),
        "all_stores_equal": all(r["store_equal"] for r in rows),
        "runs": rows,
    }
    harness.write(args.out, summary)
    print(f"\nrerun / clean, median of {len(rows)}: {summary['median_rerun_over_clean']:.2f} (target < 0.8); "
          f"stores equal to the clean one: {summary['all_stores_equal']}")  # fmt: skip


if __name__ == "__main__":
    main()
