"""The map page in a real browser: headless Chromium (Debian's, driven by Playwright) on a store
ingested from the real imagery in $AERIAL_SEARCH_DATA/aerial with a pretrained network.

A missing browser fails this test, never skips it (`.ci/run` installs chromium with apt); the
real imagery comes through the ``data_dir`` fixture, so with $AERIAL_SEARCH_DATA set a skip
fails the run like any real-data test's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serve needs fastapi: pip install -e .")

from pipeline.cli import main  # noqa: E402
from pipeline.commands.serve import bind  # noqa: E402
from pipeline.serve.app import create_app  # noqa: E402
from pipeline.serve.service import Service  # noqa: E402

# real images with a CRS on three continents, and one without a CRS (searched from the gallery
# view): ~520 windows
IMAGES = ["test_tiled.tif", "australia.tif", "OSBS_029.tif", "2018_SJER_3_252000_4107000_image_477.tif",
          "5b90f92da0d7280005fab355_4310.tif", "2019_YELL_2_528000_4978000_image_crop2.tif"]  # fmt: skip
K = 12


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is not installed: `apt-get install chromium` (.ci/run does)")
    return path


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, data_dir, shared_weights):
    path = tmp_path_factory.mktemp("page") / "aerial.zarr"
    sources = [str(data_dir / "aerial" / n) for n in IMAGES]
    assert main(["ingest", *sources, "--store", str(path), "--model", "squeezenet1_1", "--weights",
                 str(shared_weights), "--no-progress"]) == 0  # fmt: skip
    return path


@contextlib.contextmanager
def serving(store):
    """The app over ``store`` served by uvicorn on a free port of 127.0.0.1, on a thread: its URL."""
    import uvicorn

    service = Service.open(str(store))
    sock = bind("127.0.0.1", 0)  # as `serve` listens: TCP_NODELAY on every connection
    srv = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = srv.force_exit = True  # the browser's keep-alive connections would hold a graceful exit
        thread.join(10)
        assert not thread.is_alive()
        service.close()


@pytest.fixture(scope="module")
def server(real_store):
    with serving(real_store) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def shot(page, path: Path) -> np.ndarray:
    """A screenshot written to ``path``, read back, and checked not to be blank."""
    from PIL import Image

    page.screenshot(path=str(path))
    px = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert path.stat().st_size > 20_000, path
    assert px.std() > 20, f"{path} looks blank"
    return px


def gallery_uids(page) -> list[str]:
    return page.eval_on_selector_all("#gallery .result", "els => els.map(e => e.dataset.uid)")


def wait_js(page, expression: str, timeout: float = 30) -> None:
    """Poll a JavaScript expression until true (page.wait_for_function would need 'unsafe-eval',
    which the page's Content-Security-Policy forbids)."""
    deadline = time.time() + timeout
    while not page.evaluate(expression):
        assert time.time() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(100)


def wait_seq(page, n: int) -> None:
    """Wait for the page's n-th answered search; an error shown instead fails at once."""
    wait_js(page, f"document.body.dataset.seq === '{n}' || !document.getElementById('error').hidden", 60)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    assert page.evaluate("document.body.dataset.seq") == str(n)


def test_page_search_mark_rerun_and_permalink(server, browser, tmp_path):
    import httpx

    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"{r.url} {r.failure}") if "/api/" in r.url else None)
    page.goto(server + "/", wait_until="domcontentloaded")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    assert f"tiles in {len(IMAGES)} images" in page.inner_text("#store-info")
    assert page.locator(".leaflet-overlay-pane path").count() >= len(IMAGES) - 1  # footprints (one has no CRS)
    shot(page, tmp_path / "1-loaded.png")

    # go to one image and click the middle of the map
    fc = httpx.get(server + "/api/images").json()
    ring = np.array(next(f for f in fc["features"] if f["properties"]["name"] == "test_tiled.tif")["geometry"]
                    ["coordinates"][0])  # fmt: skip
    fit = (f"aerialSearch.map.fitBounds([[{ring[:, 1].min()}, {ring[:, 0].min()}], "
           f"[{ring[:, 1].max()}, {ring[:, 0].max()}]], {{animate: false}})")  # fmt: skip
    page.evaluate(fit)
    page.wait_for_selector(".leaflet-tile-loaded", timeout=30_000)
    page.fill("#k", str(K))
    box = page.locator("#map").bounding_box()
    with page.expect_response(lambda r: "/api/search" in r.url) as first:
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert first.value.status == 200
    wait_seq(page, 1)
    uids = gallery_uids(page)
    assert len(uids) == K
    assert page.locator("path.result-outline").count() == K  # every hit outlined on the map
    assert page.locator("path.query-outline").count() == 1
    lon, lat = page.evaluate("aerialSearch.state.lonlat")
    oracle = httpx.get(server + "/api/search", params={"lonlat": f"{lon},{lat}", "k": K}).json()
    assert uids == [r["uid"] for r in oracle["results"]]
    wait_js(page, "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)")
    shot(page, tmp_path / "2-results.png")

    place_link = page.url
    assert "lonlat=" in place_link

    # a click on a result flies the map there
    page.locator("#gallery .result img").nth(3).click()
    page.wait_for_timeout(1200)
    centre = page.evaluate("(() => { const c = aerialSearch.map.getCenter(); return [c.lng, c.lat]; })()")
    hit = oracle["results"][3]
    assert abs(centre[0] - hit["lon"]) < 2e-4 and abs(centre[1] - hit["lat"]) < 2e-4

    # mark the best result negative, re-run: the results change, as the API says they should
    page.locator("#gallery .result").first.locator("button.neg").click()
    assert "negative" in page.locator("#gallery .result").first.get_attribute("class")
    page.click("#rerun")
    wait_seq(page, 2)
    rerun = gallery_uids(page)
    assert len(rerun) == K and rerun != uids and uids[0] not in rerun
    expect = httpx.post(server + "/api/search", json={"positives": [oracle["query"]["uid"]], "negatives": [uids[0]],
                                                      "k": K}).json()  # fmt: skip
    assert rerun == [r["uid"] for r in expect["results"]]
    link = page.url
    assert "pos=" in link and "neg=" in link
    shot(page, tmp_path / "3-rerun.png")

    # the permalink reproduces the results in a fresh page
    again = browser.new_page(viewport={"width": 1400, "height": 900})
    again.goto(link, wait_until="domcontentloaded")
    wait_seq(again, 1)
    assert gallery_uids(again) == rerun
    shot(again, tmp_path / "4-permalink.png")

    # ... and so does a place's permalink
    again.goto(place_link, wait_until="domcontentloaded")
    again.reload(wait_until="domcontentloaded")
    wait_seq(again, 1)
    assert gallery_uids(again) == uids

    # export: a GeoJSON file of the hits
    with page.expect_download() as dl:
        page.click("#export")
    doc = json.loads(Path(dl.value.path()).read_text())
    assert [f["properties"]["uid"] for f in doc["features"]] == rerun

    # threshold mode: every result within the slider's value (now example-set scores)
    page.check("#threshold-mode")
    values = page.evaluate("aerialSearch.last.results.map(r => r.score)")
    limit = float(np.median(values))
    page.evaluate(f"(() => {{ const s = document.getElementById('threshold'); s.max = '{limit * 2}'; "
                  f"s.value = '{limit}'; s.dispatchEvent(new Event('change')); }})()")  # fmt: skip
    wait_seq(page, 3)
    got = page.evaluate("aerialSearch.last.results.map(r => r.score)")
    assert len(got) >= K // 2 and max(got) <= limit + 1e-9
    assert "passed" in page.inner_text("#status")
    page.uncheck("#threshold-mode")

    # search in this view: every hit centred inside the map's bounds; the progress bar shows meanwhile
    page.check("#in-view")
    page.evaluate(fit)
    page.evaluate("""(() => { window.sawProgress = false; const p = document.getElementById('progress');
        new MutationObserver(() => { if (!p.hidden) window.sawProgress = true; })
          .observe(p, {attributes: true}); })()""")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_seq(page, 4)
    assert page.evaluate("window.sawProgress")
    w, s, e, n = page.evaluate("aerialSearch.state.bbox")
    hits = page.evaluate("aerialSearch.last.results")
    assert hits and all(w <= r["lon"] <= e and s <= r["lat"] <= n for r in hits)
    page.uncheck("#in-view")

    # an uploaded image as the query (not part of the permalink)
    png = httpx.get(f"{server}/api/tiles/{uids[2]}.png").content
    (tmp_path / "query.png").write_bytes(png)
    page.set_input_files("#upload", str(tmp_path / "query.png"))
    wait_seq(page, 5)
    assert page.evaluate("aerialSearch.last.query.type") == "image"
    assert "#" not in page.url or page.url.endswith("#")

    # the gallery view of an image without a CRS: a click on its preview searches from that tile
    page.click("#open-images")
    page.locator("#image-list a", has_text="2019_YELL").click()
    wait_js(page, "document.getElementById('preview').complete && document.getElementById('preview').naturalWidth > 0")
    pbox = page.locator("#preview").bounding_box()
    page.mouse.click(pbox["x"] + pbox["width"] * 0.5, pbox["y"] + pbox["height"] * 0.5)
    wait_seq(page, 6)
    q = page.evaluate("aerialSearch.last.query")
    assert q["type"] == "uid" and "2019_YELL" in q["image_path"]
    assert abs(q["row"] + 128 - 2472 / 2) <= 128 and abs(q["col"] + 128 - 2299 / 2) <= 128
    assert len(gallery_uids(page)) == K
    shot(page, tmp_path / "5-gallery-view.png")
    page.click("#close-images")

    # a readable error: a place with no tile
    page.evaluate("aerialSearch.map.setView([0, -30], 10, {animate: false})")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "no tile covers" in page.inner_text("#error")
    shot(page, tmp_path / "6-error.png")
    assert not errors, errors


