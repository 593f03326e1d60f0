"""benchmarks/sizing.py (docs/scaling.md's table): its formulas against a hand computation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sizing.py"


def _rows(*args: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    return {r[0].lstrip("| ").strip(): r[1].strip() for r in rows if len(r) >= 3}


def test_sizing_counts_windows_and_store_bytes_from_the_archive_size():
    rows = _rows("--bytes", "1e15", "--bpp", "24")
    windows = 1e15 * 8 / 24 / 128**2  # ~2e10, the figure for a petabyte
    assert float(rows["windows (256 px, stride 128)"]) == float(f"{windows:.3g}")
    assert rows["store: 512-bit codes"] == f"{windows * (64 + 53) / 1e12:.3g} TB"
    assert rows["store: float16"] == f"{windows * (1024 + 53) / 1e12:.3g} TB"
    half = _rows("--bytes", "5e14", "--bpp", "24")  # everything per window scales with the archive
    assert float(half["windows (256 px, stride 128)"]) == float(f"{windows / 2:.3g}")
    assert "GUESS" in subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True).stdout


def test_gpu_search_nodes_follow_the_scan_rate_and_the_device_memory():
    """The GPU lines: windows / min(tiles scanned within the latency, tiles in 90 % of the GPU's
    memory), from the inputs the table prints (measured or guessed) and the device's bytes per tile."""
    import math

    from pipeline.search.device import bytes_per_tile

    for latency in ("1", "0.05"):
        rows = _rows("--bytes", "1e15", "--bpp", "24", "--latency", latency)
        windows = float(rows["windows (256 px, stride 128)"])
        mem = float(rows["gpu_memory_gib"]) * 2**30 * 0.9
        for label, key, per_tile in (("float16", "gpu_float16_s_per_tile", bytes_per_tile(512, "float16")),
                                     ("512-bit codes", "gpu_codes_s_per_tile", bytes_per_tile(0, None, 64))):  # fmt: skip
            per_gpu = float(latency) / float(rows[key])
            got = rows[f"search on GPUs ({label} on the device), GPUs for {float(latency):g} s"]
            # the printed inputs carry 4 significant digits: allow the rounding
            low = math.ceil(windows / min(per_gpu * 1.0005, mem / per_tile))
            high = math.ceil(windows / min(per_gpu * 0.9995, mem / per_tile))
            assert low <= int(got.replace(",", "")) <= high, (label, latency, got)
