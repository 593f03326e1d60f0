"""The wheel is the product: everything a command needs ships inside it, and the map page's
Leaflet is the release package.json pins, byte for byte.

The wheel test builds the wheel as a user would (``pip wheel --no-deps -w dist .``), installs it
with ``--no-deps`` into a new virtual environment in another folder (the dependencies come from
this test environment through a path file, so nothing is downloaded), and runs ``aerial-search
serve`` from outside the checkout: the page, its scripts, the search API and tile pixels answer.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline import open_store

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "pipeline" / "serve" / "static" / "vendor" / "leaflet"


def test_shipped_leaflet_is_the_pinned_release():
    """The committed copy against the package npm installs from the lock file (the README's test
    command runs ``npm ci``): same version as package.json pins, same bytes."""
    pin = json.loads((ROOT / "package.json").read_text())["dependencies"]["leaflet"]
    installed = ROOT / "node_modules" / "leaflet"
    if not (installed / "package.json").is_file():
        pytest.fail("node_modules/leaflet missing: run `npm ci` first (the README's test command does)")
    assert json.loads((installed / "package.json").read_text())["version"] == pin
    shipped = sorted(p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file())
    assert shipped == ["LICENSE", "images/layers-2x.png", "images/layers.png", "images/marker-icon-2x.png",
                       "images/marker-icon.png", "images/marker-shadow.png", "leaflet.css", "leaflet.js"]  # fmt: skip
    for rel in shipped:
        ref = installed / rel if rel == "LICENSE" else installed / "dist" / rel
        assert (VENDOR / rel).read_bytes() == ref.read_bytes(), f"{rel} differs from leaflet {pin}"
    assert f"Leaflet {pin}" in (VENDOR / "leaflet.js").read_text()[:200]


def test_page_references_only_shipped_files():
    html = (ROOT / "pipeline" / "serve" / "static" / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert any(r.endswith("leaflet.js") for r in refs) and any(r.endswith("app.js") for r in refs)
    for ref in refs:
        assert (ROOT / "pipeline" / "serve" / ref.lstrip("/")).is_file(), ref
    assert "://" not in " ".join(re.findall(r'(?:src|href)="([^"]+)"', html))  # no CDN


def test_kubernetes_spec_ships_in_the_package_and_matches_deploy():
    from pipeline.cluster import DEFAULT_K8S_SPEC

    assert DEFAULT_K8S_SPEC.parent == ROOT / "pipeline" / "cluster"
    assert DEFAULT_K8S_SPEC.read_bytes() == (ROOT / "deploy" / "kubernetes" / "daskcluster.yaml").read_bytes()


def test_dockerfile_installs_the_package_not_a_checkout():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"pip install \"?\.\[", text)  # a regular (wheel-building) install
    assert "node_modules" not in text and "npm" not in text and "pip install -e" not in text
    assert "EXPOSE 8000" in text


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.status, resp.read()


def test_wheel_installed_elsewhere_serves_the_page(flights, ingest_store, tmp_path):
    store = ingest_store(flights)
    ds = open_store(store)
    uid = int(ds["uid"].values[np.flatnonzero(ds["valid"].values)[5]])
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    [wheel] = dist.glob("aerial_search-*.whl")
    venv = tmp_path / "elsewhere" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)  # fmt: skip  (this environment's pip installs into it: --python)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # the dependencies (torch, dask, ...) from this environment, the package only from the wheel
    Path(site, "deps-from-test-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    away = tmp_path / "elsewhere" / "work"
    away.mkdir()
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import pipeline, pipeline.cluster as c; print(pipeline.__file__); "
                            "print(c.DEFAULT_K8S_SPEC.is_file())"], cwd=away, env=env, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    assert Path(where[0]).is_relative_to(venv) and where[1] == "True", where
    server = subprocess.Popen([str(venv / "bin" / "aerial-search"), "serve", "--store", str(store), "--port", "0"],
                              cwd=away, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        base, lines, deadline = None, [], time.monotonic() + 180
        while base is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving (http://\S+?/)", line)
            base = m.group(1) if m else None
        assert base, "".join(lines)
        status, page = _get(base)
        assert status == 200 and b"leaflet.js" in page
        for ref in re.findall(rb'(?:src|href)="(/static/[^"]+)"', page):
            status, body = _get(base + ref.decode().lstrip("/"))
            assert status == 200 and body, ref
        status, body = _get(base + "static/vendor/leaflet/leaflet.js")
        assert status == 200 and body == (VENDOR / "leaflet.js").read_bytes()
        status, body = _get(f"{base}api/search?uid={uid}&k=3")
        doc = json.loads(body)
        assert status == 200 and len(doc["results"]) == 3 and doc["query"]["uid"] == str(uid)
        status, png = _get(f"{base}api/tiles/{uid}.png")
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.terminate()
        server.wait(timeout=60)