def test_page_saves_and_loads_example_sets(server, real_store, browser, tmp_path):
    """Save examples writes the page's example set (the query tile and the marks) as the CSV that
    `aerial-search search/classify --examples` reads: the command line ranks it as the page's
    re-run does. Load examples takes such a CSV, lon/lat rows or GeoJSON points, each place
    resolved to the tile a click there finds, and searches with them; a bad file is one line."""
    import httpx

    from pipeline.store import open_store

    ds = open_store(str(real_store))
    paths = ds["image_path"].values
    valid = ds["valid"].values.astype(bool) & np.array([paths[i].endswith("test_tiled.tif") for i in ds["image"].values])
    uid = str(int(ds["uid"].values[np.flatnonzero(valid)[len(np.flatnonzero(valid)) // 2]]))
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server}/#uid={uid}&k={K}", wait_until="domcontentloaded")
    wait_seq(page, 1)
    results = page.evaluate("aerialSearch.last.results")
    page.locator("#gallery .result").nth(0).locator("button.neg").click()
    page.locator("#gallery .result").nth(1).locator("button.pos").click()
    with page.expect_download() as dl:
        page.click("#save-examples")
    saved = tmp_path / "examples.csv"
    shutil.copy(dl.value.path(), saved)
    lines = saved.read_text().splitlines()
    assert lines[0] == "uid,label,lon,lat"
    rows = {ln.split(",")[0]: ln.split(",")[1:] for ln in lines[1:]}
    assert {u: r[0] for u, r in rows.items()} == {uid: "positive", results[1]["uid"]: "positive",
                                                  results[0]["uid"]: "negative"}  # fmt: skip
    assert [float(v) for v in rows[results[0]["uid"]][1:]] == [results[0]["lon"], results[0]["lat"]]
    assert "examples.csv" in page.inner_text("#status")

    # the page's re-run and the command line on the saved file rank the same tiles
    page.click("#rerun")
    wait_seq(page, 2)
    out = tmp_path / "cli.json"
    assert main(["search", "--store", str(real_store), "--examples", str(saved), "-k", str(K), "--json", str(out)]) == 0
    assert gallery_uids(page) == [r["uid"] for r in json.loads(out.read_text())["results"]]

    # load: places (CSV lon,lat and GeoJSON points) become the tiles there, as the API finds them
    pos, neg = results[2], results[3]
    (tmp_path / "places.csv").write_text(f"lon,lat,label\n{pos['lon']},{pos['lat']},positive\n"
                                         f"{neg['lon']},{neg['lat']},Negative\n")  # fmt: skip
    points = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [r["lon"], r["lat"]]},
         "properties": {"label": lab}} for r, lab in ((pos, "positive"), (neg, "negative"))]}  # fmt: skip
    (tmp_path / "places.geojson").write_text(json.dumps(points))
    at = [httpx.get(server + "/api/search", params={"lonlat": f"{r['lon']},{r['lat']}", "k": 1}).json()["query"]["uid"]
          for r in (pos, neg)]  # fmt: skip
    expect = httpx.post(server + "/api/search", json={"positives": [at[0]], "negatives": [at[1]], "k": K}).json()
    for n, name in enumerate(("places.csv", "places.geojson", "examples.csv")):
        page.set_input_files("#load-examples", str(tmp_path / name))
        wait_seq(page, 3 + n)
        state = page.evaluate("[aerialSearch.state.pos, aerialSearch.state.neg]")
        if name == "examples.csv":  # the saved set again: the re-run's results
            assert sorted(state[0]) == sorted([uid, results[1]["uid"]]) and state[1] == [results[0]["uid"]]
            assert gallery_uids(page) == [r["uid"] for r in json.loads(out.read_text())["results"]]
        else:
            assert state == [[at[0]], [at[1]]], name
            assert gallery_uids(page) == [r["uid"] for r in expect["results"]], name
        assert "pos=" in page.url and "neg=" in page.url

    # a file that is no example set: one readable line, the page goes on
    (tmp_path / "bad.csv").write_text("uid,kind\n1,positive\n")
    page.set_input_files("#load-examples", str(tmp_path / "bad.csv"))
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "bad.csv needs a 'label' column" in page.inner_text("#error")
    (tmp_path / "bad.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}, "properties": {"label": "maybe"}}]}))
    page.set_input_files("#load-examples", str(tmp_path / "bad.geojson"))
    wait_js(page, "document.getElementById('error').textContent.includes('maybe')")
    assert not errors, errors


@pytest.fixture(scope="module")
def dated_server(tmp_path_factory):
    """Two dated flights of the same ground (the second with patches pasted in) and a third image
    elsewhere without a date, served on a free port."""
    from conftest import textured, write_tif

    root = tmp_path_factory.mktemp("dated-page")
    src = root / "src"
    src.mkdir()
    base, other = textured(1024, 1024, seed=61), textured(1024, 1024, seed=62)
    write_tif(src / "before.tif", base, transform=(0.5, 0, 400000.0, 0, -0.5, 3300000.0))
    after = base.copy()
    after[:, 300:420, 600:700] = other[:, 300:420, 600:700]
    write_tif(src / "after.tif", after, transform=(0.5, 0, 400007.0, 0, -0.5, 3299995.0))
    write_tif(src / "undated.tif", textured(512, 512, seed=63), transform=(0.5, 0, 400600.0, 0, -0.5, 3300000.0))
    (root / "d.csv").write_text("path,acquired\nbefore.tif,2019-06-01\nafter.tif,2021-06-01\n")
    path = root / "s.zarr"
    assert main(["ingest", str(src), "--store", str(path), "--model", "probe", "--weights", "random",
                 "--dates", str(root / "d.csv"), "--no-progress"]) == 0  # fmt: skip
    with serving(path) as url:
        yield url


def test_page_date_range_and_changes_mode_with_permalinks(dated_server, browser, tmp_path):
    import httpx

    server = dated_server
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/", wait_until="domcontentloaded")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    fc = httpx.get(server + "/api/images").json()
    ring = np.array(next(f for f in fc["features"] if f["properties"]["name"] == "after.tif")["geometry"]["coordinates"][0])
    fit = (f"aerialSearch.map.fitBounds([[{ring[:, 1].min()}, {ring[:, 0].min()}], "
           f"[{ring[:, 1].max()}, {ring[:, 0].max()}]], {{animate: false}})")  # fmt: skip
    page.evaluate(fit)
    page.wait_for_selector(".leaflet-tile-loaded", timeout=30_000)
    box = page.locator("#map").bounding_box()

    # the date range: only the 2021 flight answers, the page says how many images it left out
    page.fill("#k", "8")
    page.fill("#date-from", "2021-01-01")
    page.fill("#date-to", "2021-12-31")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_seq(page, 1)
    recs = page.evaluate("aerialSearch.last.results")
    assert len(recs) == 8 and {r["image_path"].rsplit("/", 1)[-1] for r in recs} == {"after.tif"}
    assert "2 left out (1 without a date)" in page.inner_text("#status")
    lon, lat = page.evaluate("aerialSearch.state.lonlat")
    oracle = httpx.get(server + "/api/search", params={"lonlat": f"{lon},{lat}", "k": 8, "date": "2021-01-01/2021-12-31"})
    assert [r["uid"] for r in recs] == [r["uid"] for r in oracle.json()["results"]]
    link = page.url
    assert "date=2021-01-01%2F2021-12-31" in link or "date=2021-01-01/2021-12-31" in link
    # the map shows the flights of the range
    page.wait_for_selector("img.leaflet-tile-loaded[src*='date=2021-01-01%2F2021-12-31']", timeout=30_000)
    # a new range answers the same query again
    page.evaluate("""(() => { document.getElementById('date-from').value = '2019-01-01';
        const to = document.getElementById('date-to'); to.value = '2019-12-31';
        to.dispatchEvent(new Event('change')); })()""")  # one change event, one search
    wait_seq(page, 2)
    assert {r["image_path"].rsplit("/", 1)[-1] for r in page.evaluate("aerialSearch.last.results")} == {"before.tif"}
    again = browser.new_page(viewport={"width": 1400, "height": 900})
    again.goto(link, wait_until="domcontentloaded")
    wait_seq(again, 1)
    assert gallery_uids(again) == [r["uid"] for r in recs]
    assert again.input_value("#date-from") == "2021-01-01" and again.input_value("#date-to") == "2021-12-31"

    # changes in this view: the pasted patch's windows first, before and after tiles side by side
    page.evaluate("document.getElementById('date-from').value = document.getElementById('date-to').value = ''")
    page.evaluate(fit)
    page.click("#changes-box summary")
    page.fill("#before-from", "2019-01-01")
    page.fill("#before-to", "2019-12-31")
    page.fill("#after-from", "2021-01-01")
    page.fill("#k", "9")
    page.click("#changes-run")
    wait_seq(page, 3)
    doc = page.evaluate("aerialSearch.last")
    assert doc["query"]["type"] == "changes"
    w, s, e, n = page.evaluate("aerialSearch.state.bbox")
    api = httpx.get(server + "/api/changes", params={"before": "2019-01-01/2019-12-31", "after": "2021-01-01/",
                                                     "k": 9, "bbox": f"{w},{s},{e},{n}"}).json()  # fmt: skip
    assert gallery_uids(page) == [r["uid"] for r in api["results"]] and len(api["results"]) == 9
    patch = {(r, c) for r in range(0, 769, 128) for c in range(0, 769, 128) if r < 420 and r + 256 > 300
             and c < 700 and c + 256 > 600}  # fmt: skip
    assert {(r["row"], r["col"]) for r in api["results"]} == patch
    assert page.locator("#gallery .result.change img.before").count() == 9
    assert page.locator("path.result-outline").count() == 9
    assert "most changed of" in page.inner_text("#status")
    # the map shows the 'after' flight, the 'before' one a click away in the layer switch
    switch = page.locator(".leaflet-control-layers-base label")
    assert switch.count() == 2
    assert switch.nth(0).inner_text().strip() == "after: from 2021-01-01"
    assert switch.nth(1).inner_text().strip() == "before: 2019-01-01 – 2019-12-31"
    page.wait_for_selector("img.leaflet-tile-loaded[src*='date=2021-01-01%2F']", timeout=30_000)
    shot(page, tmp_path / "7-changes.png")
    switch.nth(1).click()
    page.wait_for_selector("img.leaflet-tile-loaded[src*='date=2019-01-01%2F2019-12-31']", timeout=30_000)
    assert page.evaluate("aerialSearch.map.hasLayer(aerialSearch.beforeMap) && !aerialSearch.map.hasLayer(aerialSearch.basemap)")
    tiles = page.eval_on_selector_all(".leaflet-tile-pane img.leaflet-tile", "els => els.map(e => e.src)")
    assert tiles and all("date=2019-01-01%2F2019-12-31" in t for t in tiles), tiles
    shot(page, tmp_path / "7b-changes-before.png")
    link = page.url
    assert "changes=1" in link and "before=" in link and "after=" in link
    again.goto(link, wait_until="domcontentloaded")
    again.reload(wait_until="domcontentloaded")
    wait_seq(again, 1)
    assert gallery_uids(again) == gallery_uids(page)
    assert again.evaluate("document.getElementById('changes-box').open")
    # robust: the same view ranked by how far each change stands out in its image pair
    page.check("#changes-robust")
    page.click("#changes-run")
    wait_seq(page, 4)
    w, s, e, n = page.evaluate("aerialSearch.state.bbox")
    api = httpx.get(server + "/api/changes", params={"before": "2019-01-01/2019-12-31", "after": "2021-01-01/", "k": 9,
                                                     "bbox": f"{w},{s},{e},{n}", "score": "robust"}).json()  # fmt: skip
    assert gallery_uids(page) == [r["uid"] for r in api["results"]] and "score=robust" in page.url
    assert page.locator("#gallery .result .meta").first.inner_text().split()[-2] == "robust"
    # a plain search leaves changes mode: one basemap again, of every date, no layer switch
    page.evaluate(fit)  # the whole after image, clicked away from the changed windows' outlines
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.2)
    wait_seq(page, 5)
    assert page.locator(".leaflet-control-layers").count() == 0
    assert page.evaluate("aerialSearch.map.hasLayer(aerialSearch.basemap) && !aerialSearch.beforeMap")
    page.wait_for_selector("img.leaflet-tile-loaded[src$='.png']", timeout=30_000)
    assert page.evaluate("aerialSearch.basemap._url") == "/tiles/{z}/{x}/{y}.png"
    # the history of the clicked place: its window in each flight, oldest first, as the API has it
    uid = page.evaluate("aerialSearch.last.query.uid")  # the clicked place's tile: its centre is the place
    page.click("#history-run")
    wait_seq(page, 6)
    api = httpx.get(server + "/api/history", params={"uid": uid}).json()
    assert gallery_uids(page) == [r["uid"] for r in api["results"]]
    assert [r["image_path"].rsplit("/", 1)[-1] for r in api["results"]] == ["before.tif", "after.tif"]
    assert "image(s) over this place, oldest first" in page.inner_text("#status")
    assert page.locator("#gallery .result .name").first.inner_text().startswith("2019-06-01")
    assert "history=1" in page.url
    shot(page, tmp_path / "8-history.png")
    again.goto(page.url, wait_until="domcontentloaded")
    again.reload(wait_until="domcontentloaded")
    wait_seq(again, 1)
    assert gallery_uids(again) == gallery_uids(page)
    assert not errors, errors
