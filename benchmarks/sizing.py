"""Sizing model: what an archive of N bytes costs to ingest, store and search.

Every figure is computed from a formula on the inputs below; inputs are either MEASURED (read
from this folder's JSON results, which benchmarks/RESULTS.md describes) or marked GUESS (no
measurement exists yet). GPU figures come from one H100 with 16 cores (gpu_layouts.json).
docs/scaling.md holds this script's output for 1 PB and explains each line.

    python benchmarks/sizing.py                         # 1 PB of 8-bit RGB (24 bits per pixel)
    python benchmarks/sizing.py --bytes 2e13 --bpp 8    # 20 TB of 8-bit compressed imagery (~3:1)
    python benchmarks/sizing.py --latency 0.5 --node-cores 64 --node-gib 512
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
STRIDE = 128
META_BYTES = 8 + 3 * 4 + 4 * 8 + 1  # uid, image/row/col, x/y/lon/lat, valid per tile


def load(name: str) -> dict:
    p = HERE / name
    return json.loads(p.read_text()) if p.is_file() else {}


def measured() -> dict[str, tuple[float, str]]:
    """Input figures: value and source ('MEASURED: file' or 'GUESS: why')."""
    f: dict[str, tuple[float, str]] = {}
    ingest = load("ingest.json")
    if ingest:
        best = max(r["tiles_per_s"] for r in ingest["e2e"])
        f["cpu_tiles_per_s"] = (
            best / ingest["cores"],
            f"MEASURED: ingest.json, exact ResNet-18 per core ({ingest['cores']} cores)",
        )
    dense = load("dense.json")
    if "speed" in dense:
        f["dense_speedup"] = (dense["speed"]["exact_over_dense"], "MEASURED: dense.json, whole-process ingest, CPU")
    else:
        f["dense_speedup"] = (3.0, "GUESS: FLOP ratio of dense to exact at 2,048 px chunks")
    gpu = {r["name"]: r for r in load("gpu_layouts.json").get("runs", [])}
    exact_gpu, dense_gpu = gpu.get("device thread, autotune=False"), gpu.get("device thread, dense")
    if exact_gpu:
        f["gpu_tiles_per_s"] = (
            exact_gpu["tiles_per_s"],
            "MEASURED: gpu_layouts.json, end-to-end exact ingest on one H100 fed by 16 cores (decode-bound)",
        )
    else:
        f["gpu_tiles_per_s"] = (15_000 * 0.7, "GUESS: an H100 bf16 target (15,000/s) x a 0.7 end-to-end target")
    if exact_gpu and dense_gpu:
        f["gpu_dense_speedup"] = (
            dense_gpu["tiles_per_s"] / exact_gpu["tiles_per_s"],
            "MEASURED: gpu_layouts.json, dense / exact end to end on the same H100 (both decode-bound)",
        )
    # the latest measurement of each figure first (RESULTS.md says what changed between them)
    name, search = next(((n, load(n)) for n in ("search_threads.json", "search.json") if load(n)), ("", {}))
    rows = [r for r in search.get("rows", []) if r["n"] == 1_000_000 and r["k"] == 10 and r["queries"] == 1]
    if rows:
        s = rows[0]["project_memory_s"]
        cores = search.get("threads", 2)
        f["exact_s_per_tile_core"] = (s * cores / 1e6, f"MEASURED: {name}, 1M float32 in memory, k=10")
    f16 = [r for r in load("search_float16.json").get("rows", []) if r["n"] >= 1_000_000 and r["queries"] == 1]
    big = [r for r in load("search_10m.json").get("rows", []) if r.get("project_memory_s")]
    if f16:  # the latest: the float16 scan stepped through cache (search.py --against ... --dtype float16)
        r = f16[0]
        f["exact16_s_per_tile_core"] = (
            r["new_ms"] / 1e3 * 2 / r["n"],
            f"MEASURED: search_float16.json, {r['n']:.0e} float16 in memory (2 cores)",
        )
    elif big:
        r = big[0]
        f["exact16_s_per_tile_core"] = (
            r["project_memory_s"] * 2 / r["n"],
            "MEASURED: search_10m.json, 10M float16 in memory (2 cores)",
        )
    f["linear_in_cores"] = (1.0, "GUESS: scan time per tile scales as 1 / cores beyond the 2 measured")
    codes = load("codes.json")
    scan_name = next((n for n in ("codes_scan.json", "codes.json") if "codes_100m" in load(n)), "")
    if scan_name:
        c = load(scan_name)["codes_100m"]
        f["codes_s_per_tile_core"] = (
            c["median_s"]["engine"] * c["threads"] / c["codes"],
            f"MEASURED: {scan_name}, engine's 100M scan",
        )
        f["faiss_codes_s_per_tile_core"] = (
            c["median_s"]["faiss"] * c["threads"] / c["codes"],
            f"MEASURED: {scan_name}, faiss IndexBinaryFlat",
        )
    if "synthetic" in codes:
        f["rerank_candidates"] = (codes["synthetic"]["candidates"], "default R = max(10 k, 100), k = 10")
    if "ucmerced" in codes:
        f["codes_recall"] = (
            codes["ucmerced"]["recall_at_10"],
            "MEASURED: codes.json, UC Merced recall@10 at default R",
        )
    f.update(gpu_search(load("gpu_search.json")))
    f["lz4_ratio"] = (1.14, "MEASURED: store.py docstring, float32 fingerprints with blosc-lz4 byte shuffle")
    f["chunk_tiles"] = (8192, "the default store.chunk_tiles")
    f["source_tile_px"] = (512, "GUESS: internal tile side of the source COGs")
    return f


# H200 figures for when no GPU search has been measured yet: memory (GiB usable by torch) and
# bandwidth (bytes/s); a scan at full bandwidth is the best any GPU search can do
H200_GIB, H200_BYTES_PER_S = 139.0, 4.8e12


def gpu_search(doc: dict) -> dict[str, tuple[float, str]]:
    """Seconds per tile of one query on one GPU (float16 fingerprints, 512-bit codes) and the
    GPU's memory: from the largest single-query engine row of gpu_search.json, else guessed from
    an H200's bandwidth."""
    from pipeline.search.device import bytes_per_tile

    f: dict[str, tuple[float, str]] = {}
    rows = [r for r in doc.get("rows", []) if r.get("path") == "engine" and r.get("queries") == 1]
    card = doc.get("notes", {}).get("card", "a GPU")
    for kind, key, per_tile in (("float16", "gpu_float16_s_per_tile", bytes_per_tile(512, "float16")),
                                ("codes", "gpu_codes_s_per_tile", bytes_per_tile(0, None, 64))):  # fmt: skip
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            r = max(mine, key=lambda r: r["n"])
            f[key] = (r["ms"] / 1000 / r["n"], f"MEASURED: gpu_search.json, one query over {r['n']:.0e} {kind} on {card}")
        else:
            f[key] = (per_tile / H200_BYTES_PER_S,
                      f"GUESS: {per_tile} device bytes per tile at an H200's 4.8 TB/s (gpu_search.py not yet run)")  # fmt: skip
    gib = doc.get("notes", {}).get("gpu_memory_gib")
    f["gpu_memory_gib"] = (gib, f"MEASURED: gpu_search.json, {card}") if gib else (H200_GIB, "GUESS: an H200")
    return f


