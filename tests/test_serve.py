"""`aerial-search serve`: the HTTP API against the CLI's own answers for the same queries, pixels
against rasterio reads, footprints against rasterio's bounds, every bad request a 4xx with a
one-line JSON error while the next good request still succeeds, and the command itself."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import textured, write_tif

fastapi = pytest.importorskip("fastapi", reason="serve needs fastapi: pip install -e .")
from fastapi.testclient import TestClient  # noqa: E402

from pipeline import grid, open_store  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.serve.app import create_app  # noqa: E402
from pipeline.serve.service import Batcher, Service  # noqa: E402

PX = 0.5
UPLOAD_LIMIT = 300_000


@pytest.fixture(scope="module")
def store(flights, ingest_store):
    """The shared archive's store (conftest): a, b, c_far, d_geo (EPSG:4326), e_nocrs, f_copy."""
    return ingest_store(flights)


@pytest.fixture(scope="module")
def service(store):
    svc = Service.open(str(store), max_upload=UPLOAD_LIMIT)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def tiles(store):
    ds = open_store(store)
    return {n: ds[n].values for n in ("uid", "valid", "image", "row", "col", "lon", "lat")}


def uid_of(tiles, image: int, n: int = 3) -> str:
    return str(int(tiles["uid"][np.flatnonzero(tiles["valid"] & (tiles["image"] == image))[n]]))


def cli_json(argv, tmp_path):
    out = tmp_path / f"cli{len(list(tmp_path.glob('cli*')))}.json"
    assert main([*argv, "--json", str(out)]) == 0, argv
    return json.loads(out.read_text())


def ok(resp):
    assert resp.status_code == 200, resp.text
    return resp.json()


def same(got, expect):
    """Equal documents; the ranked values to 1e-9 (the server holds the index in blocks of
    another size than the CLI's chunks, so BLAS may round the last bits differently)."""
    if isinstance(expect, list):
        assert isinstance(got, list) and len(got) == len(expect)
        return all(same(g, e) for g, e in zip(got, expect))
    assert got.keys() == expect.keys()
    for key in expect:
        if key != "results":
            assert got[key] == expect[key], key
    assert len(got["results"]) == len(expect["results"])
    for g, e in zip(got["results"], expect["results"]):
        for f in e:
            if f in ("distance", "score"):
                assert g[f] == pytest.approx(e[f], rel=1e-9, abs=1e-12), (f, g, e)
            else:
                assert g[f] == e[f], (f, g, e)
    return True


# ---- the API answers what the CLI answers -----------------------------------------------------


def test_get_search_equals_cli_for_uids_places_and_filters(client, store, tiles, tmp_path):
    a, b = uid_of(tiles, 0), uid_of(tiles, 1, 5)
    q = np.flatnonzero(tiles["uid"] == int(a))[0]
    lon, lat = float(tiles["lon"][q]), float(tiles["lat"][q])
    lonv, latv = tiles["lon"][tiles["valid"]], tiles["lat"][tiles["valid"]]
    bbox = f"{np.quantile(lonv[np.isfinite(lonv)], 0.1)},{np.nanmin(latv)},{np.nanmax(lonv)},{np.nanmax(latv)}"
    cases = [
        (["--uid", a, "-k", "7"], {"uid": a, "k": 7}),
        (["--uid", a, "--uid", b, "-k", "4"], [("uid", a), ("uid", b), ("k", 4)]),
        ([f"--lonlat={lon},{lat}", "-k", "5"], {"lonlat": f"{lon},{lat}", "k": 5}),
        (["--uid", a, f"--bbox={bbox}", "--diverse", "-k", "6"], {"uid": a, "bbox": bbox, "diverse": True, "k": 6}),
        (["--uid", a, "--images", "*b.tif", "--include-overlapping"],
         {"uid": a, "images": "*b.tif", "include_overlapping": "true"}),
        (["--uid", b, "--max-distance", "2.5", "--limit", "9"], {"uid": b, "max_distance": 2.5, "limit": 9}),
    ]  # fmt: skip
    for argv, params in cases:
        expect = cli_json(["search", "--store", str(store), *argv], tmp_path)
        assert same(ok(client.get("/api/search", params=params)), expect), argv
    # several queries come back as a list, one document per query, like --json
    assert isinstance(ok(client.get("/api/search", params=[("uid", a), ("uid", b)])), list)


