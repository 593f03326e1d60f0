"""Ingest driver at archive scale, with the CNN replaced by a stand-in that costs nothing, so the
figures are what the driver, the graph and the readers allow (2 cores, threads scheduler).

    python benchmarks/driver.py --against 6438984 [--data $AERIAL_SEARCH_DATA]   # before/after, one run
    python benchmarks/driver.py --skip-compare                                   # this tree only

Prints and writes benchmarks/driver.json:

1. windows/s of a whole ingest (headers to committed store; torch imported before the clock
   starts, in both trees) for one 16,384 x 16,384 deflate
   GeoTIFF, for ``$AERIAL_SEARCH_DATA/ucmerced`` (2,100 JPEGs) and for a synthetic archive of
   10,000 GeoTIFFs of 256 x 256 px, before (commit REV, its ``tiles.embed_chunk`` replaced by the
   same band-mean stand-in) and after (this tree, ``--model standin``), fresh processes,
   interleaved, median of ``--repeat`` runs;
2. driver time per image (header reads + classification + slot allocation + metadata + graph
   building), this tree, per archive;
3. planning 1,000 headers with 50 ms of injected latency per read, default concurrency;
4. a 2-worker LocalCluster with a simulated device (``--model standin --standin-rate R``: each
   forward sleeps n / R s without the GIL, one device per worker), 16 batches of 3 uneven units:
   total time against (work / workers), work being every task's compute time from the
   cluster's task stream (reads, the simulated device, writes), pipelined (2 and 3 batches in
   flight) and with the old barrier between batches (1 in flight).
5. ``--now-only``: parts 1 (this tree only) and 2 again, merged into the JSON as ``now``.
6. ``--decoders-only [--against REV]``: UC Merced's whole ingest with ``read.decoder`` auto
   (Pillow reads the JPEGs' headers and pixels) against gdal, and against commit REV's defaults
   when given (a commit with ``--model standin``), fresh processes, interleaved, median of
   ``--repeat``; merged into the JSON.
7. ``--floor``: the decode floor. Every file of each archive read bare (rasterio open + read of
   all bands; the large GeoTIFF in 2,048 px windows, one open each), one thread per core, no
   pipeline, no store; and UC Merced's JPEGs decoded by Pillow as well. Windows/s of these bare
   reads bound what any driver can reach; compared with this tree's whole ingest of the large
   GeoTIFF in the same run (median of ``--repeat``). ``--floor-only`` runs this part alone and
   merges it into the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import harness
import numpy as np
from ingest import synthetic_tif

ROOT = harness.ROOT

# One whole ingest in a fresh process; harness.child puts the tree's pipeline first on its path.
CHILD = r"""
import glob, json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
import torch  # imported before the clock starts, for both trees: the model's cost is not measured
from pipeline import Config, ingest
paths = json.load(open({paths!r}))
if {old!r}:
    from pipeline import tiles
    def standin(rgb, ij, spec):  # the same math as --model standin: band means of a 16 px subsample
        out = np.zeros((len(ij), spec.dim), np.float32)
        for k, (i, j) in enumerate(ij):
            out[k, :3] = rgb[:, i * 128 : i * 128 + 256 : 16, j * 128 : j * 128 + 256 : 16].mean(axis=(1, 2)) / 255.0
        return out
    tiles.embed_chunk = standin
    cfg = Config().override(**{{"model.weights": "random", "cluster.progress": False}})
else:
    cfg = Config().override(**{{"model.arch": "standin", "cluster.progress": False, **{extra!r}}})
