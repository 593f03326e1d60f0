"""Search on a GPU (issue 23): the engine's device path over synthetic search spaces built on the
device, against a plain torch reference and the CPU engine, in one run. Writes
benchmarks/gpu_search.json.

    python benchmarks/gpu_search.py                   # on a CUDA machine: 1e7 and 1e8 float16
                                                      # fingerprints, 1e8 and 1e9 binary codes, HTTP
    python benchmarks/gpu_search.py --device cpu --float16 20000 --codes 50000 --http 20000 \
        --cpu-n 10000 --out /tmp/gpu_search.json      # a smoke run of the same code on the CPU

No store holds the search spaces (1e8 x 512 float16 is 95 GiB, 1e9 codes of 512 bits 60 GiB; the
GPU machine's disk is 64 GiB): each is a :class:`pipeline.search.device.DeviceBlock` filled on the
device (ReLU'd Gaussian fingerprints like pooled CNN features, and random 512-bit codes), as
``SearchIndex.persist(device="cuda")`` holds a store's tiles on one GPU: one block. Sizes are
planned against the card's free memory first (:func:`plan`): one that does not fit (1e8 float16
rows, 98 GiB with their metadata, on an 80 GB H100) gets a ``skipped`` row naming the numbers,
and the kind is measured at the largest size that fits instead (``capped_from`` says which size
it stands in for); the issue's figures need a card that holds them all (an H200).

Contenders, per (kind, n, queries), each timed ``--repeat`` times after a warm-up, medians:

- **engine** (``path: "engine"``): the search graph of :func:`pipeline.search.graph.topk_graph`
  with ``on_device=True``, computed as ``SearchIndex`` computes it; ``ms`` runs from the query on
  the host (a NumPy array) to the results on the host (uids and exact values, sorted), with the
  query's upload, the scores, the top-k, the host-side exact re-score of the kept rows, the
  merge and the finalize inside.
- **reference** (``reference_ms``): plain torch, the fastest obvious code: float16 ``x @ q.T``
  plus the stored norms and ``torch.topk`` (codes: XOR, a byte-table popcount, ``torch.topk``)
  over row slices small enough that its intermediates fit (1e8 rows, fewer for many queries),
  then a ``torch.topk`` of the slices' winners, and the indices to the host.
- **cpu** (``cpu_n``, ``cpu_ms``): the NumPy engine (:mod:`pipeline.search.kernels`) over the
  first ``cpu_n`` rows, copied to host blocks of 2**17 rows, with every core of the machine.
- **http** (``path: "http"``): ``GET /api/search?uid=...&k=10`` on loopback to uvicorn serving
  the real app (:func:`pipeline.serve.app.create_app`) over a small real store (a GeoTIFF written
  here, ingested with the probe model), whose index is handed the synthetic device block with
  uids cycling through the store's tiles; ``ms`` is the p50 of ``--http-requests`` requests, each
  a different query tile (the fingerprint read from the store, the search, the JSON document).

Each engine row also says how far its top-k agrees with the reference's (``agree``: the fraction
of the reference's uids that the engine returned: the reference's float16 products may swap
near-ties, and among tied Hamming distances it keeps arbitrary rows where the engine keeps the
lowest uids) and, where the CPU engine scanned the same rows, whether their uids are equal
(``cpu_equal``). ``notes.kernels`` times the pieces of one float16 query (the products and the
top-k) for tuning, ``notes.popcount_kernels`` each popcount over the smallest codes size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

DIM = 512
CODE_BITS = 512
SLICE = 10**8  # the reference's rows per slice, divided by the number of queries beyond 1
PAIRS = 1 << 24  # (row, query) pairs per slice of the codes reference
REFERENCE_PAIRS = 15 * 10**8  # beyond this many (row, query) pairs the codes reference is not run (minutes)
CPU_BLOCK = 1 << 17


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def card(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({harness.machine()['cpu']})"


# --------------------------------------------------------------------------------------------
# Synthetic device blocks


def fingerprint_block(n: int, device: str, seed: int = 0) -> Any:
    """``n`` float16 ReLU'd Gaussian 512-d fingerprints, their float32 norms, uids 0..n-1, valid."""
    import torch

    from pipeline.search.device import DeviceBlock

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty((n, DIM), dtype=torch.float16, device=device)
    sq = torch.empty(n, dtype=torch.float32, device=device)
    step = 1 << 20
    for a in range(0, n, step):
        b = min(n, a + step)
        part = torch.randn((b - a, DIM), generator=g, device=device, dtype=torch.float32).clamp_(min=0)
        x[a:b] = part.half()
        sq[a:b] = x[a:b].float().square().sum(1)
    return DeviceBlock(device=device, uid=torch.arange(n, dtype=torch.int64, device=device), lon=_nan(n, device),
                       lat=_nan(n, device), valid=torch.ones(n, dtype=torch.bool, device=device), all_valid=True,
                       x=x, sqnorm=sq)  # fmt: skip


