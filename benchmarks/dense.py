"""Dense against exact fingerprints: whole-process ingest speed and search agreement.

1. **Speed** (ResNet-18): `aerial-search ingest` of the images of `$AERIAL_SEARCH_DATA/aerial`
   that hold more than one window, each copied ``--copies`` times under another name (a few
   thousand windows; copies, as ingest recognises links to one file as one image), run as a new process per contender with the README's defaults plus
   ``--mode dense`` for dense, rounds alternating exact and dense so that machine noise hits
   both alike; medians of ``--rounds`` runs. ResNet-18 runs with random weights here
   (torchvision's ImageNet file cannot be downloaded on this machine): the same layers and
   FLOPs as the pretrained network.
2. **Agreement** (the shared ImageNet SqueezeNet 1.1): the whole aerial folder ingested in both
   modes; for 100 query tiles (seed 0) the top-10 of each store, each queried with its own
   fingerprint of the tile; the mean top-10 overlap and the mean cosine between the two modes'
   fingerprints of the same window.
3. **Stability of exact mode itself** (the yardstick for 2.): the same 100 queries against exact
   fingerprints of every window moved by ``s`` px (1, 4, 8, 16, 32; boundless reads, zeros past
   the image), computed with torchvision directly (checked equal to the exact store at 0 px),
   top-10 by a NumPy brute force with the store's overlap exclusion (checked to reproduce 2.):
   how much top-10 overlap survives a change that no user would notice.

4. **Quality on labels** (``mosaic``): the UC Merced scenes of exactly 256 x 256 px, 2,025 of
   them in a seeded shuffle, laid out 45 x 45 as one georeferenced GeoTIFF (11,520 px square;
   every scene has unrelated neighbours, dense mode's worst case), ingested exact and dense with
   the shared SqueezeNet and the default context; the 2,025 windows aligned to the scene grid
   carry their scene's label; each is a query against the 2,024 others (L2 on unit-length
   fingerprints, evaluate's ``l2``, and on the raw ones; the evaluation's mAP): dense against
   exact mAP.

    python benchmarks/dense.py                   # writes benchmarks/dense.json
    python benchmarks/dense.py --rounds 1 --copies 1
    python benchmarks/dense.py --mosaic-only     # section 4 alone, into dense.json beside the others
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import harness
import numpy as np


def data() -> Path:
    root = os.environ.get("AERIAL_SEARCH_DATA")
    if not root or not Path(root, "aerial").is_dir():
        raise SystemExit("set AERIAL_SEARCH_DATA to the shared data folder (holding aerial/)")
    return Path(root)


def linked_sources(work: Path, copies: int) -> tuple[Path, int]:
    import rasterio

    from pipeline import grid

    folder = work / "sources"
    folder.mkdir(parents=True, exist_ok=True)
    windows = 0
    for tif in sorted((data() / "aerial").glob("*.tif")):
        with rasterio.open(tif) as ds:
            w, h = ds.width, ds.height
        n = grid.windows_per_axis(w) * grid.windows_per_axis(h)
        if n < 2:  # a single window has no neighbour to share a feature map with
            continue
        for c in range(copies):
            copy = folder / f"{tif.stem}-{c}.tif"
            if not copy.exists():
                shutil.copyfile(tif, copy)
            windows += n
    return folder, windows


def ingest_process(sources: Path, store: Path, *extra: str) -> None:
    """The README's ingest as a new process (ResNet-18, random weights: the same FLOPs)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", str(sources), "--store", str(store), "--overwrite",
           "--model", "resnet18", "--weights", "random", "--no-progress", *extra]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def agreement(work: Path, weights: Path, queries: int = 100, k: int = 10) -> tuple[dict, dict]:
    from pipeline.config import Config
    from pipeline.derived import fit_store
    from pipeline.ingest import ingest

    stores = {}
    for mode in ("exact", "dense"):
        cfg = Config().override(**{"model.arch": "squeezenet1_1", "model.weights": str(weights),
                                   "model.mode": mode, "cluster.progress": False})  # fmt: skip
        stores[mode] = work / f"agree-{mode}.zarr"
        ingest([data() / "aerial"], stores[mode], cfg, overwrite=True)
    out = {}
    for method in ("none", "l2", "hellinger"):  # the stores' post-processing, fitted in both
        for p in stores.values():
            fit_store(str(p), method)
        out[method] = _agreement(stores, queries, k)
    return out, stores


