"""The README's picture of the map page: serve a store, click the map in headless Chromium, and
save the page with its results as a small PNG.

    python benchmarks/screenshot.py --store demo/demo.zarr      # after `aerial-search demo`

Needs Chromium (`apt-get install chromium`); the page and its Leaflet come with the package.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="demo/demo.zarr")
    ap.add_argument("--image", default="test_tiled.tif", help="the image whose middle is clicked")
    ap.add_argument("--out", default=str(Path(__file__).with_name("serve-page.png")))
    ap.add_argument("-k", type=int, default=9)
    args = ap.parse_args()

    import uvicorn
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from pipeline.serve.app import create_app
    from pipeline.serve.service import Service

    service = Service.open(args.store)
    from pipeline.commands.serve import bind

    sock = bind("127.0.0.1", 0)  # as `serve` listens: TCP_NODELAY on every connection
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    feats = service.images()["features"]
    target = next((f for f in feats if f["properties"]["name"] == args.image and f["geometry"]), None)
    target = target or next(f for f in feats if f["geometry"])
    ring = np.array(target["geometry"]["coordinates"][0])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(url + "/", wait_until="domcontentloaded")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        page.evaluate(f"aerialSearch.map.fitBounds([[{ring[:, 1].min()}, {ring[:, 0].min()}], "
                      f"[{ring[:, 1].max()}, {ring[:, 0].max()}]], {{animate: false}})")  # fmt: skip
        page.fill("#k", str(args.k))
        box = page.locator("#map").bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.55)
        page.wait_for_selector("body[data-seq='1']", timeout=60_000)
        deadline = time.time() + 30
        while not page.evaluate("[...document.querySelectorAll('#gallery img, .leaflet-tile')]"
                                ".every(i => i.complete && i.naturalWidth > 0)") and time.time() < deadline:  # fmt: skip
            page.wait_for_timeout(200)
        page.wait_for_timeout(500)
        raw = Path(args.out).with_suffix(".raw.png")
        page.screenshot(path=str(raw))
        browser.close()
    server.should_exit = True
    service.close()
    im = Image.open(raw).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    im.save(args.out, optimize=True)
    raw.unlink()
    print(f"{args.out}: {Path(args.out).stat().st_size / 1024:.0f} kB")


if __name__ == "__main__":
    main()
