"""Start-up time of the commands a user runs most against ``python -c pass``, and the heavy
packages each imports. Writes benchmarks/startup.json.

    python benchmarks/startup.py                    # this tree
    python benchmarks/startup.py --against f470bc8  # this tree against an older commit, same run

Commands: ``aerial-search --help``, ``info`` and ``search --uid`` (an index on disk, no query
image) on a float32 and a float16 store, each a fresh process (``python -c`` calling the CLI's
``main``, as the console script does), rounds alternating the trees and the commands so that
machine drift hits all alike; medians of ``--repeat`` runs. The stores are small (the stand-in
model, one 1,024 px GeoTIFF), made once by this tree: start-up, not search, is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import harness
import numpy as np

HEAVY = ("torch", "torchvision", "distributed", "dask", "xarray", "zarr", "rasterio", "scipy", "sklearn", "fastapi")
CLI = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
PROBE = (
    "import atexit, json, sys\n"
    f"atexit.register(lambda: print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))), "
    "file=sys.stderr))\n"
)


def make_stores(work: Path) -> dict[str, tuple[Path, int]]:
    """float32 and float16 stores of one synthetic 1,024 px GeoTIFF and a uid of each."""
    import rasterio
    from affine import Affine

    from pipeline.cli import main
    from pipeline.store import open_store

    tif = work / "scene.tif"
    if not tif.exists():
        rng = np.random.default_rng(0)
        px = rng.integers(1, 255, (3, 1024, 1024), dtype=np.uint8)
        with rasterio.open(tif, "w", driver="GTiff", width=1024, height=1024, count=3, dtype="uint8",
                           crs="EPSG:32617", transform=Affine(0.5, 0, 400000, 0, -0.5, 3300000)) as ds:  # fmt: skip
            ds.write(px)
    out = {}
    for dtype in ("float32", "float16"):
        path = work / f"{dtype}.zarr"
        if not (path / "zarr.json").exists():
            rc = main(["ingest", str(tif), "--store", str(path), "--model", "standin", "--dtype", dtype,
                       "--no-progress"])  # fmt: skip
            assert rc == 0, f"ingest of the start-up store failed ({rc})"
        ds = open_store(path)
        out[dtype] = (path, int(ds["uid"].values[np.flatnonzero(ds["valid"].values)[10]]))
    return out


def commands(stores: dict[str, tuple[Path, int]]) -> dict[str, list[str]]:
    (p32, u32), (p16, u16) = stores["float32"], stores["float16"]
    return {
        "--help": ["--help"],
        "info": ["info", "--store", str(p32)],
        "search --uid (float32)": ["search", "--store", str(p32), "--uid", str(u32), "-k", "5"],
        "search --uid (float16)": ["search", "--store", str(p16), "--uid", str(u16), "-k", "5"],
    }


def measure(trees: dict[str, Path | None], cmds: dict[str, list[str]], repeat: int) -> dict[str, dict]:
    runs: dict[tuple[str, str], list[float]] = {}
    imported: dict[tuple[str, str], list[str]] = {}
    for name, tree in trees.items():  # which heavy packages each command loads (one untimed run)
        for cmd, argv in cmds.items():
            _, res = harness.wall([sys.executable, "-c", PROBE + CLI, *argv], tree)
            if res.returncode not in (0,):
                raise RuntimeError(f"{name}: aerial-search {' '.join(argv)} failed:\n{res.stderr[-2000:]}")
            imported[name, cmd] = json.loads(res.stderr.strip().splitlines()[-1])
    for _ in range(repeat):
        for name, tree in trees.items():
            t, _ = harness.wall([sys.executable, "-c", "pass"], tree)
            runs.setdefault((name, "python -c pass"), []).append(t)
            for cmd, argv in cmds.items():
                t, _ = harness.wall([sys.executable, "-c", CLI, *argv], tree)
                runs.setdefault((name, cmd), []).append(t)
    out: dict[str, dict] = {}
    for name in trees:
        base = harness.median(runs[name, "python -c pass"])
        rows = {"python -c pass": {"median_s": base}}
        for cmd in cmds:
            med = harness.median(runs[name, cmd])
            rows[cmd] = {"median_s": med, "over_python_s": med - base, "heavy_imports": imported[name, cmd],
                         "runs_s": runs[name, cmd]}  # fmt: skip
            harness.show({"tree": name, "command": cmd, "median_s": med, "over_python_s": med - base,
                          "heavy": " ".join(imported[name, cmd])})  # fmt: skip
        out[name] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="an older commit to measure in the same run")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "aerial-search-startup"))
    ap.add_argument("--out", default=str(Path(__file__).with_name("startup.json")))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    stores = make_stores(work)
    trees: dict[str, Path | None] = {"this tree": harness.ROOT}
    if args.against:
        trees = {args.against: harness.worktree(args.against, work), **trees}
    results = measure(trees, commands(stores), args.repeat)
    harness.write(args.out, {"repeat": args.repeat, "trees": {k: str(v) for k, v in trees.items()}, "rows": results},
                  against=args.against)  # fmt: skip


if __name__ == "__main__":
    main()
