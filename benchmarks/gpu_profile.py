"""Where end-to-end GPU ingest time goes: the read ceiling (stand-in model, no GPU), the chunk
path alone (in-memory chunks through ``embed_chunks``, 1 and N threads) and the whole ingest
with per-stage timers (reads, fingerprint tasks, host pinning, uploads, device-lock waits,
forward passes, writes), plus variants that test one suspect each.

Run on a GPU machine by benchmarks/gpu_check.sh after gpu_bench.py (``--device cpu --quick``
checks the script here). Writes a JSON report, section by section.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import harness
import numpy as np
from ingest import synthetic_tif  # benchmarks/ingest.py

from pipeline import Config, embed, ingest, store, tiles
from pipeline.ingest import graph, staging


class Stages:
    """Seconds and calls per stage, summed over threads (thread-safe), by wrapping functions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.s: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.threads: set[int] = set()

    def add(self, name: str, dt: float) -> None:
        with self.lock:
            self.s[name][0] += dt
            self.s[name][1] += 1
            self.threads.add(threading.get_ident())

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(name, time.perf_counter() - t0)

        return timed

    def summary(self) -> dict:
        return {k: {"seconds": round(v[0], 3), "calls": v[1]} for k, v in sorted(self.s.items())}


@contextmanager
def instrumented(sync_cuda: bool):
    """Per-stage timers around the ingest's functions; restored afterwards."""
    import torch

    st = Stages()
    saved = [
        (graph, "read_task"), (graph, "fingerprint_task"), (graph, "write_task"), (tiles, "keep_windows"),
        (tiles, "embed_chunks"), (embed.Runner, "upload"), (embed.Runner, "forward"), (embed.Runner, "_forward"),
        (embed.Runner, "__init__"), (embed.Runner, "features"), (torch.Tensor, "pin_memory"),
        (staging, "stage_rows"), (staging, "load_partial"), (store, "write_fingerprints"),
    ]  # fmt: skip
    originals = [(obj, name, getattr(obj, name)) for obj, name in saved]
    for obj, name, fn in originals:
        setattr(obj, name, st.wrap(f"{getattr(obj, '__name__', obj)}.{name}", fn))
    try:
        yield st
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
        if sync_cuda:
            torch.cuda.synchronize()