t0 = time.perf_counter()
report = ingest(paths, {store!r}, cfg, overwrite=True)
print(json.dumps({{"seconds": time.perf_counter() - t0, "windows": report.windows, "tiles": report.tiles}}))
"""


def small_archive(root: Path, n: int) -> list[str]:
    """``n`` GeoTIFFs of 256 x 256 px (deflate, textured, a CRS each), written once."""
    import rasterio
    from rasterio.transform import from_origin

    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"chip_{i:05d}.tif" for i in range(n)]
    if all(p.exists() for p in paths):
        return [str(p) for p in paths]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    print(f"writing {n} chips of 256 px into {root} ...", flush=True)
    for i, p in enumerate(paths):
        f = rng.uniform(0.01, 0.06, 3)
        px = np.stack([127 + 80 * np.sin(yy * f[b] + i) * np.cos(xx * f[(b + 1) % 3]) for b in range(3)])
        px = np.clip(px + rng.normal(0, 20, px.shape), 1, 255).astype(np.uint8)
        t = from_origin(400000 + 25.6 * (i % 100), 3300000 - 25.6 * (i // 100), 0.1, 0.1)
        with rasterio.open(p, "w", driver="GTiff", height=256, width=256, count=3, dtype="uint8",
                           crs="EPSG:32617", transform=t, compress="deflate") as dst:  # fmt: skip
            dst.write(px)
    return [str(p) for p in paths]


FLOOR_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")  # as ingest reads
from concurrent.futures import ThreadPoolExecutor
import numpy as np, rasterio
from rasterio.windows import Window
paths, how = json.load(open(sys.argv[1])), sys.argv[2]
def bare(task):
    path, win = task
    if how == "pillow":
        from PIL import Image
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).size
    with rasterio.open(path) as ds:
        return ds.read(window=win).size
tasks = []
for p in paths:
    with rasterio.open(p) as ds:
        w, h = ds.width, ds.height
    if w * h > 4096 * 4096:
        tasks += [(p, Window(c, r, min(2048, w - c), min(2048, h - r))) for r in range(0, h, 2048) for c in range(0, w, 2048)]
    else:
        tasks.append((p, None))
t0 = time.perf_counter()
with ThreadPoolExecutor(os.cpu_count()) as pool:
    values = sum(pool.map(bare, tasks, chunksize=16))
print(json.dumps({"seconds": time.perf_counter() - t0, "values": int(values), "tasks": len(tasks)}))
"""


def decode_floor(archives: dict, windows: dict, work: Path, repeat: int) -> dict:
    """Bare reads of every archive (fresh processes, median of ``repeat``) against this tree's
    whole ingest of the large GeoTIFF, measured in the same run."""
    out: dict = {"large_ingest_runs_s": []}
    large_name = next(iter(archives))
    for _ in range(repeat):
        out["large_ingest_runs_s"].append(
            run_child(ROOT, archives[large_name], work / "floor-large.zarr", False)["seconds"]
        )
    out["large_ingest_windows_per_s"] = windows[large_name] / harness.median(out["large_ingest_runs_s"])
    rows = []
    for name, paths in archives.items():
        listing = work / "floor.paths.json"
        listing.write_text(json.dumps(paths))
        hows = ["rasterio", "pillow"] if name == "ucmerced" else ["rasterio"]  # JPEGs: also a faster decoder
        for how in hows:
            runs = [harness.child(FLOOR_CHILD, args=(listing, how))["seconds"] for _ in range(repeat)]
            sec = harness.median(runs)
            row = {"archive": name, "reader": how, "files": len(paths), "windows": windows[name], "runs_s": runs,
                   "seconds": sec, "windows_per_s": windows[name] / sec,
                   "over_large_ingest": windows[name] / sec / out["large_ingest_windows_per_s"]}  # fmt: skip
            rows.append(row)
            harness.show(row)
    out["rows"] = rows
    return out


def decoders(paths: list[str], work: Path, repeat: int, before: Path | None = None) -> dict:
    """This tree's whole ingest of ``paths`` (UC Merced) with ``read.decoder`` auto (Pillow reads
    the JPEGs' headers and pixels) and gdal, and the ``before`` tree (a commit with the stand-in
    model) with its defaults, fresh processes, interleaved, median of ``repeat``."""
    contenders = {"auto": (ROOT, {"read.decoder": "auto"}), "gdal": (ROOT, {"read.decoder": "gdal"})}
    if before is not None:
        contenders["before"] = (before, {})
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    windows = 0
    for _ in range(repeat):
        for name, (tree, extra) in contenders.items():
            res = run_child(tree, paths, work / f"decoder-{name}.zarr", False, extra)
            runs[name].append(res["seconds"])
            windows = res["windows"]
    med = {d: harness.median(r) for d, r in runs.items()}
    out = {"windows": windows, "runs_s": runs, "median_s": med, "windows_per_s": {d: windows / s for d, s in med.items()},
           "gdal_over_auto": med["gdal"] / med["auto"]}  # fmt: skip
    if before is not None:
        out["before_over_auto"] = med["before"] / med["auto"]
    harness.show(out)
    return out


