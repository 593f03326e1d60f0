"""Decoding on the GPU (issue 24): whole ingests with the CPU decoders against ``--decoder device``,
beside the bare model's rate in the same run, and the fidelity of device-decoded fingerprints.
Writes benchmarks/gpu_ingest.json.

    python benchmarks/gpu_ingest.py --data .gpu-data       # on a CUDA machine (gpu_ingest_check.sh)
    AERIAL_SEARCH_DECODE_DEVICE=cpu python benchmarks/gpu_ingest.py --device cpu --data DIR \\
        --mosaic-px 1024 --chips 40 --quick --out /tmp/gpu_ingest.json     # a smoke run of the same code

``--data`` holds the imagery carried to the GPU machine (``prepare`` below copies it): the shared
JPEG-compressed GeoTIFFs (DroneDeploy chips, ``test_tiled.tif``) and a UC Merced subset (5 scenes
per class). From them the script builds, on the machine:

- ``jpeg-geotiff``: a mosaic of ``--mosaic-px`` squared pixels tiled with the carried images
  (real content), written as a tiled (512 px) JPEG YCbCr GeoTIFF, quality 90, by GDAL with every
  core; ``deflate-geotiff``: the same pixels deflated (predictor 2);
- ``jpeg-chips``: ``--chips`` JPEG files, links to the UC Merced subset's 256 px scenes, cycled.

Rows (``{"source", "decoder", "mode", "tiles", "seconds", "tiles_per_s",
"bare_fp16_tiles_per_s", "device"}``): each source with ``decoder`` cpu (``--decoder pillow``:
GDAL for the GeoTIFFs, Pillow for the chips) and device, exact mode, and dense mode for the
GeoTIFFs. ``seconds`` is the ingest call from planning to the last commit (process start
excluded), the median of ``--repeat`` runs after one warm-up ingest per configuration (model
build, cuDNN autotuning). Every ingest: ResNet-18 with random weights, fp16 autocast,
channels-last, the batch that the bare model ran fastest at, float16 store, all cores as I/O
threads. A device row of a source the device does not decode says why (``fallback``).

``fidelity``: device-decoded against CPU-decoded pixels and fingerprints (ImageNet SqueezeNet 1.1
when ``--weights`` is given, else ResNet-18 random weights): max and mean pixel difference of the
same regions, and mean and min cosine of the same windows' fingerprints, on each carried JPEG
GeoTIFF and on the UC Merced subset; against both CPU decoders (GDAL, whose 4:2:0 chroma
upsampling differs from libjpeg-turbo's, and libjpeg-turbo: the device path on the CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import harness
import numpy as np

DECODE_ENV = "AERIAL_SEARCH_DECODE_DEVICE"


def prepare(shared: Path, out: Path, per_class: int = 5) -> None:
    """Copy what a GPU run needs (~10 MB) from the shared data folder into ``out``: the JPEG
    GeoTIFFs, ``per_class`` UC Merced scenes per class, and the SqueezeNet 1.1 weights beside the
    data (``../weights``) when they are there."""
    from pipeline import decode

    weights = shared.parent / "weights" / "squeezenet1_1-imagenet.pth"
    if weights.is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(weights, out / weights.name)
    (out / "tifs").mkdir(parents=True, exist_ok=True)
    for p in sorted((shared / "aerial").glob("*.tif")):
        layout = decode.layout_of(str(p))
        if not isinstance(layout, str):
            shutil.copy(p, out / "tifs" / p.name)
    for cls in sorted(d for d in (shared / "ucmerced").iterdir() if d.is_dir()):
        dest = out / "ucmerced" / cls.name
        dest.mkdir(parents=True, exist_ok=True)
        for p in sorted(cls.iterdir())[:per_class]:
            shutil.copy(p, dest / p.name)


# --------------------------------------------------------------------------------------------
# Sources built on the machine


def images_of(data: Path) -> list[np.ndarray]:
    """The carried imagery as uint8 (3, h, w) arrays (GDAL's decode)."""
    import rasterio

    out = []
    for p in sorted((data / "tifs").glob("*.tif")) + sorted((data / "ucmerced").rglob("*.jpg")):
        with rasterio.open(p) as ds:
            out.append(ds.read([1, 2, 3]))
    return out


def mosaic(data: Path, px: int, path: Path, compress: str) -> Path:
    """A ``px`` x ``px`` GeoTIFF of the carried imagery repeated (real content), tiled 512."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return path
    pics = images_of(data)
    opts = {"compress": "JPEG", "photometric": "YCBCR", "jpeg_quality": 90} if compress == "jpeg" else \
        {"compress": "DEFLATE", "predictor": 2}  # fmt: skip
    profile = dict(driver="GTiff", height=px, width=px, count=3, dtype="uint8", crs="EPSG:32617",
                   transform=from_origin(400000, 3300000, 0.1, 0.1), tiled=True, blockxsize=512, blockysize=512,
                   num_threads="ALL_CPUS", **opts)  # fmt: skip
    band = 2048
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, px, band):
            h = min(band, px - r)
            row = np.zeros((3, h, px), np.uint8)
            c = 0
            while c < px:
                pic = pics[int(rng.integers(len(pics)))][:, :h]
                w = min(pic.shape[2], px - c)
                row[:, : pic.shape[1], c : c + w] = pic[:, :, :w]
                c += w
            row[row == 0] = 1  # no black: every window is kept in both decoders
            dst.write(row, window=Window(0, r, px, h))
    return path


def chips(data: Path, n: int, folder: Path) -> list[str]:
    """``n`` JPEG files: links to (copies of) the carried UC Merced scenes, cycled."""
    folder.mkdir(parents=True, exist_ok=True)
    srcs = sorted((data / "ucmerced").rglob("*.jpg"))
    out = []
    for k in range(n):
        dest = folder / f"chip{k:06d}.jpg"
        if not dest.exists():
            try:
                os.link(srcs[k % len(srcs)], dest)
            except OSError:
                shutil.copy(srcs[k % len(srcs)], dest)
        out.append(str(dest))
    return out


# --------------------------------------------------------------------------------------------
# Measurements


def bare_fp16(device: str, batch: int, seconds: float, arch: str = "resnet18") -> float:
    """Tiles/s of the model alone on windows already on the device (fp16 autocast on CUDA)."""
    from gpu_bench import bare  # benchmarks/gpu_bench.py

    return bare(device, "fp16" if device.startswith("cuda") else "none", True, batch, seconds, arch)


def config(device: str, decoder: str, mode: str, batch: int, weights: str = "random", arch: str = "resnet18") -> Any:
    from pipeline import Config

    return Config().override(**{
        "model.arch": arch, "model.weights": weights, "model.device": device, "model.batch_size": batch,
        "model.amp": "fp16" if device.startswith("cuda") else "none", "model.channels_last": True,
        "model.mode": mode, "read.decoder": decoder, "store.dtype": "float16", "cluster.progress": False,
    })  # fmt: skip


def run_row(source: str, sources: list[str], decoder: str, mode: str, args: Any, bare: float, work: Path) -> dict:
    import warnings

    from pipeline import decode, ingest

    cfg = config(args.device, "device" if decoder == "device" else "pillow", mode, args.batch, arch=args.arch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ingest(sources, work / "warm.zarr", cfg, overwrite=True)
    fallback = sorted({str(w.message) for w in seen if "decoded on the CPU instead" in str(w.message)})
    t = harness.timed_ingest(sources, work, f"{source}-{decoder}-{mode}", cfg, repeat=args.repeat)
    rep = t.value
    row = {"source": source, "decoder": decoder, "mode": mode, "tiles": rep.tiles, "seconds": t.median,
           "tiles_per_s": rep.tiles / t.median, "bare_fp16_tiles_per_s": bare,
           "over_bare": rep.tiles / t.median / bare, "runs_s": list(t.runs), "device": args.card}  # fmt: skip
    if decoder == "device":
        t0 = sources[0]
        why = decode.support(t0, (1, 2, 3), None, False, 3, "uint8")
        row["decoded_on_device"] = why is None
        if fallback or why:
            row["fallback"] = fallback or [why]
    harness.show(row)
    for p in work.glob(f"{source}-*.zarr"):
        shutil.rmtree(p, ignore_errors=True)
    return row


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def fidelity(data: Path, args: Any, work: Path) -> dict:
    """Device-decoded against CPU-decoded pixels and fingerprints, per carried source set."""
    from pipeline import decode, ingest
    from pipeline.raster import RasterReader
    from pipeline.store import open_store

    weights, arch = (args.weights, "squeezenet1_1") if args.weights else ("random", args.arch)
    tifs = sorted((data / "tifs").glob("*.tif"))[: 1 if args.quick else None]
    sets = {p.name: [str(p)] for p in tifs}
    sets["ucmerced-subset"] = sorted(str(p) for p in (data / "ucmerced").rglob("*.jpg"))[: 8 if args.quick else None]
    out: dict[str, Any] = {"weights": weights, "arch": arch}
    for name, paths in sets.items():
        stores = {}
        for decoder, env in (("device", None), ("gdal", None), ("libjpeg-turbo", "cpu")):
            cfg = config(args.device, "device" if decoder != "gdal" else "gdal", "exact", 64, weights, arch)
            before = os.environ.get(DECODE_ENV)
            if env:
                os.environ[DECODE_ENV] = env
            try:
                stores[decoder] = ingest(paths, work / f"fid-{decoder}.zarr", cfg, overwrite=True).store
            finally:
                if before is None:
                    os.environ.pop(DECODE_ENV, None)
                else:
                    os.environ[DECODE_ENV] = before
        fp = {k: open_store(s)["fingerprint"].values for k, s in stores.items()}
        ok = open_store(stores["gdal"])["valid"].values
        row: dict[str, Any] = {"tiles": int(ok.sum())}
        for cpu in ("gdal", "libjpeg-turbo"):
            c = cosines(fp["device"][ok], fp[cpu][ok])
            row[f"cosine_vs_{cpu}"] = {"mean": float(c.mean()), "min": float(c.min())}
        # pixels: the first region of each file through both paths
        diffs = []
        for p in paths[:20]:
            import rasterio

            with rasterio.open(p) as ds:
                h, w = min(ds.height, 1024) // 256 * 256, min(ds.width, 1024) // 256 * 256
            if not h or not w:
                continue
            dev = decode.as_numpy(decode.read_regions([decode.Request(p, (0, h), (0, w))], decode.decode_device())[0])
            cpu = RasterReader(p, decoder="gdal").read((0, h), (0, w))
            turbo = decode.as_numpy(decode.read_regions([decode.Request(p, (0, h), (0, w))], "cpu")[0])
            diffs.append((np.abs(dev[:3].astype(int) - cpu[:3]), np.abs(dev[:3].astype(int) - turbo[:3])))
        if diffs:
            row["pixels_vs_gdal"] = {"max": int(max(d[0].max() for d in diffs)),
                                     "mean": float(np.mean([d[0].mean() for d in diffs]))}  # fmt: skip
            row["pixels_vs_libjpeg_turbo"] = {"max": int(max(d[1].max() for d in diffs)),
                                              "mean": float(np.mean([d[1].mean() for d in diffs]))}  # fmt: skip
        out[name] = row
        harness.show({"fidelity": name, **{k: v for k, v in row.items()}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", type=Path, default=Path(".gpu-data"), help="the carried imagery (see --prepare)")
    ap.add_argument("--prepare", type=Path, help="copy the imagery from this shared data folder into --data, then stop")
    ap.add_argument("--mosaic-px", type=int, default=24576)
    ap.add_argument("--chips", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--weights", default="", help="ImageNet SqueezeNet 1.1 weights for the fidelity section")
    ap.add_argument("--seconds", type=float, default=3.0, help="of the bare model's timing")
    ap.add_argument("--arch", default="resnet18", help="the model (probe: a smoke run's cheap CNN)")
    ap.add_argument("--quick", action="store_true", help="fidelity on one GeoTIFF and 8 scenes (a smoke run)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "aerial-search-gpu-ingest")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("gpu_ingest.json"))
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare, args.data)
        print(f"copied the imagery into {args.data}")
        return
    import torch

    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        args.card = torch.cuda.get_device_name(0)
    else:
        args.card = f"cpu ({harness.machine()['cpu']})"
    args.work.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"rows": [], "notes": {"card": args.card, "torch": torch.__version__}}

    def save() -> None:
        harness.write(args.out, doc)

    def attempt(what: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:  # one failing configuration must not lose the others' rows
            doc["rows"].append({"error": f"{what}: {type(e).__name__}: {e}"[:600], "device": args.card})
            print(doc["rows"][-1], flush=True)
            return None
        finally:
            save()

    bare = bare_fp16(args.device, args.batch, args.seconds, args.arch)
    doc["notes"]["bare_fp16_tiles_per_s"] = bare
    print(f"bare model fp16: {bare:.0f} tiles/s (batch {args.batch})", flush=True)
    jpeg = attempt("jpeg mosaic", lambda: mosaic(args.data, args.mosaic_px, args.work / f"jpeg-{args.mosaic_px}.tif", "jpeg"))
    deflate = attempt("deflate mosaic", lambda: mosaic(args.data, args.mosaic_px, args.work / f"deflate-{args.mosaic_px}.tif",
                                                       "deflate"))  # fmt: skip
    chip_paths = attempt("chips", lambda: chips(args.data, args.chips, args.work / "chips"))
    plan = [("jpeg-geotiff", jpeg, m) for m in ("exact", "dense")] + \
           [("deflate-geotiff", deflate, m) for m in ("exact", "dense")] + [("jpeg-chips", chip_paths, "exact")]  # fmt: skip
    for source, src, mode in plan:
        if not src:
            continue
        sources = src if isinstance(src, list) else [str(src)]
        for decoder in ("cpu", "device"):
            row = attempt(f"{source} {decoder} {mode}", lambda: run_row(source, sources, decoder, mode, args, bare, args.work))
            if row:
                doc["rows"].append(row)
    doc["fidelity"] = attempt("fidelity", lambda: fidelity(args.data, args, args.work))
    save()
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