def test_post_search_examples_and_classifier_equal_cli(client, store, tiles, tmp_path):
    p1, p2, n1 = uid_of(tiles, 0, 2), uid_of(tiles, 1, 4), uid_of(tiles, 2, 1)
    q = np.flatnonzero(tiles["uid"] == int(p2))[0]
    place = f"lonlat:{tiles['lon'][q]},{tiles['lat'][q]}"
    expect = cli_json(["search", "--store", str(store), "--positive", p1, "--positive", place, "--negative", n1,
                       "--score", "nearest", "--negative-weight", "0.7", "-k", "8"], tmp_path)  # fmt: skip
    got = ok(client.post("/api/search", json={"positives": [p1, [float(tiles["lon"][q]), float(tiles["lat"][q])]],
                                               "negatives": [int(n1)], "score": "nearest", "negative_weight": 0.7,
                                               "k": 8}))  # fmt: skip
    assert same(got, expect)
    expect = cli_json(["classify", "--store", str(store), "--positive", p1, "--positive", p2, "--negative", n1,
                       "--background", "30", "--min-score", "0.2", "--limit", "15"], tmp_path)  # fmt: skip
    got = ok(client.post("/api/search", json={"positives": [p1, p2], "negatives": [n1], "classifier": True,
                                               "background": 30, "min_score": 0.2, "limit": 15}))  # fmt: skip
    assert same(got, expect)
    # POST with single queries is GET's answer
    assert ok(client.post("/api/search", json={"uid": [p1], "k": 3})) == ok(
        client.get("/api/search?uid=" + p1 + "&k=3")
    )


def test_upload_equals_cli_image_query(client, store, tiles, tmp_path):
    from PIL import Image

    uid = uid_of(tiles, 1, 2)
    png = ok_bytes(client.get(f"/api/tiles/{uid}.png"))
    path = tmp_path / "q.png"
    path.write_bytes(png)
    expect = cli_json(["search", "--store", str(store), "--image", str(path), "-k", "5"], tmp_path)
    for kwargs in ({"files": {"file": ("q.png", png, "image/png")}},
                   {"content": png, "headers": {"content-type": "image/png"}}):  # fmt: skip
        got = ok(client.post("/api/search/image", params={"k": 5}, **kwargs))
        assert same({"query": expect["query"], "results": got["results"]}, expect)
        assert got["query"]["type"] == "image"
    # a JPEG of a larger image goes through the same size rule as --image
    big = np.asarray(Image.open(io.BytesIO(png)).resize((400, 300)))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=95)
    path2 = tmp_path / "q2.jpg"
    path2.write_bytes(buf.getvalue())
    expect = cli_json(["search", "--store", str(store), "--image", str(path2), "-k", "4"], tmp_path)
    got = ok(client.post("/api/search/image?k=4", files={"file": ("q2.jpg", buf.getvalue(), "image/jpeg")}))
    assert same({"query": expect["query"], "results": got["results"]}, expect)


def same_features(got, expect):
    assert len(got["features"]) == len(expect["features"]) > 0
    for g, e in zip(got["features"], expect["features"]):
        assert np.allclose(g["geometry"]["coordinates"], e["geometry"]["coordinates"], rtol=0, atol=1e-12)
        same({"results": [g["properties"]]}, {"results": [e["properties"]]})
    return True


def ok_bytes(resp):
    assert resp.status_code == 200, resp.text
    return resp.content


def test_export_geojson_equals_cli(client, store, tiles, tmp_path):
    a = uid_of(tiles, 0, 6)
    out = tmp_path / "hits.geojson"
    assert main(["search", "--store", str(store), "--uid", a, "-k", "9", "--geojson", str(out)]) == 0
    expect = json.loads(out.read_text())
    resp = client.get("/api/export.geojson", params={"uid": a, "k": 9})
    assert resp.headers["content-type"].startswith("application/geo+json")
    assert "attachment" in resp.headers["content-disposition"]
    assert same_features(ok(resp), expect)
    body = {"positives": [a], "negatives": [uid_of(tiles, 1)], "k": 6}
    out2 = tmp_path / "ex.geojson"
    assert main(["search", "--store", str(store), "--positive", a, "--negative", uid_of(tiles, 1), "-k", "6",
                 "--geojson", str(out2)]) == 0  # fmt: skip
    assert same_features(ok(client.post("/api/export.geojson", json=body)), json.loads(out2.read_text()))