def run_child(tree: Path, paths: list[str], store: Path, old: bool, extra: dict | None = None) -> dict:
    listing = store.with_suffix(".paths.json")
    listing.write_text(json.dumps(paths))
    code = CHILD.format(paths=str(listing), store=str(store), old=old, extra=extra or {})
    return harness.child(code, tree)


def windows_per_second(archives: dict, trees: dict, work: Path, repeat: int) -> list[dict]:
    rows = []
    for name, paths in archives.items():
        runs: dict[str, list[float]] = {k: [] for k in trees}
        windows = {}
        for _ in range(repeat):
            for label, (tree, old) in trees.items():
                out = run_child(tree, paths, work / f"{name}-{label}.zarr", old)
                runs[label].append(out["seconds"])
                windows[label] = out["windows"]
        assert len(set(windows.values())) == 1, f"{name}: the trees disagree on the windows: {windows}"
        row = {"archive": name, "images": len(paths), "windows": windows[next(iter(windows))]}
        for label in trees:
            s = harness.median(runs[label])
            row[f"{label}_s"], row[f"{label}_windows_per_s"] = s, row["windows"] / s
            row[f"{label}_runs_s"] = runs[label]
        rows.append(row)
        harness.show(row)
    return rows


def driver_time_per_image(paths: list[str]) -> dict:
    """This tree's driver work, timed piece by piece (no pixels are read, nothing is computed):
    header reads as the driver does them, classification, slots, metadata, graph building."""
    import warnings

    from pipeline import Config, store
    from pipeline.cluster import Runtime
    from pipeline.embed import ModelSpec
    from pipeline.ingest import driver, graph, plan

    cfg = Config().override(**{"model.arch": "standin", "cluster.progress": False})
    spec = ModelSpec.from_config(cfg.model)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        headers = driver._check_sources(paths, cfg, Runtime("threads"), remote=False)
    t1 = time.perf_counter()
    found = plan.sort_sources(headers, store.empty_table(), strict=False)
    plans, batches, _ = plan.allocate(
        found.new, 0, 0, cfg.store.chunk_tiles, cfg.read.chunk_px, 8 * cfg.store.chunk_tiles
    )
    rows = plan.table_rows(plans, found.hashes)
    t2 = time.perf_counter()
    tasks = 0
    for b in batches:
        for run in b.runs:
            plan.tile_meta(run)
        parts = graph.batch_parts("/nonexistent/s.zarr", b, cfg, spec)
        tasks += len(parts[0].dask) if parts else 0
    t3 = time.perf_counter()
    n = len(paths)
    return {"images": n, "headers_ms_per_image": (t1 - t0) / n * 1e3, "plan_ms_per_image": (t2 - t1) / n * 1e3,
            "meta_and_graph_ms_per_image": (t3 - t2) / n * 1e3, "driver_ms_per_image": (t3 - t0) / n * 1e3,
            "tasks": tasks, "table_rows": len(rows["image_path"])}  # fmt: skip


def planning_with_latency(paths: list[str], latency: float = 0.05) -> dict:
    """1,000 header reads that each wait ``latency`` s first (object storage round trips), through
    the ingest driver's own header reading with its default concurrency."""
    import os
    import warnings

    from pipeline import Config
    from pipeline.cluster import Runtime
    from pipeline.ingest import driver, plan

    os.environ[plan.HEADER_LATENCY] = str(latency)
    try:
        cfg = Config()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            headers = driver._check_sources(paths[:1000], cfg, Runtime("threads"), remote=False)
        seconds = time.perf_counter() - t0
    finally:
        del os.environ[plan.HEADER_LATENCY]
    return {"headers": len(headers), "latency_s": latency, "threads": cfg.read.header_threads,
            "seconds": seconds, "serial_would_be_s": latency * len(headers)}  # fmt: skip


