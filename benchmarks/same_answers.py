"""Behaviour check across commits: the demo store is built once, then every search below runs
through the command line of this tree and of an older commit on that same store, and their
``--json`` (and ``--geojson``) files must be byte-identical. Writes benchmarks/same_answers.json
and exits 1 on any difference.

    python benchmarks/same_answers.py --against f470bc8

The demo store is made by ``aerial-search demo`` of the older commit (real sample imagery and
real pretrained weights, as a user gets them), so this tree also reads a store its predecessor
wrote. Post-processing runs on a copy of the store per commit (each tree fits its own), and the
searches that need it run on that copy: a refactoring that changed a fit shows up there.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import harness
import numpy as np

CLI = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


def cli(tree: Path, *argv: str) -> None:
    _, res = harness.wall([sys.executable, "-c", CLI, *argv], tree)
    if res.returncode:
        raise RuntimeError(f"{tree}: aerial-search {' '.join(argv)} exited {res.returncode}:\n{res.stderr[-2000:]}")


def pick(store: Path) -> dict[str, str]:
    """Query tiles of the demo store: uids of valid tiles in images with and without a CRS, a
    place, a box around it and a file name."""
    import xarray as xr

    ds = xr.open_zarr(store, consolidated=True)
    valid = ds["valid"].values
    lon, lat, uid, image = ds["lon"].values, ds["lat"].values, ds["uid"].values, ds["image"].values
    geo = np.flatnonzero(valid & np.isfinite(lon))
    plain = np.flatnonzero(valid & ~np.isfinite(lon))
    a, b, c = (int(uid[i]) for i in (plain[len(plain) // 3], plain[len(plain) // 2], geo[len(geo) // 2]))
    g = geo[len(geo) // 2]
    same = geo[image[geo] == image[g]]
    w, e = float(lon[same].min()), float(lon[same].max())
    s, n = float(lat[same].min()), float(lat[same].max())
    return {"a": str(a), "b": str(b), "c": str(c), "lonlat": f"{lon[g]:.6f},{lat[g]:.6f}",
            "bbox": f"{w},{s},{(w + e) / 2},{n}", "image": str(ds["image_path"].values[image[plain[0]]]).rsplit("/", 1)[-1]}  # fmt: skip


def cases(q: dict[str, str], query_png: Path) -> list[tuple[str, str, list[str]]]:
    """(name, store kind, argv after ``--store S``): "raw" runs on the demo store itself."""
    return [
        ("uid k10", "raw", ["search", "--uid", q["a"], "-k", "10"]),
        ("two uids", "raw", ["search", "--uid", q["a"], "--uid", q["c"], "-k", "5"]),
        ("diverse", "raw", ["search", "--uid", q["a"], "--diverse", "-k", "8"]),
        ("overlapping", "raw", ["search", "--uid", q["b"], "--include-overlapping", "-k", "6"]),
        ("threshold", "raw", ["search", "--uid", q["a"], "--max-distance", "40", "--limit", "25"]),
        ("lonlat", "raw", ["search", f"--lonlat={q['lonlat']}", "-k", "7"]),
        ("bbox", "raw", ["search", "--uid", q["a"], f"--bbox={q['bbox']}", "-k", "5"]),
        ("images glob", "raw", ["search", "--uid", q["c"], "--images", q["image"], "-k", "5"]),
        ("image file", "raw", ["search", "--image", str(query_png), "-k", "5"]),
        ("raw flag", "raw", ["search", "--uid", q["a"], "--raw", "-k", "5"]),
        (
            "examples centroid",
            "raw",
            ["search", "--positive", q["a"], "--positive", q["b"], "--negative", q["c"], "-k", "9"],
        ),
        (
            "examples nearest",
            "raw",
            ["search", "--positive", q["a"], "--positive", q["b"], "--score", "nearest", "-k", "9"],
        ),
        (
            "classify",
            "raw",
            [
                "classify",
                "--positive",
                q["a"],
                "--positive",
                q["b"],
                "--negative",
                q["c"],
                "--background",
                "40",
                "-k",
                "8",
            ],
        ),
        (
            "classify threshold",
            "raw",
            ["classify", "--positive", q["a"], "--positive", q["b"], "--background", "40", "--min-score", "0.5"],
        ),
        ("hellinger dba qe", "post", ["search", "--uid", q["a"], "--qe", "3", "--alpha", "1", "-k", "8"]),
        ("codes rerank", "post", ["search", "--uid", q["a"], "--codes", "--rerank", "40", "-k", "8"]),
        ("diffusion", "post", ["search", "--uid", q["a"], "--diffusion", "--diffusion-k", "8", "-k", "8"]),
        ("pca", "pca", ["search", "--uid", q["b"], "-k", "8"]),
    ]


POSTPROCESS = {
    "post": [["--method", "hellinger", "--dba", "4"], ["--codes", "binary", "--bits", "64"], ["--knn", "8"]],
    "pca": [["--method", "pca", "--dims", "32"]],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the older commit")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "aerial-search-same-answers"))
    ap.add_argument("--out", default=str(Path(__file__).with_name("same_answers.json")))
    args = ap.parse_args()
    work = Path(args.workdir)
    old = harness.worktree(args.against, work)
    trees = {args.against: old, "this tree": harness.ROOT}
    for name, tree in trees.items():  # each command line below imports its own tree's package
        where = harness.child("import json, pipeline; print(json.dumps(pipeline.__file__))", tree)
        assert Path(where).is_relative_to(tree), (name, where)
    demo = work / f"demo-{old.name}"  # made by that commit: a store an older --against made may be of an older schema
    if not (demo / "demo.zarr" / "zarr.json").exists():
        shutil.rmtree(demo, ignore_errors=True)
        cli(old, "demo", "--out", str(demo))
    store = demo / "demo.zarr"
    q = pick(store)
    query_png = work / "query.png"
    if not query_png.exists():  # a window of a sample image, saved as a PNG file query
        import xarray as xr
        from PIL import Image

        from pipeline.render import read_tile

        paths = xr.open_zarr(store, consolidated=True)["image_path"].values
        Image.fromarray(read_tile(str(paths[1]), 128, 256).transpose(1, 2, 0)).save(query_png)
    stores = {}
    for name, tree in trees.items():
        for kind, steps in POSTPROCESS.items():
            copy = work / f"{kind}-{tree.name}.zarr"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(store, copy)
            for step in steps:
                cli(tree, "postprocess", "--store", str(copy), *step)
            stores[name, kind] = copy
        stores[name, "raw"] = store
    rows, same = [], True
    for case, kind, argv in cases(q, query_png):
        outs = {}
        for name, tree in trees.items():
            js, gj = (
                work / f"{case.replace(' ', '_')}-{tree.name}.json",
                work / f"{case.replace(' ', '_')}-{tree.name}.geojson",
            )
            extra = ["--geojson", str(gj), "--pixel-coords"] if argv[0] == "search" else []
            cli(tree, argv[0], "--store", str(stores[name, kind]), *argv[1:], "--json", str(js), *extra)
            outs[name] = (js, gj if extra else None)
        (a_js, a_gj), (b_js, b_gj) = outs.values()
        ok = filecmp.cmp(a_js, b_js, shallow=False) and (a_gj is None or filecmp.cmp(a_gj, b_gj, shallow=False))
        same &= ok
        row = {"case": case, "store": kind, "argv": argv, "identical": ok, "json_bytes": a_js.stat().st_size}
        rows.append(row)
        harness.show({k: v for k, v in row.items() if k != "argv"})
    harness.write(args.out, {"against": args.against, "identical": same, "cases": rows})
    print("all identical" if same else "DIFFERENCES: see the rows above", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