def test_footprints_are_the_windows_through_each_images_transform(client, tiles, store):
    import rasterio
    from rasterio.warp import transform as warp

    a = uid_of(tiles, 0, 4)
    doc = ok(client.get("/api/search", params={"uid": a, "k": 5, "footprints": True}))
    feats = doc["footprints"]["features"]
    assert len(feats) == 1 + sum(r["lon"] is not None for r in doc["results"])  # none for images without a CRS
    doc = ok(client.get("/api/search", params={"uid": a, "k": 5, "footprints": True, "images": "?.tif"}))  # a, b
    feats = doc["footprints"]["features"]
    placed = [r for r in doc["results"] if r["lon"] is not None]  # results of images without a CRS have none
    assert len(placed) >= 3 and [f["properties"]["role"] for f in feats] == ["query"] + ["result"] * len(placed)
    i = np.flatnonzero(tiles["uid"] == int(a))[0]
    query = {"row": int(tiles["row"][i]), "col": int(tiles["col"][i]), "image_path": _PATHS[int(tiles["image"][i])]}
    for f, rec in zip(feats, [query] + placed, strict=True):
        with rasterio.open(rec["image_path"]) as src:
            x, y = src.transform * (rec["col"], rec["row"])
            x2, y2 = src.transform * (rec["col"] + 256, rec["row"] + 256)
            lon, lat = warp(src.crs, "EPSG:4326", [x, x2], [y, y2])
        ring = np.array(f["geometry"]["coordinates"][0])
        assert np.allclose([ring[:, 0].min(), ring[:, 0].max()], sorted(lon), atol=1e-9)
        assert np.allclose([ring[:, 1].min(), ring[:, 1].max()], sorted(lat), atol=1e-9)