def three_unit_images(root: Path, n: int) -> list[str]:
    """``n`` 1536 x 512 px GeoTIFFs: at ``chunk_px`` 512 each is 3 grid chunks of 12, 12 and 9
    windows, i.e. 3 uneven units, so 2 workers idle at the tail of every one-image batch unless
    the next batch is already running."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"img_{i:03d}.tif" for i in range(n)]
    for i, p in enumerate(paths):
        if not p.exists():
            synthetic_tif(p, 1536, 512, block=512, seed=i)
    return [str(p) for p in paths]


def simulated_device(work: Path, rate: float, n_batches: int) -> list[dict]:
    """Ingest ``n_batches`` one-image batches on a 2-worker LocalCluster (1 thread each, as a GPU
    worker runs today) whose model is a simulated device of ``rate`` tiles/s per worker; total
    time against the ideal (device work / 2 workers), with 1 batch in flight (the old barrier)
    and 2 (pipelined). Worker busy time comes from the cluster's task stream."""
    import warnings

    from distributed import Client, LocalCluster, get_task_stream

    from pipeline import Config, ingest

    paths = three_unit_images(work / "sim", n_batches)
    cfg = Config().override(**{
        "model.arch": "standin", "model.standin_rate": rate, "model.batch_size": 16, "read.chunk_px": 512,
        "store.chunk_tiles": 16, "store.batch_tiles": 1, "cluster.progress": False,
    })  # fmt: skip
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                ingest(paths[:2], work / "sim-warm.zarr", cfg, client=client, overwrite=True)  # models built
                for in_flight in (1, 2, 3):
                    c = cfg.override(**{"cluster.batches_in_flight": in_flight})
                    with get_task_stream(client) as ts:
                        t = harness.timed(lambda: ingest(paths, work / f"sim-{in_flight}.zarr", c, client=client,
                                                         overwrite=True), repeat=1)  # fmt: skip
                    report, seconds = t.value, t.median
                    busy = sum(  # every task's compute time: reads, the simulated device, writes
                        span["stop"] - span["start"]
                        for task in ts.data
                        for span in task["startstops"]
                        if span["action"] == "compute"
                    )
                    rows.append({"batches_in_flight": in_flight, "batches": n_batches, "windows": report.windows,
                                 "rate_tiles_per_s": rate, "seconds": seconds, "work_s": busy,
                                 "work_per_worker_s": busy / 2, "over_work_per_worker": seconds / (busy / 2),
                                 "device_s": report.windows / rate, "worker_busy_fraction": busy / (2 * seconds)})  # fmt: skip
                    harness.show(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="6438984", help="the commit to compare with (before)")
    ap.add_argument("--data", default=None, help="the shared data folder (default: $AERIAL_SEARCH_DATA)")
    ap.add_argument("--workdir", default="/tmp/aerial-search-driver")
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--large-px", type=int, default=16_384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--rate", type=float, default=50.0, help="simulated device tiles/s per worker")
    ap.add_argument("--batches", type=int, default=16, help="one-image batches in the simulated-device runs")
    ap.add_argument("--floor", action="store_true", help="also measure the decode floor (bare reads)")
    ap.add_argument("--floor-only", action="store_true", help="only the decode floor, merged into --out")
    ap.add_argument("--now-only", action="store_true",
                    help="only this tree's windows/s and driver time, merged into --out as 'now'")  # fmt: skip
    ap.add_argument("--decoders-only", action="store_true",
                    help="only UC Merced's ingest with read.decoder auto against gdal, merged into --out")  # fmt: skip
    ap.add_argument("--out", default=str(Path(__file__).with_name("driver.json")))
    args = ap.parse_args()
    import os

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    large = work / f"large-{args.large_px}.tif"
    if not large.exists():
        print(f"writing {large} ...", flush=True)
        synthetic_tif(large, args.large_px, args.large_px)
    archives = {"large GeoTIFF": [str(large)]}
    data = args.data or os.environ.get("AERIAL_SEARCH_DATA")
    if data and Path(data, "ucmerced").is_dir():
        archives["ucmerced"] = sorted(str(p) for p in Path(data, "ucmerced").glob("*/*") if p.is_file())
    archives[f"{args.small_files} chips"] = small_archive(work / "chips", args.small_files)
    if args.now_only:  # this tree's whole-ingest rows and driver time, beside the recorded before/after
        now = {"windows_per_s": windows_per_second(archives, {"after": (ROOT, False)}, work, args.repeat),
               "driver_time": {name: driver_time_per_image(paths) for name, paths in archives.items()}}  # fmt: skip
        harness.update(args.out, "now", now)
        print(json.dumps(now["driver_time"], indent=1))
        return
    if args.decoders_only:
        before = None
        if args.against != ap.get_default("against"):  # a commit that has the stand-in model
            before = harness.worktree(args.against, work)
        harness.update(args.out, "decoders_ucmerced", decoders(archives["ucmerced"], work, args.repeat, before))
        return
    if args.floor_only:
        windows = {r["archive"]: r["windows"] for r in json.loads(Path(args.out).read_text())["windows_per_s"]}
        floor = decode_floor(archives, windows, work, args.repeat)
        harness.update(args.out, "decode_floor", floor)
        print_floor(floor)
        return
    out: dict = {}
    trees = {"after": (ROOT, False)}
    if not args.skip_compare:
        trees = {"before": (harness.worktree(args.against, work), True), "after": (ROOT, False)}
    out["windows_per_s"] = windows_per_second(archives, trees, work, args.repeat)
    out["driver_time"] = {name: driver_time_per_image(paths) for name, paths in archives.items()}
    print(json.dumps(out["driver_time"], indent=1), flush=True)
    out["planning_latency"] = planning_with_latency(archives[f"{args.small_files} chips"])
    harness.show(out["planning_latency"])
    out["simulated_device"] = simulated_device(work, args.rate, args.batches)
    if args.floor:
        windows = {r["archive"]: r["windows"] for r in out["windows_per_s"]}
        out["decode_floor"] = decode_floor(archives, windows, work, args.repeat)
    harness.write(args.out, out)
    print_table(out)
    if args.floor:
        print_floor(out["decode_floor"])


