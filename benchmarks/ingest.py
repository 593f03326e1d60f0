"""Ingest throughput: end to end versus the bare model, in one run; peak RSS on a 20k x 20k image.

    python benchmarks/ingest.py                 # everything, writes benchmarks/ingest.json
    python benchmarks/ingest.py --skip-rss      # throughput only

1. Bare model: ResNet-18 (random weights: same architecture and cost as the pretrained one) on
   uint8 windows already in memory, for batch sizes and thread layouts (one stream with all
   cores as torch threads, or one stream per core with one torch thread each).
2. End to end: ``ingest`` of a synthetic GeoTIFF (read, windows, nodata filter, model, Zarr
   write) on the threaded scheduler with the same thread layouts. Ratio = e2e / best bare.
3. Peak RSS of a fresh process ingesting a synthetic 20,000 x 20,000 GeoTIFF with the real
   reader, tiler and store writer, and the stand-in model (``--model standin``: band means, not
   a CNN; ResNet-18 on 24,025 windows would take ~13 minutes on 2 cores): its ``VmHWM``, with
   glibc's malloc settings (``AERIAL_SEARCH_MALLOC=system``) and with the product's (kept memory).

Every part runs with the malloc settings the CLI applies (``keep_freed_memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
import numpy as np

from pipeline import Config, ingest
from pipeline.embed import ModelSpec, embed_batch, get_model
from pipeline.resources import cpu_count, keep_freed_memory, set_torch_threads


def synthetic_tif(path: Path, h: int, w: int, block: int = 2048, seed: int = 0) -> Path:
    """A textured RGB GeoTIFF written block by block (bounded memory), tiled and deflated."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", height=h, width=w, count=3, dtype="uint8", crs="EPSG:32617",
                   transform=from_origin(400000, 3300000, 0.1, 0.1), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate", predictor=2)  # fmt: skip
    yy, xx = np.mgrid[0:block, 0:block].astype(np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, h, block):
            for c in range(0, w, block):
                bh, bw = min(block, h - r), min(block, w - c)
                f = rng.uniform(0.01, 0.06, 3)
                px = np.stack(
                    [
                        127 + 80 * np.sin((yy[:bh, :bw] + r) * f[b]) * np.cos((xx[:bh, :bw] + c) * f[(b + 1) % 3])
                        for b in range(3)
                    ]
                )
                px += rng.normal(0, 20, px.shape)
                dst.write(np.clip(px, 1, 255).astype(np.uint8), window=Window(c, r, bw, bh))
    return path


def bare_model(n: int, batch: int, streams: int, torch_threads: int) -> float:
    """Tiles/s of the model alone on ``n`` in-memory windows split over ``streams`` threads."""
    spec = ModelSpec(weights="random", batch_size=batch, torch_threads=torch_threads)
    set_torch_threads(torch_threads)
    get_model(spec)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, (n, 3, 256, 256), dtype=np.uint8)
    embed_batch(windows[:batch], spec)  # warm-up (allocator, kernels)
    parts = np.array_split(windows, streams)
    with ThreadPoolExecutor(streams) as pool:
        t = harness.timed(lambda: list(pool.map(lambda w: embed_batch(w, spec), parts)), repeat=1)
    return n / t.median


def end_to_end(tif: Path, workdir: Path, batch: int, dask_threads: int, torch_threads: int) -> dict:
    cfg = Config().override(**{
        "model.weights": "random", "model.batch_size": batch, "model.torch_threads": torch_threads,
        "read.chunk_px": 512, "cluster.threads": dask_threads, "cluster.progress": False,
    })  # fmt: skip
    t = harness.timed_ingest([str(tif)], workdir, f"e2e-{batch}-{dask_threads}", cfg, repeat=1)
    return {"tiles": t.value.tiles, "seconds": t.median, "tiles_per_s": t.value.tiles / t.median}