def human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if abs(b) < 1000:
            return f"{b:.3g} {unit}"
        b /= 1000
    return f"{b:.3g} ZB"


def model(
    nbytes: float, bpp: float, latency: float, node_cores: int, node_gib: float, f: dict
) -> list[tuple[str, str, str]]:
    v = {k: x[0] for k, x in f.items()}
    out: list[tuple[str, str, str]] = []

    def line(what: str, value: str, how: str) -> None:
        out.append((what, value, how))

    pixels = nbytes * 8 / bpp
    windows = pixels / STRIDE**2
    line("pixels", f"{pixels:.3g}", f"bytes x 8 / {bpp:g} bits per pixel")
    line(
        "windows (256 px, stride 128)",
        f"{windows:.3g}",
        "pixels / 128^2 (each window owns one 128 px cell; edges ignored)",
    )
    for name, per in (("float32", 2048 / v["lz4_ratio"]), ("float16", 1024), ("512-bit codes", 64)):
        line(
            f"store: {name}",
            human(windows * (per + META_BYTES)),
            f"windows x ({per:.0f} + {META_BYTES} metadata) bytes",
        )
    if "cpu_tiles_per_s" in v:
        line(
            "ingest, CPU core-hours (exact)",
            f"{windows / v['cpu_tiles_per_s'] / 3600:.3g}",
            "windows / measured tiles/s per core",
        )
    gpu_h = windows / v["gpu_tiles_per_s"] / 3600
    guessed = f["gpu_tiles_per_s"][1].startswith("GUESS")
    line(
        "ingest, GPU-hours (exact)", f"{gpu_h:.3g}", f"windows / {'GUESSED' if guessed else 'measured'} tiles/s per GPU"
    )
    if "gpu_dense_speedup" in v:
        line("ingest, GPU-hours (dense)", f"{gpu_h / v['gpu_dense_speedup']:.3g}",
             "exact / dense speed-up measured on the GPU (decode-bound: more cores per GPU would widen it "
             "towards the CPU's model-bound ratio)")  # fmt: skip
    else:
        line(
            "ingest, GPU-hours (dense)",
            f"{gpu_h / v['dense_speedup']:.3g}",
            "exact / dense speed-up (CPU-measured ratio)",
        )
    for label, key, per_tile in (
        ("float32", "exact_s_per_tile_core", 2048),
        ("float16", "exact16_s_per_tile_core", 1024),
    ):
        if key not in v:
            continue
        per_node = latency * node_cores / v[key]  # tiles one node scans within the latency
        mem_node = node_gib * 2**30 * 0.8 / (per_tile + META_BYTES)  # held in memory, 80 % of RAM
        bound = "CPU" if per_node < mem_node else "memory"
        line(f"search exact ({label} in memory), nodes for {latency:g} s", f"{math.ceil(windows / min(per_node, mem_node)):,}",
             f"windows / min(tiles {node_cores} cores scan in {latency:g} s: {per_node:.3g}, tiles in 80 % of "
             f"{node_gib:g} GiB: {mem_node:.3g}); {bound}-bound")  # fmt: skip
    if "codes_s_per_tile_core" in v:
        for who, key in (("engine", "codes_s_per_tile_core"), ("faiss", "faiss_codes_s_per_tile_core")):
            per_node = latency * node_cores / v[key]
            mem_node = node_gib * 2**30 * 0.8 / (64 + META_BYTES)
            tiles_node = min(per_node, mem_node)
            line(f"search codes ({who} scan), nodes for {latency:g} s", f"{math.ceil(windows / tiles_node):,}",
                 f"as above with 64-byte codes + metadata in memory (CPU: {per_node:.3g}, memory: {mem_node:.3g}; "
                 f"{'CPU' if per_node < mem_node else 'memory'}-bound); re-ranking reads R = "
                 f"{v.get('rerank_candidates', 100):.0f} float rows per query from the store")  # fmt: skip
    from pipeline.search.device import bytes_per_tile

    for label, key, per_tile in (("float16", "gpu_float16_s_per_tile", bytes_per_tile(512, "float16")),
                                 ("512-bit codes", "gpu_codes_s_per_tile", bytes_per_tile(0, None, 64))):  # fmt: skip
        per_gpu = latency / v[key]  # tiles one GPU scans within the latency
        mem_gpu = v["gpu_memory_gib"] * 2**30 * 0.9 / per_tile  # held on the device, 90 % of its memory
        bound = "scan" if per_gpu < mem_gpu else "memory"
        line(f"search on GPUs ({label} on the device), GPUs for {latency:g} s", f"{math.ceil(windows / min(per_gpu, mem_gpu)):,}",
             f"windows / min(tiles one GPU scans in {latency:g} s: {per_gpu:.3g}, tiles in 90 % of "
             f"{v['gpu_memory_gib']:.0f} GiB at {per_tile} bytes each: {mem_gpu:.3g}); {bound}-bound")  # fmt: skip
    chunks = windows / v["chunk_tiles"]
    line(
        "object storage: store chunks written",
        f"{chunks * 3:.3g}",
        "fingerprint + valid + tile metadata chunks per 8,192 tiles (PUTs)",
    )
    line(
        "object storage: source reads (GETs)",
        f"{pixels / v['source_tile_px'] ** 2:.3g}",
        "one request per source tile (GUESS: 512 px COG tiles)",
    )
    line(
        "object storage: chunk reads per exact search from the store",
        f"{chunks:.3g}",
        "every fingerprint chunk (no index in memory)",
    )
    line("object storage: chunk reads per codes search, re-rank from the store", f"<= {v.get('rerank_candidates', 100):.0f}",
         "one chunk per candidate at worst (candidates spread over the archive)")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=float, default=1e15, help="archive size in bytes (default 1 PB)")
    ap.add_argument("--bpp", type=float, default=24, help="bits per pixel as stored (24: uncompressed 8-bit RGB)")
    ap.add_argument("--latency", type=float, default=1.0, help="target seconds per query")
    ap.add_argument("--node-cores", type=int, default=64)
    ap.add_argument("--node-gib", type=float, default=512)
    args = ap.parse_args()
    f = measured()
    print(f"# Sizing for {human(args.bytes)} at {args.bpp:g} bits per pixel; search nodes of {args.node_cores} cores, "
          f"{args.node_gib:g} GiB; target {args.latency:g} s per query\n")  # fmt: skip
    print("## Inputs\n\n| input | value | source |\n|---|---|---|")
    for k, (val, src) in f.items():
        print(f"| {k} | {val:.4g} | {src} |")
    print("\n## Model\n\n| quantity | value | formula |\n|---|---|---|")
    for what, value, how in model(args.bytes, args.bpp, args.latency, args.node_cores, args.node_gib, f):
        print(f"| {what} | {value} | {how} |")


if __name__ == "__main__":
    main()