def print_floor(floor: dict) -> None:
    print(f"\nthis tree's ingest of the large GeoTIFF: {floor['large_ingest_windows_per_s']:.0f} windows/s")
    for r in floor["rows"]:
        print(f"bare {r['reader']} reads, {r['archive']}: {r['windows_per_s']:.0f} windows/s = "
              f"{r['over_large_ingest']:.2f}x the large GeoTIFF's ingest (no driver, no model, no store)")  # fmt: skip


def print_table(out: dict) -> None:
    print(f"\n{'archive':<16} {'images':>7} {'windows':>8} | {'before w/s':>10} {'after w/s':>10} {'after/before':>12}")
    big = None
    for r in out["windows_per_s"]:
        before = r.get("before_windows_per_s")
        ratio = r["after_windows_per_s"] / before if before else float("nan")
        print(f"{r['archive']:<16} {r['images']:>7,} {r['windows']:>8,} | {before or float('nan'):>10.0f} "
              f"{r['after_windows_per_s']:>10.0f} {ratio:>12.2f}")  # fmt: skip
        big = big or r["after_windows_per_s"]
    for r in out["windows_per_s"][1:]:
        print(f"{r['archive']}: {r['after_windows_per_s'] / big:.2f}x the large GeoTIFF's windows/s (target >= 0.5)")
    for name, d in out["driver_time"].items():
        print(f"driver time per image, {name}: {d['driver_ms_per_image']:.3f} ms (target < 1 ms)")
    p = out["planning_latency"]
    print(f"planning {p['headers']} headers at {p['latency_s'] * 1e3:.0f} ms each: {p['seconds']:.2f} s "
          f"(target < 5 s; serial {p['serial_would_be_s']:.0f} s)")  # fmt: skip
    for r in out["simulated_device"]:
        print(f"simulated device, {r['batches']} batches, {r['batches_in_flight']} in flight: {r['seconds']:.2f} s = "
              f"{r['over_work_per_worker']:.2f}x (work / workers = {r['work_per_worker_s']:.2f} s) (target <= 1.2 "
              f"pipelined); workers busy {100 * r['worker_busy_fraction']:.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