class TakingTurns:
    """The layout before the device thread: every reading thread runs the model itself, taking
    turns under a per-device lock (a stand-in for :func:`pipeline.embed.device_thread`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def submit(self, fn, *args):
        """``fn`` is ``embed._run_on_device``: its own ``fn(*args)`` runs here, in the caller's
        thread, under the lock, as the old ``Runner.forward`` did."""
        from concurrent.futures import Future

        import torch

        assert fn is embed._run_on_device
        f: Future = Future()
        with self.lock, torch.inference_mode():
            f.set_result(args[0](*args[1:]))
        return f


@contextmanager
def taking_turns():
    real, turns = embed.device_thread, TakingTurns()
    embed.device_thread = lambda device: turns
    try:
        yield
    finally:
        embed.device_thread = real


def gen(args: tuple[str, int, int]) -> str:
    path, px, seed = args
    return str(synthetic_tif(Path(path), px, px, seed=seed))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_profile.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of this script)")
    ap.add_argument("--layouts", action="store_true", help="only: the device thread against threads taking turns, "
                    "cuDNN autotuning off (the product's default) and on")  # fmt: skip
    args = ap.parse_args()
    import torch

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
    cores = os.cpu_count() or 1
    report: dict = {"device": args.device, "cores": cores, "torch": torch.__version__}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name(0)
    save = lambda: harness.write(args.out, report)  # noqa: E731
    px = 1024 if args.quick else 8192
    many = sorted({1, min(4, cores), cores})
    model = {"model.weights": "random", "model.device": args.device, "model.batch_size": 16 if args.quick else 512,
             "store.dtype": "float16", "cluster.progress": False}  # fmt: skip
    if cuda:
        model.update({"model.amp": "fp16", "model.channels_last": True})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(4) as ex:  # four images of px^2 (a 16,384 px square's windows), in parallel
            tifs = [Path(p) for p in ex.map(gen, [(f"{tmp}/i{s}.tif", px, s) for s in range(4)])]
        report["images"] = {"count": 4, "px": px, "write_seconds": time.perf_counter() - t0}

        def run(name: str, over: dict, threads: int, stages: bool = True) -> dict:
            cfg = Config().override(**{**model, **over, "cluster.threads": threads})
            ingest(tifs, Path(tmp) / "warm.zarr", cfg, overwrite=True)
            once = lambda: ingest(tifs, Path(tmp) / "s.zarr", cfg, overwrite=True)  # noqa: E731
            if stages:
                with instrumented(cuda and over.get("model.device", args.device) != "cpu") as st:
                    t = harness.timed(once, repeat=1)
                stage = st.summary()
            else:
                t, stage = harness.timed(once, repeat=1), None
            rep, dt = t.value, t.median
            row = {"name": name, "threads": threads, "tiles": rep.tiles, "seconds": round(dt, 3),
                   "tiles_per_s": round(rep.tiles / dt, 1), "stages": stage}  # fmt: skip
            print(
                f"{name:<28} threads={threads:<3} {rep.tiles} tiles {dt:6.2f} s {rep.tiles / dt:9.1f} tiles/s",
                flush=True,
            )
            if stage:
                print("   ", {k: v["seconds"] for k, v in stage.items()}, flush=True)
            report.setdefault("runs", []).append(row)
            save()
            return row

        if args.layouts:
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                run(f"device thread, autotune={bench}", {}, cores)
                with taking_turns():
                    run(f"taking turns, autotune={bench}", {}, cores)
            torch.backends.cudnn.benchmark = False
            run("device thread, 4 threads", {}, min(4, cores))
            run("device thread, dense", {"model.mode": "dense"}, cores)
            save()
            print(f"written {args.out}")
            return
        # 1. the read ceiling: the stand-in model on the CPU, no GPU involved
        for th in many:
            run("standin-cpu", {"model.arch": "standin", "model.device": "cpu", "model.amp": "none"}, th, stages=False)
        # 2. the chunk path alone: in-memory chunks (a 2,048 px chunk + halo each) -> embed_chunks
        from pipeline.embed import ModelSpec

        spec = ModelSpec(weights="random", device=args.device, batch_size=model["model.batch_size"],
                         amp="fp16" if cuda else "none", channels_last=cuda)  # fmt: skip
        side = 640 if args.quick else 2176
        rng = np.random.default_rng(0)
        chunk = rng.integers(0, 256, (3, side, side), dtype=np.uint8)
        n = (side // 128 - 1) ** 2
        ij = np.stack(np.unravel_index(np.arange(n), (side // 128 - 1,) * 2), axis=1)
        embed.embed_chunks([(chunk, ij)], spec)  # warm-up
        for th in many:
            per = 4 if args.quick else 16
            with instrumented(cuda) as st:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(th) as ex:
                    list(ex.map(lambda _: embed.embed_chunks([(chunk, ij)], spec), range(per * 4)))
                dt = time.perf_counter() - t0
            row = {"name": "chunk-path", "threads": th, "tiles": n * per * 4, "seconds": round(dt, 3),
                   "tiles_per_s": round(n * per * 4 / dt, 1), "stages": st.summary()}  # fmt: skip
            print(f"chunk-path threads={th}: {row['tiles_per_s']} tiles/s", {k: v["seconds"] for k, v in row["stages"].items()}, flush=True)  # fmt: skip
            report.setdefault("runs", []).append(row)
            save()
        # 3. the whole ingest, with stage timers
        for th in many:
            run("e2e", {}, th)
        # 4. suspects, one at a time, with all threads
        run("e2e chunk_px=1024", {"read.chunk_px": 1024}, cores)
        real_upload = embed.Runner.upload

        def plain_upload(self, array):  # no pinning, no copy stream: a synchronous copy
            x = torch.from_numpy(np.ascontiguousarray(array))
            return x.to(self.device) if self.on_cuda else x

        embed.Runner.upload = plain_upload
        try:
            run("e2e unpinned upload", {}, cores)
        finally:
            embed.Runner.upload = real_upload
        run("e2e dense", {"model.mode": "dense"}, cores)
    save()
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
