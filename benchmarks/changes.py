"""Change detection between flights (``aerial-search changes``): what the pairing of after and
before windows costs, this tree against an older commit, in one run.

    python benchmarks/changes.py --against dc00717            # before/after, one run
    python benchmarks/changes.py --grid 6 --repeat 3          # smaller survey

The archive: a drone-like survey flown twice, ``--grid`` x ``--grid`` images of 1,024 px per
flight with 30 % overlap between neighbours (2019), and the same survey shifted 3 and -2 m
(2021); ingested once with the stand-in model (the CNN is not the subject). Each contender runs
``changes(index, 2019, 2021, k=100)`` in its own fresh process (store opened and warmed by one
untimed call first), ``--repeat`` timed calls per process, processes interleaved old / new
``--rounds`` times; medians of all timed calls:

- ``all``: every after window against the before flight;
- ``view``: the after windows centred in the box of one image's western half (the page's
  *Changes in this view*).

Both trees must return the same pairs (uid, before uid, distance): the script checks it. Writes
benchmarks/changes.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import harness
import numpy as np

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
from pipeline.changes import changes
from pipeline.dates import DateRange
from pipeline.search import SearchIndex
store, bbox, repeat = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
index = SearchIndex.open(store)
before, after = DateRange.parse("2019"), DateRange.parse("2021")
bbox = tuple(bbox) if bbox else None
res, pairing = changes(index, before, after, bbox=bbox, k=100)  # warm: metadata read, imports
times = []
for _ in range(repeat):
    t0 = time.perf_counter()
    res, pairing = changes(index, before, after, bbox=bbox, k=100)
    times.append(time.perf_counter() - t0)
recs = res.records()
print(json.dumps({"times": times, "pairs": int(pairing.pairs),
                  "answer": [[r["uid"], r["before_uid"], round(r["distance"], 6)] for r in recs]}))
"""


def survey(root: Path, grid: int, px: int = 1024) -> tuple[Path, Path]:
    """Two flights of ``grid`` x ``grid`` overlapping GeoTIFFs (real-looking texture) and their dates."""
    import rasterio
    from rasterio.transform import from_origin

    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:px, 0:px]
    base = np.stack([(127 + 60 * np.sin(xx / (17 + 9 * b)) * np.cos(yy / (23 + 5 * b)) + rng.normal(0, 25, (px, px)))
                     for b in range(3)]).clip(1, 255).astype(np.uint8)  # fmt: skip
    step = px * 0.5 * 0.7  # 0.5 m pixels, 30 % overlap
    lines = ["path,acquired"]
    for f, (dx, dy, year) in enumerate([(0.0, 0.0, 2019), (3.0, -2.0, 2021)]):
        for i in range(grid):
            for j in range(grid):
                name = f"f{f}_{i:02d}_{j:02d}.tif"
                path = src / name
                if not path.exists():
                    profile = dict(driver="GTiff", width=px, height=px, count=3, dtype="uint8", crs="EPSG:32617",
                                   transform=from_origin(400000 + j * step + dx, 3300000 - i * step + dy, 0.5, 0.5))  # fmt: skip
                    with rasterio.open(path, "w", **profile) as dst:
                        dst.write(np.roll(base, (i * 37 + f * 11, j * 53), axis=(1, 2)))
                lines.append(f"{name},{year}-06-01")
    dates = root / "dates.csv"
    dates.write_text("\n".join(lines) + "\n")
    return src, dates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="dc00717", help="the commit to compare with (old)")
    ap.add_argument("--grid", type=int, default=12, help="images per side of each flight (default 12: 288 images)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/aerial-bench-changes"))
    ap.add_argument("--out", type=Path, default=harness.ROOT / "benchmarks" / "changes.json")
    args = ap.parse_args()

    import warnings

    from pipeline import Config, ingest, open_store
    from pipeline.dates import DateSources

    root = args.work / f"survey-{args.grid}"
    src, dates = survey(root, args.grid)
    store = root / "s.zarr"
    if not store.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = Config().override(**{"model.arch": "standin", "cluster.progress": False})
            ingest([str(src)], store, cfg, dates=DateSources(csv_path=str(dates)))
    ds = open_store(store)
    first = [i for i, p in enumerate(ds["image_path"].values) if str(p).endswith("f1_00_00.tif")][0]
    mine = (ds["image"].values == first) & ds["valid"].values
    lon, lat = ds["lon"].values[mine], ds["lat"].values[mine]
    view = [float(lon.min()), float(lat.min()), float(np.median(lon)), float(lat.max())]
    trees = {"old": harness.worktree(args.against, args.work), "new": harness.ROOT}
    rows = []
    for case, bbox in (("all", None), ("view", view)):
        times: dict[str, list[float]] = {"old": [], "new": []}
        answers, pairs = {}, {}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                doc = harness.child(CHILD, tree, [str(store), json.dumps(bbox), str(args.repeat)])
                times[name] += doc["times"]
                answers[name], pairs[name] = doc["answer"], doc["pairs"]
        assert answers["old"] == answers["new"] and pairs["old"] == pairs["new"], f"{case}: the trees disagree"
        med = {name: harness.median(t) for name, t in times.items()}
        row = {"case": case, "images": int(ds.sizes["img"]), "windows": int(ds["valid"].values.sum()),
               "pairs": pairs["new"], "old_rev": args.against, "old_s": med["old"], "new_s": med["new"],
               "old_over_new": med["old"] / med["new"], "timed_calls_each": len(times["new"])}  # fmt: skip
        rows.append(row)
        harness.show(row)
    harness.write(args.out, {"rows": rows, "grid": args.grid, "note": "medians of all timed calls; same answers checked"},
                  against=args.against)  # fmt: skip
    print(f"\n{'case':<6} {'images':>7} {'pairs':>7} | {'old s':>8} {'new s':>8} | old/new")
    for r in rows:
        print(f"{r['case']:<6} {r['images']:>7} {r['pairs']:>7} | {r['old_s']:8.3f} {r['new_s']:8.3f} | {r['old_over_new']:6.2f}x")


if __name__ == "__main__":
    main()