_PATHS: dict[int, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _paths(store):
    ds = open_store(store)
    _PATHS.update({i: str(p) for i, p in enumerate(ds["image_path"].values)})


# ---- the store and its pixels -----------------------------------------------------------------


def test_info_and_images(client, store, tiles):
    import rasterio
    from rasterio.warp import transform_bounds

    from pipeline.summary import summarize

    info = ok(client.get("/api/info"))
    expect = summarize(store)
    for key in ("images", "tiles", "slots", "feature_dim", "lonlat_bounds", "model"):
        assert info[key] == expect[key], key
    assert info["server"]["index_in_memory"] is True
    assert info["server"]["images_without_crs"] == 2
    fc = ok(client.get("/api/images"))
    assert len(fc["features"]) == 6
    for f in fc["features"]:
        p = f["properties"]
        with rasterio.open(p["path"]) as src:
            assert (p["width"], p["height"]) == (src.width, src.height)
            kept = int((tiles["valid"] & (tiles["image"] == list(_PATHS.values()).index(p["path"]))).sum())
            assert p["tiles"] == kept <= grid.windows_per_axis(src.height) * grid.windows_per_axis(src.width)
            if src.crs is None:
                assert f["geometry"] is None and p["crs"] is None
                continue
            w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        ring = np.array(f["geometry"]["coordinates"][0])
        assert np.allclose([ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()], [w, s, e, n],
                           atol=1e-7)  # fmt: skip


def test_tile_png_is_the_window_read_by_rasterio(client, tiles):
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    for image in (0, 4):  # with and without a CRS
        uid = uid_of(tiles, image, 2)
        i = np.flatnonzero(tiles["uid"] == int(uid))[0]
        resp = client.get(f"/api/tiles/{uid}.png")
        assert resp.headers["content-type"] == "image/png"
        got = np.asarray(Image.open(io.BytesIO(resp.content))).transpose(2, 0, 1)
        with rasterio.open(_PATHS[image]) as src:
            want = src.read(window=Window(int(tiles["col"][i]), int(tiles["row"][i]), 256, 256))
        assert np.array_equal(got, want)
        small = Image.open(io.BytesIO(ok_bytes(client.get(f"/api/tiles/{uid}.png?size=64"))))
        assert small.size == (64, 64)


def test_basemap_tile_shows_the_image_where_it_lies(client, tmp_path):
    """A quadrant image: the XYZ tile over each quadrant's centre has that quadrant's colour,
    and a tile far away is transparent."""
    import morecantile
    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    data = np.zeros((3, 512, 512), np.uint8)
    for q, c in enumerate(colours):
        r, cc = divmod(q, 2)
        data[:, r * 256 : (r + 1) * 256, cc * 256 : (cc + 1) * 256] = np.array(c, np.uint8)[:, None, None]
    write_tif(tmp_path / "quad.tif", data, transform=(1.0, 0, 500000.0, 0, -1.0, 3300000.0))
    path = tmp_path / "quad.zarr"
    assert main(["ingest", str(tmp_path / "quad.tif"), "--store", str(path), "--model", "probe",
                 "--no-progress"]) == 0  # fmt: skip
    svc = Service.open(str(path))
    try:
        c = TestClient(create_app(svc))
        from rasterio.warp import transform as warp

        tms = morecantile.tms.get("WebMercatorQuad")
        for q, colour in enumerate(colours):
            r, cc = divmod(q, 2)
            lon, lat = warp("EPSG:32617", "EPSG:4326", [500000.0 + cc * 256 + 128], [3300000.0 - r * 256 - 128])
            t = tms.tile(lon[0], lat[0], 19)  # ~0.3 m per px: the tile lies inside the quadrant
            rgba = np.asarray(Image.open(io.BytesIO(ok_bytes(c.get(f"/tiles/{t.z}/{t.x}/{t.y}.png")))).convert("RGBA"))
            x, y = tms.xy(lon[0], lat[0])
            b = tms.xy_bounds(t)
            px, py = int((x - b.left) / (b.right - b.left) * 256), int((b.top - y) / (b.top - b.bottom) * 256)
            assert rgba[py, px, 3] == 255 and np.abs(rgba[py, px, :3].astype(int) - colour).max() <= 2, q
        far = np.asarray(Image.open(io.BytesIO(ok_bytes(c.get("/tiles/5/1/1.png")))).convert("RGBA"))
        assert far[..., 3].max() == 0
        assert c.get("/tiles/30/0/0.png").status_code == 404
        assert c.get("/tiles/2/9/0.png").status_code == 404
    finally:
        svc.close()


def test_basemap_shows_the_latest_flight_on_top_or_the_flights_of_a_date_range(tmp_path):
    """Three flights over the same ground, each one colour: 2019 (red), 2021 (blue), undated
    (green, covering both and more), their file names sorting in the opposite order (image ids
    follow the names). Where they overlap, the plain map
    shows the 2021 flight; ``date=`` keeps only that range's flights (undated ones in none),
    transparent where they do not reach; a bad range is a 400 naming ``date``."""
    import morecantile
    from PIL import Image
    from rasterio.warp import transform as warp

    red, blue, green = (200, 30, 30), (30, 30, 200), (30, 200, 30)
    solid = lambda c, n: np.broadcast_to(np.array(c, np.uint8)[:, None, None], (3, n, n)).copy()  # noqa: E731
    src = tmp_path / "src"
    src.mkdir()
    write_tif(src / "c_2019.tif", solid(red, 512), transform=(1.0, 0, 500000.0, 0, -1.0, 3300000.0))
    write_tif(src / "b_2021.tif", solid(blue, 512), transform=(1.0, 0, 500256.0, 0, -1.0, 3300000.0))
    write_tif(src / "a_undated.tif", solid(green, 1024), transform=(1.0, 0, 499900.0, 0, -1.0, 3300100.0))
    (tmp_path / "d.csv").write_text("path,acquired\nc_2019.tif,2019-05-01\nb_2021.tif,2021-05-01\n")
    path = tmp_path / "flights.zarr"
    assert main(["ingest", str(src), "--store", str(path), "--model", "probe", "--weights", "random",
                 "--dates", str(tmp_path / "d.csv"), "--no-progress"]) == 0  # fmt: skip
    tms = morecantile.tms.get("WebMercatorQuad")

    def colour_at(c, x: float, y: float, date: str | None) -> tuple[int, ...] | None:
        lon, lat = warp("EPSG:32617", "EPSG:4326", [x], [y])
        t = tms.tile(lon[0], lat[0], 19)
        url = f"/tiles/{t.z}/{t.x}/{t.y}.png" + (f"?date={date}" if date else "")
        rgba = np.asarray(Image.open(io.BytesIO(ok_bytes(c.get(url)))).convert("RGBA")).astype(int)
        mx, my = tms.xy(lon[0], lat[0])
        b = tms.xy_bounds(t)
        px, py = int((mx - b.left) / (b.right - b.left) * 256), int((b.top - my) / (b.top - b.bottom) * 256)
        return None if rgba[py, px, 3] == 0 else tuple(rgba[py, px, :3])

    def near(got, want) -> bool:
        return got is not None and max(abs(g - w) for g, w in zip(got, want)) <= 2

    svc = Service.open(str(path))
    try:
        c = TestClient(create_app(svc))
        both, only_2019, only_undated = (500384.0, 3299744.0), (500100.0, 3299744.0), (499950.0, 3300050.0)
        assert near(colour_at(c, *both, None), blue)  # the latest flight on top
        assert near(colour_at(c, *only_2019, None), red)  # older flights where the latest is not
        assert near(colour_at(c, *only_undated, None), green)  # undated flights under every dated one
        assert near(colour_at(c, *both, "2019-01-01/2019-12-31"), red)
        assert near(colour_at(c, *both, "2020/"), blue)
        assert colour_at(c, *only_2019, "2020/") is None  # the 2021 flight does not reach there
        assert colour_at(c, *only_undated, "/2030") is None  # undated flights are in no range
        assert colour_at(c, *both, "1990/1991") is None  # no flight in the range: transparent
        bad = c.get("/tiles/19/0/0.png?date=2019-13-45/")
        assert bad.status_code == 400 and "date" in bad.json()["error"]
    finally:
        svc.close()


def test_preview_and_pixel_to_uid(client, tiles):
    from PIL import Image

    resp = client.get("/api/images/3/preview.png?max=256")
    im = Image.open(io.BytesIO(resp.content))
    factor = float(resp.headers["x-preview-factor"])
    assert max(im.size) == 256 and factor == pytest.approx(2.0)
    got = ok(client.get("/api/images/3/uid", params={"x": 300, "y": 140}))  # nearest centre: row 0/128, col 128+
    i = np.flatnonzero(tiles["uid"] == int(got["uid"]))[0]
    assert (tiles["image"][i], tiles["row"][i], tiles["col"][i]) == (3, got["row"], got["col"])
    centre = np.array([got["row"] + 128, got["col"] + 128])
    assert np.abs(centre - [140, 300]).max() <= 64


# ---- bad requests: 4xx, one line of JSON, and the server keeps serving -----------------------

BAD = [
    ("get", "/api/tiles/../../etc/passwd.png", {}, 404),
    ("get", "/api/tiles/%2e%2e%2f%2e%2e%2fetc%2fpasswd.png", {}, 404),
    ("get", "/api/tiles/%2Fetc%2Fpasswd.png", {}, 404),
    ("get", "/api/tiles/..%5C..%5Cwin.ini.png", {}, 400),
    ("get", "/api/tiles/12345678901234567890123.png", {}, 400),
    ("get", "/api/tiles/99999999999.png", {}, 404),  # a uid, but of no tile
    ("get", "/api/search", {"params": {"uid": "../../etc/passwd"}}, 400),
    ("get", "/api/search", {"params": {"uid": "/etc/passwd"}}, 400),
    ("get", "/api/search", {"params": {"uid": "5"}}, 400),  # unknown uid
    ("get", "/api/search", {"params": {"images": "/etc/passwd", "uid": "0"}}, 400),
    ("get", "/api/search", {"params": {"lonlat": "../../x"}}, 400),
    ("get", "/api/search", {"params": {"lonlat": "10,95"}}, 400),
    ("get", "/api/search", {"params": {"lonlat": "0,0"}}, 400),  # no tile there
    ("get", "/api/search", {}, 400),
    ("get", "/api/search", {"params": {"k": "abc", "uid": "0"}}, 400),
    ("get", "/api/search", {"params": {"k": "0"}}, 400),
    ("get", "/api/search", {"params": {"bbox": "1,2,3", "uid": "0"}}, 400),
    ("get", "/api/export.geojson", {"params": {"uid": "/etc/passwd"}}, 400),
    ("post", "/api/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ("post", "/api/search", {"json": {"positives": ["/etc/passwd"]}}, 400),
    ("post", "/api/search", {"json": {"positives": ["../a.tif"]}}, 400),
    ("post", "/api/search", {"json": {"uid": ["1"], "unknown": 1}}, 400),
    ("post", "/api/search", {"json": {"classifier": True}}, 400),
    ("post", "/api/search", {"json": [1, 2]}, 400),
    ("post", "/api/search", {"content": b"x" * (2 << 20), "headers": {"content-type": "application/json"}}, 413),
    ("post", "/api/search/image", {"content": b"GIF89a not really"}, 400),
    ("post", "/api/search/image", {"files": {"file": ("x.txt", b"hello", "text/plain")}}, 400),
    ("post", "/api/search/image", {"files": {"other": ("x.png", b"\x89PNG", "image/png")}}, 400),
    ("post", "/api/search/image", {"content": b"\x89PNG" + b"0" * (UPLOAD_LIMIT + 100_000)}, 413),
    ("post", "/api/search/image", {"content": b""}, 400),
    ("get", "/api/images/..%2F..%2Fetc/preview.png", {}, 404),
    ("get", "/api/images/9/preview.png", {}, 404),
    ("get", "/api/images/0/uid", {"params": {"x": "a", "y": "1"}}, 400),
    ("get", "/static/../pyproject.toml", {}, 404),
    ("get", "/static/%2e%2e/service.py", {}, 404),
    ("get", "/vendor/leaflet/..%2F..%2F..%2Fpackage.json", {}, 404),
    ("get", "/nowhere", {}, 404),
    ("delete", "/api/search", {}, 405),
]


@pytest.mark.parametrize("method,url,kwargs,status", BAD, ids=[f"{m} {u}" for m, u, _, _ in BAD])
def test_bad_request_is_a_json_4xx_and_the_next_request_works(client, tiles, method, url, kwargs, status):
    resp = getattr(client, method)(url, **kwargs) if method != "delete" else client.request("DELETE", url)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"]
    assert "Traceback" not in body["error"]
    uid = uid_of(tiles, 0)
    assert ok(client.get("/api/search", params={"uid": uid, "k": 2}))["results"]


def test_upload_over_the_limit_is_refused_while_it_streams(client):
    """No Content-Length (chunked): the cap applies as the body arrives."""

    def chunks():
        for _ in range(50):
            yield b"0" * 20_000  # 1 MB in all, over the 300 kB test cap

    resp = client.post("/api/search/image", content=chunks())
    assert resp.status_code == 413 and "limit" in resp.json()["error"]


def test_server_error_is_json_and_the_server_keeps_serving(service, monkeypatch):
    c = TestClient(create_app(service), raise_server_exceptions=False)

    def boom():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(service, "info", boom)
    resp = c.get("/api/info")
    assert resp.status_code == 500 and "disk on fire" in resp.json()["error"]
    monkeypatch.undo()
    assert ok(c.get("/api/info"))["tiles"] > 0


def test_token_bearer_and_cookie(service, tiles):
    c = TestClient(create_app(service, token="s3cret"))
    uid = uid_of(tiles, 0)
    for path in ("/api/info", f"/api/search?uid={uid}", "/openapi.json", "/", "/tiles/1/0/0.png", "/static/app.js"):
        resp = c.get(path)
        assert resp.status_code == 401 and "token" in resp.json()["error"], path
    assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/?token=wrong").status_code == 401
    assert ok(c.get("/api/info", headers={"Authorization": "Bearer s3cret"}))["tiles"] > 0
    resp = c.get("/?token=s3cret", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/"
    cookie = resp.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    c.cookies.set("aerial_search_token", "s3cret")
    assert ok(c.get(f"/api/search?uid={uid}&k=2"))["results"]


def test_no_cors_unless_asked(service):
    origin = {"Origin": "http://evil.example"}
    plain = TestClient(create_app(service)).get("/api/info", headers=origin)
    assert "access-control-allow-origin" not in plain.headers
    allowed = TestClient(create_app(service, cors_origins=["http://gis.example"]))
    assert allowed.get("/api/info", headers={"Origin": "http://gis.example"}).headers[
        "access-control-allow-origin"] == "http://gis.example"  # fmt: skip
    assert "access-control-allow-origin" not in allowed.get("/api/info", headers=origin).headers


def test_openapi_and_the_page_from_the_package(client):
    spec = ok(client.get("/openapi.json"))
    for path in ("/api/search", "/api/search/image", "/api/tiles/{uid}.png", "/api/images", "/api/export.geojson",
                 "/api/info", "/tiles/{z}/{x}/{y}.png"):  # fmt: skip
        assert path in spec["paths"], path
    params = {p["name"] for p in spec["paths"]["/api/search"]["get"]["parameters"]}
    assert {"uid", "lonlat", "k", "bbox", "images", "include_overlapping", "diverse", "max_distance"} <= params
    assert client.get("/docs").status_code == 404  # no Swagger UI: /openapi.json is the description
    page = client.get("/")
    srcs = [s for s in re.findall(r'(?:src|href)="([^"]+)"', page.text) if s != "#"]
    assert page.status_code == 200 and srcs and all(s.startswith("/static/") for s in srcs), srcs  # nothing from a CDN
    for src in srcs:
        assert client.get(src).status_code == 200, src


# ---- searches one at a time, single queries batched -------------------------------------------


def test_batcher_answers_waiting_queries_in_one_pass(service, tiles):
    """Queries that arrive while a search runs are answered together, each as if alone."""
    from pipeline.search import Filters, Queries
    from pipeline.serve.service import Settings

    index = service.index
    uids = [int(uid_of(tiles, i % 3, 2 + i)) for i in range(6)]
    alone = [index.search(index.queries_from_uids([u])[0], 5)[0] for u in uids]
    batcher = Batcher()
    gate = threading.Event()
    seen = []

    def runner(q: Queries, labels):
        seen.append(len(q))
        return index.search(q, 5, Filters(), labels=labels)

    blocker = threading.Thread(target=batcher.call, args=(gate.wait,))
    blocker.start()
    while not batcher._queue and batcher.passes == 0:
        time.sleep(0.01)
    out: dict[int, list] = {}
    threads = [
        threading.Thread(
            target=lambda j=j: out.__setitem__(
                j, batcher.search(Settings(5), *index.queries_from_uids([uids[j]]), runner)
            )
        )  # fmt: skip
        for j in range(len(uids))
    ]
    for t in threads:
        t.start()
    while len(batcher._queue) < len(uids):
        time.sleep(0.01)
    gate.set()
    for t in threads + [blocker]:
        t.join(30)
    assert seen == [len(uids)]  # one pass for all six
    for j, res in enumerate(alone):
        assert np.array_equal(out[j][0].uid, res.uid) and np.allclose(out[j][0].value, res.value)
    batcher.close()


def test_concurrent_requests_get_their_own_answers(client, tiles):
    uids = [uid_of(tiles, i % 3, 1 + i % 10) for i in range(12)]
    expect = {u: ok(client.get("/api/search", params={"uid": u, "k": 4})) for u in uids}
    got: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda u=u: got.__setitem__(u, client.get(
        "/api/search", params={"uid": u, "k": 4}).json())) for u in uids * 2]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(same(got[u], expect[u]) for u in uids)


# ---- the command -------------------------------------------------------------------------------


def start_serve(args, env=None, timeout=120):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})  # fmt: skip
    lines = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"serving (http://\S+?)/ ", line)
        if m:
            return proc, m.group(1), lines
    proc.kill()
    raise AssertionError("serve did not start: " + "".join(lines))