def _agreement(stores: dict, queries: int, k: int) -> dict:
    from pipeline.search import SearchIndex

    idx = {m: SearchIndex.open(str(p)) for m, p in stores.items()}
    for i in idx.values():
        i.persist()
    ds = {m: i.ds for m, i in idx.items()}
    uid = ds["exact"]["uid"].values
    assert (uid == ds["dense"]["uid"].values).all()
    valid = ds["exact"]["valid"].values & ds["dense"]["valid"].values
    fe, fd = ds["exact"]["fingerprint"].values[valid], ds["dense"]["fingerprint"].values[valid]
    cos = (fe * fd).sum(1) / np.linalg.norm(fe, axis=1) / np.linalg.norm(fd, axis=1)
    picks = np.random.default_rng(0).choice(uid[valid], min(queries, int(valid.sum())), replace=False)
    tops = {}
    for m, i in idx.items():
        q, labels = i.queries_from_uids([int(u) for u in picks])
        res = i.search(q, k, labels=labels)
        tops[m] = [{int(u) for u in r.uid} for r in res]
    overlap = [len(a & b) / k for a, b in zip(tops["exact"], tops["dense"])]
    return {"tiles": int(valid.sum()), "queries": len(picks), "k": k, "top10_overlap_mean": float(np.mean(overlap)),
            "top10_overlap_min": float(np.min(overlap)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}  # fmt: skip


def stability(stores: dict, weights: Path, shifts=(1, 4, 8, 16, 32), queries: int = 100, k: int = 10) -> dict:
    import rasterio
    import torch
    import torchvision
    import xarray as xr
    from rasterio.windows import Window

    ds = {m: xr.open_zarr(str(p)) for m, p in stores.items()}
    valid = ds["exact"]["valid"].values & ds["dense"]["valid"].values
    fe, fd = (ds[m]["fingerprint"].values[valid].astype(np.float64) for m in ("exact", "dense"))
    img, row, col, uid = (ds["exact"][v].values[valid] for v in ("image", "row", "col", "uid"))
    paths = ds["exact"]["image_path"].values
    picks = np.random.default_rng(0).choice(uid, min(queries, len(uid)), replace=False)  # as _agreement
    qi = np.array([int(np.flatnonzero(uid == u)[0]) for u in picks])
    overlapping = (
        (img[qi, None] == img[None])
        & (np.abs(row[qi, None] - row[None]) < 256)
        & (np.abs(col[qi, None] - col[None]) < 256)
    )

    def top(f: np.ndarray) -> np.ndarray:
        d = ((f[qi, None, :] - f[None]) ** 2).sum(-1)
        d[overlapping] = np.inf  # search never returns the query's own or overlapping windows
        return np.argsort(d, axis=1)[:, :k]

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top(a), top(b))]))

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    net = torchvision.models.squeezenet1_1()
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))

    def exact_at(shift: int) -> np.ndarray:
        out = np.empty((len(uid), 512))
        readers = {i: rasterio.open(paths[i]) for i in np.unique(img)}
        for s in range(0, len(uid), 64):
            t = range(s, min(s + 64, len(uid)))
            px = np.stack([readers[img[j]].read((1, 2, 3), window=Window(int(col[j]) + shift, int(row[j]) + shift, 256, 256),
                                                boundless=True, fill_value=0) for j in t])  # fmt: skip
            with torch.inference_mode():
                x = (torch.from_numpy(px).float() / 255 - mean) / std
                out[s : s + len(t)] = net.features(x).mean((2, 3)).double().numpy()
        for r in readers.values():
            r.close()
        return out

    same = exact_at(0)
    res = {
        "check_exact_store_cosine_at_0px": cosine(fe, same),
        "check_dense_vs_exact_overlap": overlap(fe, fd),
        "shifts": [],
    }
    for shift in shifts:
        moved = exact_at(shift)
        res["shifts"].append({"px": shift, "top10_overlap_mean": overlap(fe, moved), "cosine_mean": cosine(fe, moved)})
        print(f"exact vs exact moved by {shift} px: top-10 overlap {res['shifts'][-1]['top10_overlap_mean']:.3f}, "
              f"cosine {res['shifts'][-1]['cosine_mean']:.3f}", flush=True)  # fmt: skip
    return res


