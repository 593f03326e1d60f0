"""GPU throughput: bare model (fp32 / bf16, channels_last, batch sizes) and end-to-end ingest.

Run by benchmarks/gpu_check.sh on a GPU machine; works on the CPU too (--device cpu --quick) so
that the script itself is checked where no GPU is. Writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import synthetic_tif  # noqa: E402  (benchmarks/ingest.py)

from pipeline import Config, ingest  # noqa: E402
from pipeline.embed import ModelSpec, Runner  # noqa: E402


def bare(device: str, amp: str, channels_last: bool, batch: int, seconds: float) -> float:
    """Tiles/s of the model on windows already on the device (no host transfer), steady state."""
    import torch

    run = Runner(ModelSpec(weights="random", device=device, amp=amp, channels_last=channels_last, batch_size=batch))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_report.json")
    ap.add_argument("--image-px", type=int, default=16384)
    ap.add_argument("--seconds", type=float, default=3.0, help="per bare-model configuration")
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

    px = 1024 if args.quick else args.image_px
    with tempfile.TemporaryDirectory() as tmp:
        tif = synthetic_tif(Path(tmp) / "e2e.tif", px, px)
        cfg = Config().override(**{
            "model.weights": "random", "model.device": args.device, "model.amp": best["amp"],
            "model.channels_last": best["channels_last"], "model.batch_size": best["batch"],
            "store.dtype": "float16", "cluster.progress": False,
        })  # fmt: skip
        ingest([tif], Path(tmp) / "warm.zarr", cfg)  # model build and cudnn autotuning
        t0 = time.perf_counter()
        rep = ingest([tif], Path(tmp) / "e2e.zarr", cfg)
        seconds = time.perf_counter() - t0
    report["e2e"] = {"image_px": px, "tiles": rep.tiles, "seconds": seconds, "tiles_per_s": rep.tiles / seconds,
                     "settings": {"amp": best["amp"], "channels_last": best["channels_last"], "batch": best["batch"]}}  # fmt: skip
    report["e2e_over_best_bare"] = report["e2e"]["tiles_per_s"] / best["tiles_per_s"]
    print(f"end to end {px} x {px}: {rep.tiles} tiles in {seconds:.1f} s = {rep.tiles / seconds:.1f} tiles/s "
          f"({report['e2e_over_best_bare']:.2f} x best bare {best['tiles_per_s']:.1f})")  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
