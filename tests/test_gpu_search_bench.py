"""benchmarks/gpu_search.py (issue 23's GPU figures) run tiny on the CPU: the same code that a GPU
machine runs, writing the row schema the issue names, with the engine's answers checked against
the CPU engine and the plain torch reference in the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("uvicorn")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_search.py"


def test_gpu_search_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "gpu_search.json"
    argv = [sys.executable, str(SCRIPT), "--device", "cpu", "--float16", "3000", "6000", "--codes", "6000",
            "--http", "3000", "--queries", "1", "3", "--repeat", "1", "--cpu-n", "6000", "--http-requests", "3",
            "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["record"]["commit"] and "cores" in doc["record"]["machine"]
    rows = doc["rows"]
    assert not [r for r in rows if "error" in r], rows
    engine = [r for r in rows if r["path"] == "engine"]
    assert {(r["kind"], r["n"], r["queries"]) for r in engine} == {
        ("float16", n, m) for n in (3000, 6000) for m in (1, 3)} | {("codes", 6000, m) for m in (1, 3)}  # fmt: skip
    for r in engine:
        assert set(r) >= {"kind", "path", "n", "queries", "k", "ms", "reference_ms", "cpu_n", "cpu_ms", "device"}
        assert r["ms"] > 0 and r["reference_ms"] > 0 and r["k"] == 10
        # the device path's uids equal the NumPy engine's over the same rows (ties by uid)
        if r["cpu_n"] == r["n"]:
            assert r["cpu_equal"] is True, r
        # the reference ranks by float16 products: near-ties may swap, Hamming ties go either way
        assert r["agree"] >= (0.9 if r["kind"] == "float16" else 0.5), r
    http = [r for r in rows if r["path"] == "http"]
    assert len(http) == 1 and http[0]["n"] == 3000 and http[0]["matches"] == 10 and http[0]["ms"] > 0
    assert doc["notes"]["popcount"] == "torch" and doc["notes"]["kernels"]["n"] == 6000
    assert doc["notes"]["popcount_kernels"]["torch_ms"] > 0


def test_gpu_search_benchmark_measures_what_fits_on_a_smaller_card(tmp_path):
    """Sizes beyond the card's memory (1e8 float16 rows on an H100) are left out with a row naming
    the numbers, and the kind is measured at the largest size that fits instead of not at all."""
    from pipeline.search.device import bytes_per_tile

    out = tmp_path / "gpu_search.json"
    gib = 0.0052  # planned free memory: ~4,500 float16 rows or ~53,000 codes after the 15 % reserve
    argv = [sys.executable, str(SCRIPT), "--device", "cpu", "--float16", "3000", "6000", "--codes", "6000", "100000",
            "--http", "6000", "--queries", "1", "--repeat", "1", "--cpu-n", "3000", "--http-requests", "2",
            "--memory-gib", str(gib), "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    cap = {kind: int(gib * 2**30 * 0.85) // bytes_per_tile(512, "float16" if kind == "float16" else None,
                                                          0 if kind == "float16" else 64)
           for kind in ("float16", "codes")}  # fmt: skip
    largest = {kind: c // 10 ** (len(str(c)) - 2) * 10 ** (len(str(c)) - 2) for kind, c in cap.items()}
    skipped = {(r["kind"], r["n"]) for r in rows if "skipped" in r}
    assert skipped == {("float16", 6000), ("codes", 100000)}
    assert all(f"{cap[r['kind']]:,} rows fit" in r["skipped"] for r in rows if "skipped" in r)
    engine = {(r["kind"], r["n"]): r for r in rows if r.get("path") == "engine"}
    assert set(engine) == {("float16", 3000), ("float16", largest["float16"]), ("codes", 6000),
                           ("codes", largest["codes"])}  # fmt: skip
    assert engine["float16", largest["float16"]]["capped_from"] == 6000
    assert engine["codes", largest["codes"]]["capped_from"] == 100000
    assert "capped_from" not in engine["float16", 3000]
    [http] = [r for r in rows if r.get("path") == "http"]
    assert http["n"] == largest["float16"] and http["capped_from"] == 6000 and http["matches"] == 10