def test_serve_command_with_token_and_upload_limit(store, tiles, tmp_path):
    import httpx

    proc, url, lines = start_serve(
        [
            "--store",
            str(store),
            "--port",
            "0",
            "--token",
            "tok",
            "--max-upload-mb",
            "0.1",
            "--cors-origin",
            "http://gis.example",
            "--scheduler",
            "local",
            "--workers",
            "1",
            "--threads",
            "2",
            "--no-progress",
        ]
    )  # fmt: skip  (the index held in a LocalCluster's memory)
    try:
        assert not any("warning" in line for line in lines), lines
        assert httpx.get(url + "/api/info").status_code == 401
        auth = {"Authorization": "Bearer tok"}
        assert httpx.get(url + "/api/info", headers=auth).json()["server"]["max_upload_bytes"] == int(0.1 * (1 << 20))
        uid = uid_of(tiles, 0)
        doc = httpx.get(url + "/api/search", params={"uid": uid, "k": 3}, headers=auth).json()
        assert same(doc, cli_json(["search", "--store", str(store), "--uid", uid, "-k", "3"], tmp_path))
        big = httpx.post(url + "/api/search/image", content=b"0" * 200_000, headers=auth)
        assert big.status_code == 413
        resp = httpx.get(url + "/api/info", headers={**auth, "Origin": "http://gis.example"})
        assert resp.headers["access-control-allow-origin"] == "http://gis.example"
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_refuses_open_host_without_token_and_busy_port(store, capsys):
    assert main(["serve", "--store", str(store), "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert main(["serve", "--store", str(store), "--port", str(s.getsockname()[1])]) == 2
        assert "--port" in capsys.readouterr().err
    finally:
        s.close()
    assert main(["serve", "--store", str(store / "nope.zarr")]) == 2
    assert "nope.zarr" in capsys.readouterr().err


def test_serve_weights_and_device_flags(tmp_path):
    """--weights names a copy of the store's weights file for uploads (the store's own file is
    gone), and --device runs that model on the CPU; without the copy an upload says which flag."""
    import shutil

    import httpx
    import torch
    import torchvision

    torch.manual_seed(3)
    w = tmp_path / "net.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), w)  # a weights file: the subject
    img = write_tif(tmp_path / "e.tif", textured(512, 512, seed=104))
    path = tmp_path / "w.zarr"
    assert main(["ingest", str(img), "--store", str(path), "--model", "squeezenet1_1", "--weights", str(w),
                 "--no-progress"]) == 0  # fmt: skip
    copy = tmp_path / "copy" / "net.pth"
    copy.parent.mkdir()
    shutil.copy(w, copy)
    w.unlink()
    tiles = {n: open_store(path)[n].values for n in ("uid", "valid", "image")}
    uid = uid_of(tiles, 0, 1)
    without = Service.open(str(path))  # no copy named: the upload says which flag (in process: no second server)
    try:
        client = TestClient(create_app(without))
        png = client.get(f"/api/tiles/{uid}.png").content
        resp = client.post("/api/search/image?include_overlapping=true&k=1", content=png)
        assert resp.status_code == 400 and "--weights" in resp.json()["error"], resp.text
    finally:
        without.close()
    proc, url, _ = start_serve(["--store", str(path), "--port", "0", "--weights", str(copy), "--device", "cpu"])
    try:
        assert httpx.get(f"{url}/api/tiles/{uid}.png").content == png
        resp = httpx.post(url + "/api/search/image?include_overlapping=true&k=1", content=png, timeout=60)
        assert resp.status_code == 200, resp.text
        best = resp.json()["results"][0]
        assert best["uid"] == uid and best["distance"] < 1e-3
    finally:
        proc.terminate()
        proc.wait(30)


def test_served_connections_send_without_waiting_for_acks():
    """The socket `serve` listens on names TCP, so asyncio turns Nagle's algorithm off on every
    connection it accepts (TCP_NODELAY): without it each response on a kept-alive connection (a
    browser's, an API client's) waited ~40 ms for the client's delayed ACK. Read back from the
    accepted connection's socket, under the same asyncio server machinery uvicorn uses."""
    import asyncio
    import socket

    from pipeline.commands.serve import bind

    sock = bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    seen = []

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def run():
        server = await asyncio.get_running_loop().create_server(Proto, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(run())
    assert seen and seen[0] != 0