def mosaic_quality(work: Path, weights: Path, side: int = 45, seed: int = 0) -> dict:
    """Section 4: exact and dense mAP on the labelled UC Merced mosaic."""
    import rasterio
    from affine import Affine
    from PIL import Image

    from pipeline.evaluate import list_dataset, retrieval_metrics
    from pipeline.store import open_store

    paths, labels, classes = list_dataset(data() / "ucmerced")
    sized = [i for i, p in enumerate(paths) if Image.open(p).size == (256, 256)]
    rng = np.random.default_rng(seed)
    pick = rng.permutation(sized)[: side * side]
    if len(pick) < side * side:
        raise SystemExit(f"only {len(pick)} UC Merced scenes of 256 x 256 px; {side * side} needed")
    tif = work / "mosaic.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=side * 256, height=side * 256, count=3, dtype="uint8",
                       crs="EPSG:32617", transform=Affine(0.3, 0, 400000, 0, -0.3, 3300000), tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate") as dst:  # fmt: skip
        for r in range(side):
            band = np.concatenate([np.asarray(Image.open(paths[pick[r * side + c]]).convert("RGB"))
                                   for c in range(side)], axis=1)  # fmt: skip
            dst.write(np.maximum(band, 1).transpose(2, 0, 1), window=rasterio.windows.Window(0, r * 256, side * 256, 256))
    scene = labels[pick].reshape(side, side)
    out: dict = {"scenes": int(side * side), "side": side, "seed": seed, "model": "squeezenet1_1 (ImageNet)"}
    for mode in ("exact", "dense"):
        store = work / f"mosaic-{mode}.zarr"
        ingest_process(tif, store, "--model", "squeezenet1_1", "--weights", str(weights), "--mode", mode)
        ds = open_store(store)
        row, col, valid = ds["row"].values, ds["col"].values, ds["valid"].values
        aligned = valid & (row % 256 == 0) & (col % 256 == 0)
        idx = np.flatnonzero(aligned)
        raw = ds["fingerprint"].values[idx].astype(np.float64)
        lab = scene[row[idx] // 256, col[idx] // 256]
        for post in ("l2", "raw"):  # evaluate's l2 (unit length), and the raw fingerprints
            x = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12) if post == "l2" else raw
            d = (x * x).sum(1)[:, None] - 2 * x @ x.T + (x * x).sum(1)[None, :]
            np.fill_diagonal(d, np.inf)
            order = np.argsort(d, axis=1, kind="stable")[:, :-1]
            m = retrieval_metrics(lab[order], lab)
            key = f"{mode}_mAP" if post == "l2" else f"{mode}_mAP_raw"
            out[key] = m["mAP"]
            print(f"mosaic {side} x {side}, {mode}, {post}: mAP {m['mAP']:.3f} over {len(idx)} aligned windows", flush=True)
        out[f"{mode}_queries"] = int(len(idx))
    out["dense_over_exact"] = out["dense_mAP"] / out["exact_mAP"]
    out["dense_over_exact_raw"] = out["dense_mAP_raw"] / out["exact_mAP_raw"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=3, help="copies of each multi-window aerial image (speed part)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", default=None, help="SqueezeNet 1.1 ImageNet file (default: ../weights of the data)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).with_name("dense.json")))
    ap.add_argument("--merge", help="update this JSON (an earlier run's) instead of starting afresh")
    ap.add_argument("--mosaic-only", action="store_true", help="only section 4, the labelled mosaic")
    args = ap.parse_args()
    weights = Path(args.weights) if args.weights else data().parent / "weights" / "squeezenet1_1-imagenet.pth"

    res: dict = json.loads(Path(args.merge).read_text()) if args.merge else {}
    res.pop("record", None)  # the merged run's record replaces it
    with tempfile.TemporaryDirectory(prefix="aerial-dense-") as tmp:
        work = Path(tmp)
        if args.mosaic_only:  # a partial re-run: the other sections keep the record they were measured with
            harness.update(args.out, "mosaic", mosaic_quality(work, weights))
            return
        res["mosaic"] = mosaic_quality(work, weights)
        if not args.skip_speed:
            sources, windows = linked_sources(work, args.copies)
            timing = harness.alternate({
                "exact": lambda: ingest_process(sources, work / "exact.zarr"),
                "dense": lambda: ingest_process(sources, work / "dense.zarr", "--mode", "dense"),
            }, args.rounds)  # fmt: skip
            times = {m: list(t.runs) for m, t in timing.items()}
            med = {m: t.median for m, t in timing.items()}
            res["speed"] = {"model": "resnet18 (random weights: same FLOPs)", "windows": windows, "runs": times,
                            "median_s": med, "exact_over_dense": med["exact"] / med["dense"],
                            "windows_per_s": {m: windows / s for m, s in med.items()}}  # fmt: skip
            print(f"\n{windows} windows, ResNet-18, whole process: exact {med['exact']:.1f} s "
                  f"({windows / med['exact']:.0f} w/s), dense {med['dense']:.1f} s ({windows / med['dense']:.0f} w/s): "
                  f"dense {med['exact'] / med['dense']:.2f}x faster (target >= 2.5)")  # fmt: skip
        by_method, stores = agreement(work, weights)
        res["agreement"] = by_method["none"]
        res["agreement_by_postprocess"] = by_method
        for method, a in by_method.items():
            print(f"SqueezeNet, post-processing {method}, {a['tiles']} aerial tiles, {a['queries']} queries: top-10 "
                  f"overlap dense/exact {a['top10_overlap_mean']:.3f} (target >= 0.8; min {a['top10_overlap_min']:.1f}), "
                  f"fingerprint cosine mean {a['cosine_mean']:.3f} (min {a['cosine_min']:.3f})")  # fmt: skip
        res["exact_stability"] = stability(stores, weights)
    harness.write(args.out, res)


if __name__ == "__main__":
    main()
