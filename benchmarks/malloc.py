"""glibc malloc kept for reuse (the default, ``pipeline.resources.keep_freed_memory``) against
glibc's own settings (``AERIAL_SEARCH_MALLOC=system``): whole CLI ingests on the CPU.

Each run is `aerial-search ingest $AERIAL_SEARCH_DATA/aerial --store S --no-progress` as a fresh
process (README defaults: the threaded scheduler, 2 dask threads x 1 torch thread on 2 cores),
plus the model flags of its row; the two settings alternate within each round so that machine
noise hits both alike; medians of ``--repeat`` rounds. Per run: the CLI's own ingest seconds,
the CPU seconds in user and kernel mode of the process tree (every worker process included) and
the largest peak RSS of one of its processes (``getrusage`` of a small wrapper's children; Linux
counts in a spawned process's ``ru_maxrss`` the RSS of its parent at the spawn, so with
``--scheduler local`` a worker's figure includes what the CLI process held when it started it). Every pair of stores is checked equal
(uids, valid mask exactly, fingerprints to 1e-5).

Rows: ImageNet SqueezeNet 1.1 (the shared pretrained file), ResNet-18 (random weights: the same
layers and FLOPs as ImageNet's, whose file cannot be downloaded here), and SqueezeNet on
``--scheduler local`` (2 worker processes, which dask starts with ``MALLOC_TRIM_THRESHOLD_=65536``).

    python benchmarks/malloc.py                  # writes benchmarks/malloc.json
    python benchmarks/malloc.py --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import harness
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Runs one CLI ingest as a child and prints its exit status and the rusage of its process tree.
WRAPPER = r"""
import json, resource, subprocess, sys
res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr[-2000:],
                  "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "peak_rss_gib": ru.ru_maxrss / 2**20}))
"""


def run(argv: list[str], setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["AERIAL_SEARCH_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{res['stderr']}")
    line = next(x for x in res["stdout"].splitlines() if x.startswith("time "))
    res["ingest_s"] = float(line.split()[1])
    return {k: res[k] for k in ("ingest_s", "user_s", "sys_s", "peak_rss_gib")}


def same_store(a: Path, b: Path) -> float:
    from pipeline import open_store

    x, y = open_store(a), open_store(b)
    np.testing.assert_array_equal(x["uid"].values, y["uid"].values)
    np.testing.assert_array_equal(x["valid"].values, y["valid"].values)
    diff = float(np.abs(x["fingerprint"].values - y["fingerprint"].values).max())
    assert diff <= 1e-5, diff
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "malloc.json"))
    args = ap.parse_args()
    data = Path(os.environ.get("AERIAL_SEARCH_DATA", ROOT.parent / "shared" / "data"))
    if not (data / "aerial").is_dir():
        raise SystemExit("set AERIAL_SEARCH_DATA to the shared data folder (holding aerial/)")
    squeezenet = data.parent / "weights" / "squeezenet1_1-imagenet.pth"
    rows = {
        "SqueezeNet 1.1 (ImageNet), threads": ["--model", "squeezenet1_1", "--weights", str(squeezenet)],
        "ResNet-18 (random weights), threads": ["--weights", "random"],
        "SqueezeNet 1.1 (ImageNet), --scheduler local": [
            "--model",
            "squeezenet1_1",
            "--weights",
            str(squeezenet),
            "--scheduler",
            "local",
        ],  # fmt: skip
    }
    exe = str(Path(sys.executable).parent / "aerial-search")
    out = {"libc": " ".join(platform.libc_ver()), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in rows.items():
            runs: dict[str, list[dict]] = {"system": [], "keep": []}
            diffs = []
            for _ in range(args.repeat):
                for setting in runs:
                    store = Path(tmp) / f"{setting}.zarr"
                    argv = [exe, "ingest", str(data / "aerial"), "--store", str(store), "--no-progress",
                            "--overwrite", *flags]  # fmt: skip
                    runs[setting].append(run(argv, setting))
                diffs.append(same_store(Path(tmp) / "system.zarr", Path(tmp) / "keep.zarr"))
            row = {"row": name, "runs": runs, "max_fingerprint_diff": max(diffs)}
            for setting, rs in runs.items():
                for key in ("ingest_s", "user_s", "sys_s", "peak_rss_gib"):
                    row[f"{setting}_{key}"] = harness.median([r[key] for r in rs])
            row["speedup"] = row["system_ingest_s"] / row["keep_ingest_s"]
            row["system_kernel_share"] = row["system_sys_s"] / (row["system_user_s"] + row["system_sys_s"])
            out["rows"].append(row)
            harness.show({k: v for k, v in row.items() if k != "runs"})
    harness.write(args.out, out)
    print()
    print(
        "| run | ingest s, system / kept | speedup | CPU s user + kernel, system | kept | peak RSS GiB, system / kept |"
    )
    print("|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(
            f"| {r['row']} | {r['system_ingest_s']:.1f} / {r['keep_ingest_s']:.1f} | **{r['speedup']:.2f}x** | "
            f"{r['system_user_s']:.1f} + {r['system_sys_s']:.1f} | {r['keep_user_s']:.1f} + {r['keep_sys_s']:.1f} | "
            f"{r['system_peak_rss_gib']:.2f} / {r['keep_peak_rss_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
