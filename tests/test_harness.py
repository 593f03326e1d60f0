"""The benchmark harness (benchmarks/harness.py): its children import the tree they are given, its
timings are of the runs they name, and every result file carries the same record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402


def test_a_child_imports_the_tree_it_is_given(tmp_path, monkeypatch):
    """``python -c`` puts its working directory before PYTHONPATH: started from this checkout, a
    child meant for another tree imported this one's package (the start-up benchmark measured
    this tree twice)."""
    tree = tmp_path / "old"
    (tree / "pipeline").mkdir(parents=True)
    (tree / "pipeline" / "__init__.py").write_text("MARK = 'old tree'\n")
    monkeypatch.chdir(harness.ROOT)
    code = "import json, pipeline; print(json.dumps(getattr(pipeline, 'MARK', pipeline.__file__)))"
    assert harness.child(code, tree) == "old tree"
    assert harness.child(code, harness.ROOT).startswith(str(harness.ROOT))
    _, res = harness.wall([sys.executable, "-c", code], tree)
    assert json.loads(res.stdout) == "old tree"
    with pytest.raises(RuntimeError, match="exited 3"):
        harness.wall([sys.executable, "-c", "raise SystemExit(3)"], check=True)


def test_timings_and_the_record(tmp_path):
    calls = []
    t = harness.timed(lambda: calls.append(1) or len(calls), repeat=3, warmup=2)
    assert len(calls) == 5 and t.value == 5 and len(t.runs) == 3 and t.best <= t.median
    order = []
    timings = harness.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=2)
    assert order == ["a", "b", "a", "b"] and {k: len(v.runs) for k, v in timings.items()} == {"a": 2, "b": 2}
    doc = harness.write(tmp_path / "r.json", {"rows": [1]}, against="f470bc8")
    back = json.loads((tmp_path / "r.json").read_text())
    assert back == doc and back["rows"] == [1]
    rec = back["record"]
    assert len(rec["commit"]) == 40 and isinstance(rec["dirty"], bool) and rec["against"] == "f470bc8"
    assert rec["machine"]["cores"] >= 1 and rec["versions"]["numpy"] and rec["date"].endswith("+00:00")
    harness.update(tmp_path / "r.json", "later", {"x": 2})
    later = json.loads((tmp_path / "r.json").read_text())
    assert later["rows"] == [1] and later["later"]["x"] == 2 and "commit" in later["later"]["record"]


def test_every_benchmark_result_carries_a_record():
    files = sorted(BENCH.glob("*.json")) + [BENCH / "report" / "report.json"]
    assert len(files) >= 20
    for f in files:
        rec = json.loads(f.read_text()).get("record")
        assert rec and {"commit", "dirty", "date", "machine", "versions"} <= set(rec), f
