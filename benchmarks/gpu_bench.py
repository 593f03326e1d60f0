"""GPU throughput: bare model (fp32 / bf16, channels_last, batch sizes) and end-to-end ingest with
1, 4 and all-cores I/O threads feeding the one GPU (the GPU worker layout: reads overlap the
device, which takes one batch at a time), with the GPU's utilization sampled during each run.

Run by benchmarks/gpu_check.sh on a GPU machine; works on the CPU too (--device cpu --quick) so
that the script itself is checked where no GPU is. Writes a JSON report.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
from ingest import synthetic_tif  # benchmarks/ingest.py

from pipeline import Config, ingest
from pipeline.embed import ModelSpec, Runner


def bare(device: str, amp: str, channels_last: bool, batch: int, seconds: float, arch: str = "resnet18") -> float:
    """Tiles/s of the model on windows already on the device (no host transfer), steady state."""
    import torch

    run = Runner(ModelSpec(arch=arch, weights="random", device=device, amp=amp, channels_last=channels_last,
                           batch_size=batch))  # fmt: skip
    x = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=run.device)
    sync = torch.cuda.synchronize if run.on_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            run.forward(x)  # warm-up: cudnn autotuning, allocator
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run.forward(x)
            n += batch
        sync()
    return n / (time.perf_counter() - t0)


class GpuUtilization:
    """Samples ``nvidia-smi``'s GPU utilization every 200 ms while the block runs (NVML through
    the driver's own tool: nothing to install on the GPU machine)."""

    def __init__(self, device: str):
        self.device, self.samples, self.proc = device, [], None

    def __enter__(self) -> GpuUtilization:
        import shutil
        import subprocess

        if self.device.startswith("cuda") and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        s = sorted(self.samples)
        return {"mean": sum(s) / len(s), "median": s[len(s) // 2], "samples": len(s)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_report.json")
    ap.add_argument("--image-px", type=int, default=16384)
    ap.add_argument("--seconds", type=float, default=2.0, help="per bare-model configuration")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of this script)")
    args = ap.parse_args()
    import torch

    report: dict = {"device": args.device, "host": platform.node(), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True
    batches = (16,) if args.quick else (64, 128, 256, 512)
    amps = ("none",) if not args.device.startswith("cuda") else ("none", "bf16", "fp16")
    report["bare"] = []
    for amp in amps:
        for cl in (True, False):
            for b in batches:
                tps = bare(args.device, amp, cl, b, 0.5 if args.quick else args.seconds)
                report["bare"].append({"amp": amp, "channels_last": cl, "batch": b, "tiles_per_s": tps})
                print(f"bare  amp={amp:<4} channels_last={cl!s:<5} batch={b:<4} {tps:10.1f} tiles/s", flush=True)
    best = max(report["bare"], key=lambda r: r["tiles_per_s"])
    report["best_bare"] = best
    save = lambda: harness.write(args.out, report)  # noqa: E731
    save()  # after each section: a run cut short by a time limit still leaves its figures

    px = 1024 if args.quick else args.image_px
    cores = os.cpu_count() or 1
    layouts = sorted({1, min(4, cores), cores})  # I/O threads feeding the one device
    report["e2e"] = []
    with tempfile.TemporaryDirectory() as tmp:
        tif = synthetic_tif(Path(tmp) / "e2e.tif", px, px)
        for threads in layouts:
            cfg = Config().override(**{
                "model.weights": "random", "model.device": args.device, "model.amp": best["amp"],
                "model.channels_last": best["channels_last"], "model.batch_size": best["batch"],
                "store.dtype": "float16", "cluster.progress": False, "cluster.threads": threads,
            })  # fmt: skip
            ingest([tif], Path(tmp) / "warm.zarr", cfg, overwrite=True)  # model build and cudnn autotuning
            with GpuUtilization(args.device) as util:
                t = harness.timed(lambda: ingest([tif], Path(tmp) / "e2e.zarr", cfg, overwrite=True), repeat=1)
                rep, seconds = t.value, t.median
            row = {"io_threads": threads, "image_px": px, "tiles": rep.tiles, "seconds": seconds,
                   "tiles_per_s": rep.tiles / seconds, "over_best_bare": rep.tiles / seconds / best["tiles_per_s"],
                   "gpu_utilization_pct": util.summary(),
                   "settings": {"amp": best["amp"], "channels_last": best["channels_last"], "batch": best["batch"]}}  # fmt: skip
            report["e2e"].append(row)
            save()
            print(f"end to end {px} x {px}, {threads} I/O thread(s): {rep.tiles} tiles in {seconds:.1f} s = "
                  f"{row['tiles_per_s']:.1f} tiles/s ({row['over_best_bare']:.2f} x best bare {best['tiles_per_s']:.1f}; "
                  f"target >= 0.7), GPU utilization {row['gpu_utilization_pct']}", flush=True)  # fmt: skip
        # dense mode (ingest --mode dense): the same image and settings, all I/O threads, against
        # the exact run above; and the two stores' agreement (mean cosine of the same windows)
        cfg = cfg.override(**{"model.mode": "dense"})
        ingest([tif], Path(tmp) / "warm-dense.zarr", cfg, overwrite=True)
        with GpuUtilization(args.device) as util:
            t = harness.timed(lambda: ingest([tif], Path(tmp) / "dense.zarr", cfg, overwrite=True), repeat=1)
            rep, seconds = t.value, t.median
        from pipeline.store import open_store

        a, b = open_store(Path(tmp) / "e2e.zarr"), open_store(Path(tmp) / "dense.zarr")
        fa, fb = a["fingerprint"].values.astype("float32"), b["fingerprint"].values.astype("float32")
        ok = a["valid"].values & b["valid"].values
        cos = (fa[ok] * fb[ok]).sum(1) / (np.linalg.norm(fa[ok], axis=1) * np.linalg.norm(fb[ok], axis=1) + 1e-12)
        exact_tps = report["e2e"][-1]["tiles_per_s"]
        report["dense"] = {"image_px": px, "tiles": rep.tiles, "seconds": seconds, "tiles_per_s": rep.tiles / seconds,
                           "over_exact_e2e": rep.tiles / seconds / exact_tps, "cosine_to_exact_mean": float(cos.mean()),
                           "gpu_utilization_pct": util.summary()}  # fmt: skip
        print(f"dense end to end: {rep.tiles / seconds:.1f} tiles/s = {rep.tiles / seconds / exact_tps:.2f} x exact "
              f"(random weights; cosine to exact {cos.mean():.3f}), GPU utilization {util.summary()}", flush=True)  # fmt: skip
    report["e2e_over_best_bare"] = max(r["over_best_bare"] for r in report["e2e"])
    save()
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