def code_block(n: int, device: str, seed: int = 1) -> Any:
    """``n`` random 512-bit binary codes as int32 words (the device layout), uids 0..n-1."""
    import torch

    from pipeline.search.device import DeviceBlock

    g = torch.Generator(device=device).manual_seed(seed)
    w = CODE_BITS // 32
    words = torch.empty((n, w), dtype=torch.int32, device=device)
    step = 1 << 24
    for a in range(0, n, step):
        b = min(n, a + step)
        words[a:b] = torch.randint(-(2**31), 2**31 - 1, (b - a, w), generator=g, device=device, dtype=torch.int32)
    return DeviceBlock(device=device, uid=torch.arange(n, dtype=torch.int64, device=device), lon=_nan(n, device),
                       lat=_nan(n, device), valid=torch.ones(n, dtype=torch.bool, device=device), all_valid=True,
                       words=words, code_bytes=CODE_BITS // 8)  # fmt: skip


def _nan(n: int, device: str) -> Any:
    import torch

    return torch.full((n,), float("nan"), dtype=torch.float64, device=device)


def head(block: Any, n: int) -> Any:
    """The first ``n`` rows of a block (views: no copy)."""
    import dataclasses

    cut = {f.name: getattr(block, f.name)[:n] for f in dataclasses.fields(block)
           if f.name in ("uid", "lon", "lat", "valid", "x", "sqnorm", "words") and getattr(block, f.name) is not None}
    return dataclasses.replace(block, **cut)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Contenders


def engine(blocks: list, scorer: Any, k: int, on_device: bool = True) -> list:
    """The search graph over ``blocks`` as ``SearchIndex`` computes it."""
    import dask

    from pipeline import resources
    from pipeline.cluster import local_get
    from pipeline.search import graph
    from pipeline.search.kernels import Exclusions, Filters

    g = graph.topk_graph(blocks, scorer, k, Filters(), Exclusions.none(), np.zeros(0), 8, None, on_device=on_device)
    # as SearchIndex computes: each running block's share of the cores for NumPy's BLAS (16 blocks
    # of 16 BLAS threads each on a 16-core GPU machine would make the CPU row 256 threads)
    with resources.blas_threads(resources.threads_per_task(resources.cpu_count(), len(blocks))):
        return dask.compute(g, scheduler=local_get())[0]


def delayed_blocks(blocks: list) -> list:
    import dask

    tag = os.urandom(4).hex()
    return [dask.delayed(b, name=f"bench-{tag}-{i}", traverse=False) for i, b in enumerate(blocks)]


def reference_l2(block: Any, q: np.ndarray, k: int) -> np.ndarray:
    """Plain torch: float16 products plus the norms, ``torch.topk`` per slice, then over the
    slices' winners; ``(m, k)`` row indices on the host."""
    import torch

    qh = torch.as_tensor(q, device=block.device).half()
    n, m = len(block), len(q)
    step = max(1, SLICE // m if m > 1 else SLICE)
    vals, idx = [], []
    for a in range(0, n, step):
        d = block.x[a : a + step] @ qh.T  # (rows, m) float16
        s = block.sqnorm[a : a + step, None] - 2 * d.float()
        v, i = torch.topk(s, min(k, len(s)), dim=0, largest=False)
        vals.append(v)
        idx.append(i + a)
    v, i = torch.topk(torch.cat(vals), k, dim=0, largest=False)
    return torch.gather(torch.cat(idx), 0, i).T.cpu().numpy()


def reference_hamming(block: Any, codes: np.ndarray, k: int) -> np.ndarray:
    """Plain torch: XOR, a byte-table popcount, ``torch.topk`` per slice, then over the winners."""
    import torch

    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32, device=block.device)
    qw = torch.as_tensor(np.ascontiguousarray(codes).view(np.int32), device=block.device)
    n, m = len(block), len(codes)
    step = max(1, PAIRS // m)  # (rows, m, 64) bytes of XORs per slice, ~600 bytes of temporaries each
    vals, idx = [], []
    for a in range(0, n, step):
        x = torch.bitwise_xor(block.words[a : a + step, None, :], qw[None])  # (rows, m, W)
        d = table[x.view(torch.uint8).int()].sum(-1)  # (rows, m)
        v, i = torch.topk(d.float(), min(k, len(d)), dim=0, largest=False)
        vals.append(v)
        idx.append(i + a)
    v, i = torch.topk(torch.cat(vals), k, dim=0, largest=False)
    return torch.gather(torch.cat(idx), 0, i).T.cpu().numpy()


def code_kernel_notes(block: Any, device: str, repeat: int) -> dict:
    """Milliseconds of the Hamming distances of one query over the whole block by each popcount
    (:mod:`pipeline.search.popcount`): the measurement that picks the default."""
    from pipeline.search import popcount

    q = block.words[:1].clone()
    out: dict[str, Any] = {"n": len(block)}
    for method in ("torch", "triton"):
        if popcount.available(method, device):
            out[f"{method}_ms"] = timed_ms(lambda: popcount.hamming(block.words, q, method), device, repeat)[0]
    out["gbytes_read"] = block.words.nelement() * 4 / 1e9
    harness.show(out)
    return out


def kernel_notes(block: Any, device: str, repeat: int) -> dict:
    """Milliseconds of the pieces of one float16 query over the whole block, for tuning: the
    engine's float32-accurate product (float16 rows times the query's two float16 halves, float32
    sums), the reference's float16 product, and ``torch.topk`` of one score per row."""
    import torch

    from pipeline.search import device as device_mod

    q = torch.rand((1, DIM), device=device)
    out = {"n": len(block)}
    out["engine_dots_ms"] = timed_ms(lambda: device_mod._dots(q, block.x), device, repeat)[0]
    out["float16_product_ms"] = timed_ms(lambda: block.x @ q.half().T, device, repeat)[0]
    s = torch.rand(len(block), device=device)
    out["topk_ms"] = timed_ms(lambda: torch.topk(s, 10, largest=False, sorted=False), device, repeat)[0]
    out["gbytes_read"] = block.x.nelement() * 2 / 1e9
    out["dots_gb_per_s"] = out["gbytes_read"] / out["engine_dots_ms"] * 1000
    harness.show(out)
    return out


def host_blocks(block: Any, n: int) -> list[dict]:
    """The first ``n`` rows as the NumPy engine's blocks."""
    out = []
    for a in range(0, n, CPU_BLOCK):
        b = min(n, a + CPU_BLOCK)
        part = {"uid": block.uid[a:b].cpu().numpy().view(np.uint64), "lon": block.lon[a:b].cpu().numpy(),
                "lat": block.lat[a:b].cpu().numpy(), "valid": np.ones(b - a, bool)}  # fmt: skip
        if block.x is not None:
            part["fingerprint"] = block.x[a:b].cpu().numpy()
            part["sqnorm"] = block.sqnorm[a:b].cpu().numpy()
        else:
            part["codes"] = np.ascontiguousarray(block.words[a:b].cpu().numpy()).view(np.uint8)
        out.append(part)
    return out


def timed_ms(fn: Any, device: str, repeat: int) -> tuple[float, Any]:
    """Median milliseconds of ``fn`` (one warm-up, then ``repeat`` runs) and its last value."""

    def run() -> Any:
        out = fn()
        sync(device)
        return out

    t = harness.timed(run, repeat=repeat, warmup=1)
    return t.median * 1000, t.value


def queries_for(kind: str, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "float16":
        return np.maximum(rng.standard_normal((m, DIM)), 0).astype(np.float16).astype(np.float32)
    return rng.integers(0, 256, (m, CODE_BITS // 8), dtype=np.uint8)


def scorer_for(kind: str, q: np.ndarray) -> Any:
    from pipeline.search.scorers import HammingScorer, L2Scorer

    return L2Scorer(q) if kind == "float16" else HammingScorer(q)


def measure(kind: str, block: Any, n: int, m: int, k: int, repeat: int, cpu_n: int, device: str) -> dict:
    """One engine row: engine, reference and CPU engine on the first ``n`` rows of ``block``."""
    sub = head(block, n)
    q = queries_for(kind, m, seed=n + m)
    blocks = delayed_blocks([sub])
    ms, res = timed_ms(lambda: engine(blocks, scorer_for(kind, q), k), device, repeat)
    row = {"kind": kind, "path": "engine", "n": n, "queries": m, "k": k, "ms": ms, "reference_ms": None,
           "device": card(device)}  # fmt: skip
    if kind == "float16" or n * m <= REFERENCE_PAIRS:
        ref = reference_l2 if kind == "float16" else reference_hamming
        ref_ms, ref_rows = timed_ms(lambda: ref(sub, q, k), device, repeat)
        # uids are rows here (uid = row): the reference's rows compare with the engine's uids
        agree = statistics.mean(len(set(r["uid"].tolist()) & set(ref_rows[j].tolist())) / k for j, r in enumerate(res))
        row |= {"reference_ms": ref_ms, "speed_vs_reference": ref_ms / ms, "agree": agree}
    else:
        row["reference_skipped"] = f"{n * m:.0e} (row, query) pairs: the byte-table reference would take minutes"
    if cpu_n:
        c = min(cpu_n, n)
        hb = delayed_blocks(host_blocks(sub, c))
        cpu = harness.timed(lambda: engine(hb, scorer_for(kind, q), k, on_device=False), repeat=3, warmup=1)
        row |= {"cpu_n": c, "cpu_ms": cpu.median * 1000, "cpu_cores": harness.machine()["cores"]}
        if c == n:
            row["cpu_equal"] = all(np.array_equal(a["uid"], b["uid"]) for a, b in zip(res, cpu.value))
    harness.show(row)
    return row


# --------------------------------------------------------------------------------------------
# The HTTP path


def small_store(work: Path) -> Path:
    """A real store: one textured 2,048 px GeoTIFF, ingested with the probe model."""
    import rasterio
    from affine import Affine

    from pipeline.cli import main

    tif, store = work / "scene.tif", work / "scene.zarr"
    if not store.exists():
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:2048, 0:2048].astype(np.float32)
        img = np.stack([127 + 60 * np.sin(yy * f) * np.cos(xx * g) + rng.normal(0, 25, yy.shape)
                        for f, g in rng.uniform(0.005, 0.05, (3, 2))]).clip(1, 255).astype(np.uint8)  # fmt: skip
        with rasterio.open(tif, "w", driver="GTiff", width=2048, height=2048, count=3, dtype="uint8",
                           crs="EPSG:32617", transform=Affine(0.1, 0, 400000, 0, -0.1, 3300000)) as f:  # fmt: skip
            f.write(img)
        if main(["ingest", str(tif), "--store", str(store), "--model", "probe", "--no-progress"]) != 0:
            raise RuntimeError("ingest of the HTTP benchmark's scene failed")
    return store


def serve_block(store: Path, block: Any, device: str) -> tuple[Any, np.ndarray]:
    """The store's service with its index holding ``block`` (uids, centres cycled from the store's
    tiles) on ``device``; the store's valid uids."""
    import dataclasses

    import torch

    from pipeline.serve import service as service_mod

    try:
        import rio_tiler  # noqa: F401
    except ImportError:  # the page's basemap (rio-tiler, pyproj: too big to carry to a GPU machine) is not measured

        class NoBasemap:
            def __init__(self, *args: Any) -> None:
                pass

        service_mod.Basemap = NoBasemap
    from pipeline.search import SearchIndex

    index = SearchIndex.open(str(store)).persist(device=device)
    ds = index.ds
    valid = ds["valid"].values.astype(bool)
    uids = ds["uid"].values[valid].astype(np.uint64)
    lon, lat = ds["lon"].values[valid], ds["lat"].values[valid]
    n = len(block)
    cyc = torch.arange(n, device=block.device) % len(uids)
    held = dataclasses.replace(block, uid=torch.as_tensor(uids.view(np.int64), device=block.device)[cyc],
                               lon=torch.as_tensor(lon, device=block.device)[cyc],
                               lat=torch.as_tensor(lat, device=block.device)[cyc])  # fmt: skip
    index._blocks = delayed_blocks([held])
    return service_mod.Service(index), uids


def http_row(store: Path, block: Any, n: int, requests: int, device: str) -> dict:
    import http.client

    import uvicorn

    from pipeline.serve.app import create_app

    service, uids = serve_block(store, head(block, n), device)
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    times, found = [], 0
    try:
        for i in range(requests + 2):  # two warm-ups
            t0 = time.perf_counter()
            conn.request("GET", f"/api/search?uid={uids[i % len(uids)]}&k=10")
            resp = conn.getresponse()
            body = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200:
                raise RuntimeError(f"/api/search answered {resp.status}: {body[:500]!r}")
            if i >= 2:
                times.append(dt)
                found += len(json.loads(body)["results"])
    finally:
        conn.close()
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
    row = {"kind": "float16", "path": "http", "n": n, "queries": 1, "k": 10, "ms": statistics.median(times) * 1000,
           "p90_ms": float(np.percentile(times, 90) * 1000), "requests": requests, "matches": found / requests,
           "device": card(device)}  # fmt: skip
    harness.show(row)
    return row


# --------------------------------------------------------------------------------------------
# Memory planning: a card smaller than the sizes asked for (an H100's 80 GB against 1e8 float16
# rows' 98 GiB) still measures each kind, at the largest size that fits


def per_row_bytes(kind: str) -> int:
    """Device bytes of one row of the synthetic block, as the engine's memory planning counts them."""
    from pipeline.search.device import bytes_per_tile

    return bytes_per_tile(DIM, "float16") if kind == "float16" else bytes_per_tile(0, None, CODE_BITS // 8)


def plan(kind: str, sizes: list[int], free: int, reserve: float, where: str) -> tuple[list[int], list[dict], dict]:
    """The sizes to measure for ``kind`` with ``free`` bytes on the device: those that fit after
    ``reserve`` of it (scores, selections, the HTTP rows' uid and centre copies), plus, when some do
    not, the largest that fits (two significant digits); a row for each size left out, naming the
    numbers; and which measured size stands in for which (``capped_from``)."""
    per = per_row_bytes(kind)
    cap = int(free * (1 - reserve)) // per
    fit = sorted(n for n in sizes if n <= cap)
    over = sorted(n for n in sizes if n > cap)
    skipped = [{"kind": kind, "n": n, "skipped": f"{n:,} rows x {per} B = {n * per / 2**30:.1f} GiB, but "
                f"{free / 2**30:.1f} GiB is free on {where} ({cap:,} rows fit after a {reserve:.0%} reserve)",
                "device": where} for n in over]  # fmt: skip
    stand_in: dict = {}
    if over and cap > 0:
        step = 10 ** max(0, len(str(cap)) - 2)
        largest = cap // step * step
        if largest not in fit:
            fit.append(largest)
            stand_in[largest] = over[0]
    return fit, skipped, stand_in


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--float16", type=float, nargs="*", default=[1e7, 1e8], help="fingerprint counts")
    ap.add_argument("--codes", type=float, nargs="*", default=[1e8, 1e9], help="binary code counts")
    ap.add_argument("--http", type=float, nargs="*", default=None,
                    help="device-held tiles behind the HTTP API (default: each --float16 size)")
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 100])
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cpu-n", type=float, default=2e6, help="rows the CPU engine scans (0: skip)")
    ap.add_argument("--http-requests", type=int, default=30)
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="plan for this much free device memory instead of what the device reports")
    ap.add_argument("--reserve", type=float, default=0.15,
                    help="fraction of the free memory kept for scores, selections and the HTTP rows' copies")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "aerial-search-gpu-search")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("gpu_search.json"))
    args = ap.parse_args()

    import torch

    from pipeline.search import device as device_mod
    from pipeline.search import popcount

    device = device_mod.resolve(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    notes = {"popcount": popcount.default_method(device), "card": card(device),
             "torch": torch.__version__, "mixed_precision_product": device_mod.mixed_precision(device)}  # fmt: skip
    if device.startswith("cuda"):
        notes["gpu_memory_gib"] = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    print(json.dumps(notes), flush=True)

    def save() -> None:
        harness.write(args.out, {"notes": notes, "rows": rows})

    def attempt(what: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:  # one size that does not fit must not lose the others' rows
            rows.append({"error": f"{what}: {type(e).__name__}: {e}"[:500], "device": card(device)})
            print(rows[-1], file=sys.stderr, flush=True)
            return None
        finally:
            save()

    http_sizes = [int(n) for n in (args.float16 if args.http is None else args.http)]
    for sizes, kind, build in ((args.float16, "float16", fingerprint_block), (args.codes, "codes", code_block)):
        if not sizes:
            continue
        free = int(args.memory_gib * 2**30) if args.memory_gib else device_mod.free_bytes(device)
        sizes, skipped, stand_in = plan(kind, sorted(int(n) for n in sizes), free, args.reserve, card(device))
        for r in skipped:
            rows.append(r)
            print(r, file=sys.stderr, flush=True)
        if not sizes:
            continue
        t0 = time.perf_counter()
        block = attempt(f"building {sizes[-1]:,} {kind} rows", lambda: build(sizes[-1], device))
        if block is None:
            continue
        sync(device)
        print(f"built {sizes[-1]:,} {kind} rows on {device} in {time.perf_counter() - t0:.1f} s "
              f"({block.nbytes / 2**30:.1f} GiB)", flush=True)  # fmt: skip
        if kind == "float16":
            notes["kernels"] = attempt("kernel timings", lambda: kernel_notes(block, device, args.repeat))
        else:
            notes["popcount_kernels"] = attempt("popcount timings", lambda: code_kernel_notes(head(block, sizes[0]),
                                                                                             device, args.repeat))  # fmt: skip
        for n in sizes:
            for m in args.queries:
                r = attempt(f"{kind} n={n} m={m}", lambda: measure(kind, block, n, m, args.k, args.repeat,
                                                                 int(args.cpu_n), device))  # fmt: skip
                if r:
                    rows.append(r | ({"capped_from": stand_in[n]} if n in stand_in else {}))
        if kind == "float16" and http_sizes:
            store = attempt("the HTTP scene's store", lambda: small_store(args.work))
            # a size beyond the block (the card holds fewer rows) is served at the block's size, once
            served = sorted({min(n, len(block)) for n in http_sizes})
            for n in served if store else ():
                capped = min((h for h in http_sizes if h > n), default=None) if n == len(block) else None
                r = attempt(f"http n={n}", lambda: http_row(store, block, n, args.http_requests, device))
                if r:
                    rows.append(r | ({"capped_from": capped} if capped else {}))
        block = None  # freed before the next kind is built
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    save()
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
