"""benchmarks/gpu_ingest.py (issue 24's GPU figures) run tiny on the CPU, the device decoder on
the CPU (``$AERIAL_SEARCH_DECODE_DEVICE=cpu``): the same code a GPU machine runs, writing the
row schema the issue names; the carried imagery prepared from the shared data as the GPU check
prepares it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tifffile")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_ingest.py"


def test_gpu_ingest_benchmark_writes_its_rows(data_dir, tmp_path):
    carried = tmp_path / "carried"
    subprocess.run([sys.executable, str(SCRIPT), "--prepare", str(data_dir), "--data", str(carried)], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    tifs = sorted(p.name for p in (carried / "tifs").iterdir())
    assert "test_tiled.tif" in tifs and all(p.endswith(".tif") for p in tifs)  # the JPEG GeoTIFFs only
    assert len(list((carried / "ucmerced").rglob("*.jpg"))) == 21 * 5
    out = tmp_path / "gpu_ingest.json"
    env = {**os.environ, "AERIAL_SEARCH_DECODE_DEVICE": "cpu"}
    argv = [sys.executable, str(SCRIPT), "--device", "cpu", "--data", str(carried), "--mosaic-px", "512",
            "--chips", "12", "--batch", "16", "--seconds", "0.3", "--quick", "--arch", "probe", "--work", str(tmp_path / "work"),
            "--out", str(out)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert not [r for r in rows if "error" in r], rows
    got = {(r["source"], r["decoder"], r["mode"]) for r in rows}
    assert got == {(s, d, m) for s in ("jpeg-geotiff", "deflate-geotiff") for d in ("cpu", "device") for m in ("exact", "dense")} | {
        ("jpeg-chips", d, "exact") for d in ("cpu", "device")}  # fmt: skip
    for r in rows:
        assert set(r) >= {"source", "decoder", "mode", "tiles", "seconds", "tiles_per_s", "bare_fp16_tiles_per_s", "device"}
        assert r["tiles"] > 0 and r["tiles_per_s"] == pytest.approx(r["tiles"] / r["seconds"])
    by = {(r["source"], r["decoder"], r["mode"]): r for r in rows}
    assert by[("jpeg-chips", "device", "exact")]["tiles"] == 12 and by[("jpeg-geotiff", "device", "exact")]["decoded_on_device"]
    assert "deflate" in by[("deflate-geotiff", "device", "exact")]["fallback"][0]
    fid = doc["fidelity"]
    # the device path on the CPU is libjpeg-turbo: the same pixels, the same fingerprints
    for name in ("ucmerced-subset", tifs[0]):
        assert fid[name]["pixels_vs_libjpeg_turbo"]["max"] == 0 and fid[name]["cosine_vs_libjpeg-turbo"]["min"] > 0.99999
        assert fid[name]["cosine_vs_gdal"]["mean"] > 0.99