def peak_rss_gib() -> float:
    """This process's own peak RSS: ``VmHWM``. Not ``ru_maxrss``, which Linux carries over an exec
    from the process that spawned it: a child of this benchmark, whose parent holds the models of
    the throughput runs, reported the parent's 1.7-2.3 GiB instead of its own ~0.7."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB
    except (OSError, IndexError):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_child(tif: str, store: str) -> None:
    """Runs in a fresh process: ingest with the stand-in model (``--model standin``: band means of
    a 16 px subsample, not a CNN), print peak RSS as JSON."""
    cfg = Config().override(**{"model.arch": "standin", "model.weights": "random", "cluster.progress": False})
    t0 = time.perf_counter()
    report = ingest([tif], store, cfg, overwrite=True)
    print(json.dumps({
        "windows": report.windows, "tiles": report.tiles, "seconds": time.perf_counter() - t0,
        "peak_rss_gib": peak_rss_gib(),
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("ingest.json")))
    ap.add_argument("--windows", type=int, default=96, help="windows for the bare-model runs")
    ap.add_argument("--image-px", type=int, default=1792, help="side of the end-to-end GeoTIFF")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-px", type=int, default=20000)
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # the malloc settings the CLI and every ingest apply, for the bare model as well (before any
    # thread starts: the bare model runs first, ingest would apply them only after it)
    keep_freed_memory()
    if args.rss_child:
        rss_child(*args.rss_child)
        return

    cores = cpu_count()
    layouts = sorted({(1, cores), (cores, 1)})  # (parallel streams / dask threads, torch threads)
    results: dict = {"cores": cores, "bare": [], "e2e": []}
    print(f"{cores} cores; layouts (streams x torch threads): {layouts}")
    for batch in (16, 64):
        for streams, tt in layouts:
            tps = bare_model(args.windows, batch, streams, tt)
            results["bare"].append({"batch": batch, "streams": streams, "torch_threads": tt, "tiles_per_s": tps})
            print(f"bare model   batch {batch:>3}  {streams} x {tt} threads: {tps:7.1f} tiles/s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tif = synthetic_tif(work / "e2e.tif", args.image_px, args.image_px)
        for batch in (16, 64):
            for dt, tt in layouts:
                r = end_to_end(tif, work, batch, dt, tt)
                r.update(batch=batch, dask_threads=dt, torch_threads=tt)
                results["e2e"].append(r)
                print(
                    f"end to end   batch {batch:>3}  {dt} x {tt} threads: {r['tiles_per_s']:7.1f} tiles/s ({r['tiles']} tiles)"
                )
        best_bare = max(results["bare"], key=lambda r: r["tiles_per_s"])
        best_e2e = max(results["e2e"], key=lambda r: r["tiles_per_s"])
        default = next(r for r in results["e2e"] if r["batch"] == 64 and r["dask_threads"] == cores)
        results["ratio_best_e2e_to_best_bare"] = best_e2e["tiles_per_s"] / best_bare["tiles_per_s"]
        results["ratio_default_e2e_to_best_bare"] = default["tiles_per_s"] / best_bare["tiles_per_s"]
        print(
            f"\nbest bare model {best_bare['tiles_per_s']:.1f} tiles/s; best end to end {best_e2e['tiles_per_s']:.1f} tiles/s"
        )
        print(f"ratio end-to-end / bare: best {results['ratio_best_e2e_to_best_bare']:.2f}, "
              f"default layout (batch 64, {cores} dask x 1 torch) {results['ratio_default_e2e_to_best_bare']:.2f}  (target >= 0.8)")  # fmt: skip

        if not args.skip_rss:
            big = synthetic_tif(work / "big.tif", args.rss_px, args.rss_px)
            print(
                f"\n{args.rss_px} x {args.rss_px} GeoTIFF written ({big.stat().st_size / 2**30:.2f} GiB on disk); ingesting with a stand-in model ..."
            )
            for key, malloc in (("rss_system_malloc", "system"), ("rss", "keep")):  # glibc's settings, then ours
                env = {**os.environ, "AERIAL_SEARCH_MALLOC": malloc}
                out = subprocess.run([sys.executable, __file__, "--rss-child", str(big), str(work / "big.zarr")],
                                     capture_output=True, text=True, check=True, env=env)  # fmt: skip
                rss = json.loads(out.stdout.strip().splitlines()[-1])
                rss.update(image_px=args.rss_px, malloc=malloc)
                results[key] = rss
                print(
                    f"peak RSS {rss['peak_rss_gib']:.2f} GiB for {rss['windows']} windows in {rss['seconds']:.0f} s "
                    f"(target < 3 GiB), malloc {malloc}"
                )
    harness.write(args.out, results)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
