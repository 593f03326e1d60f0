"""Feed rate: how many windows/s the readers deliver, with a stand-in model that costs nothing,
per format and per thread count, and the I/O threads one GPU needs to reach 15,000 tiles/s.

    python benchmarks/feed.py                     # writes benchmarks/feed.json

Formats (8,192 x 8,192 RGB, 3,969 windows each): deflate and LZW, tiled (512 px blocks) and
striped; JPEG-compressed (YCbCr, tiled); a COG (deflate, 512 px blocks); and the deflate-tiled
file and the COG again from object storage (a moto S3 server on 127.0.0.1, through GDAL's
/vsis3 as on real S3: a local Python server, so it measures request overhead, not a network).
Each figure is a whole ingest (headers to committed store; torch imported before the clock)
with ``--model standin`` on the threads scheduler with 1 and 2 threads, median of 3.

Threads per GPU for 15,000 tiles/s = ceil(15,000 / the per-thread rate at 2 threads): a linear
extrapolation from this 2-core machine (a guess for many cores; GDAL decodes without the GIL).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import harness
import numpy as np

TARGET = 15_000  # tiles/s of one H100 running the bare model (the target)

FORMATS = {
    "deflate tiled": dict(compress="deflate", predictor=2, tiled=True, blockxsize=512, blockysize=512),
    "deflate striped": dict(compress="deflate", predictor=2),
    "lzw tiled": dict(compress="lzw", predictor=2, tiled=True, blockxsize=512, blockysize=512),
    "lzw striped": dict(compress="lzw", predictor=2),
    "jpeg tiled": dict(
        compress="jpeg", photometric="ycbcr", jpeg_quality=90, tiled=True, blockxsize=512, blockysize=512
    ),
    "cog deflate": dict(driver="COG", compress="deflate", blocksize=512, overviews="none"),
}


def write(path: Path, px: int, profile: dict) -> Path:
    """A textured RGB image in ``profile``'s format, written block by block."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return path
    base = {"driver": "GTiff", "height": px, "width": px, "count": 3, "dtype": "uint8", "crs": "EPSG:32617",
            "transform": from_origin(400000, 3300000, 0.1, 0.1)}  # fmt: skip
    prof = {**base, **profile}
    target = path
    if prof["driver"] == "COG":  # COG is written by copying a finished GTiff
        target = path.with_suffix(".src.tif")
        prof = {**base, "tiled": True, "blockxsize": 512, "blockysize": 512}
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024].astype(np.float32)
    with rasterio.open(target, "w", **prof) as dst:
        for r in range(0, px, 1024):
            for c in range(0, px, 1024):
                f = rng.uniform(0.01, 0.06, 3)
                block = np.stack(
                    [127 + 80 * np.sin((yy + r) * f[b]) * np.cos((xx + c) * f[(b + 1) % 3]) for b in range(3)]
                )
                block = np.clip(block + rng.normal(0, 20, block.shape), 1, 255).astype(np.uint8)
                dst.write(block, window=Window(c, r, 1024, 1024))
    if target != path:
        from rasterio.shutil import copy

        copy(target, path, driver="COG", compress=profile["compress"], blocksize=512, overviews="NONE")
        target.unlink()
    return path


def feed(source: str, threads: int, work: Path, repeat: int) -> dict:
    from pipeline import Config

    cfg = Config().override(**{"model.arch": "standin", "cluster.threads": threads, "cluster.progress": False})
    t = harness.timed_ingest([source], work, f"feed-{threads}", cfg, repeat)
    windows = t.value.windows
    return {"threads": threads, "seconds": t.median, "windows": windows, "windows_per_s": windows / t.median,
            "runs_s": list(t.runs)}  # fmt: skip


def s3_server(files: dict[str, Path]):
    """A moto S3 server with ``files`` uploaded; sets the environment GDAL and boto read."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_S3_ENDPOINT": f"{host}:{port}", "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    })  # fmt: skip
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="feed")
    for key, path in files.items():
        client.upload_file(str(path), "feed", key)
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/aerial-search-feed")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).with_name("feed.json")))
    args = ap.parse_args()
    import torch  # noqa: F401  (imported before any clock starts)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, profile in FORMATS.items():
        print(f"writing {name} ...", flush=True)
        sources[name] = str(write(work / f"{name.replace(' ', '-')}.tif", args.px, profile))
    server = None
    if not args.skip_s3:
        server = s3_server(
            {"deflate-tiled.tif": Path(sources["deflate tiled"]), "cog.tif": Path(sources["cog deflate"])}
        )
        sources["deflate tiled, S3"] = "s3://feed/deflate-tiled.tif"
        sources["cog deflate, S3"] = "s3://feed/cog.tif"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in sources.items():
            row = {"format": name, "by_threads": [feed(source, t, Path(tmp), args.repeat) for t in (1, 2)]}
            per_thread = min(row["by_threads"][0]["windows_per_s"], row["by_threads"][1]["windows_per_s"] / 2)
            row["threads_for_15000"] = math.ceil(TARGET / per_thread)
            row["scaling_2_over_1"] = row["by_threads"][1]["windows_per_s"] / row["by_threads"][0]["windows_per_s"]
            rows.append(row)
            harness.show({"format": name, "threads_for_15000": row["threads_for_15000"]})
    if server is not None:
        server.stop()
    harness.write(args.out, {"rows": rows, "px": args.px, "target_tiles_per_s": TARGET})
    print(f"\n{'format':<20} {'1 thread w/s':>12} {'2 threads w/s':>13} {'2/1':>5} {'threads for 15k/GPU':>20}")
    for r in rows:
        a, b = r["by_threads"]
        print(f"{r['format']:<20} {a['windows_per_s']:>12,.0f} {b['windows_per_s']:>13,.0f} {r['scaling_2_over_1']:>5.2f} "
              f"{r['threads_for_15000']:>20}")  # fmt: skip


if __name__ == "__main__":
    main()
