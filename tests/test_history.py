"""``aerial-search history``: a place through time. The windows it picks against a brute force
over every grid window of every image (rasterio places the point in each image's pixels), the
order by acquisition time, the distances against NumPy over the stored fingerprints (also after
``postprocess --method l2``), ``--uid``, ``--date``, the sheet's cells against the source pixels,
GeoJSON, the HTTP API, and the errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline.cli import main
from pipeline.store import open_store

PX = 0.5
X0, Y0 = 400000.0, 3300000.0
PROBE = ["--model", "probe", "--weights", "random", "--chunk-px", "512", "--chunk-tiles", "8", "--no-progress"]
PLACE_XY = (X0 + 300.0, Y0 - 250.0)  # metres, EPSG:32617: pixel (600, 500) of the first flight


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """The same ground flown four times (2021 with a roof pasted over the place, 2019 with the
    georeference shifted 7 and -5 m, one undated), an image elsewhere and one without a CRS;
    ingested through the CLI. Returns (root, src, store, lon, lat)."""
    from rasterio.warp import transform as warp

    root = tmp_path_factory.mktemp("history")
    src = root / "src"
    src.mkdir()
    base = textured(1024, 1024, seed=91)
    roof = textured(1024, 1024, seed=92)
    write_tif(src / "a_2018.tif", base, transform=(PX, 0, X0, 0, -PX, Y0))
    write_tif(src / "b_2019.tif", base, transform=(PX, 0, X0 + 7, 0, -PX, Y0 - 5))
    built = base.copy()
    built[:, 440:560, 540:660] = roof[:, 440:560, 540:660]
    write_tif(src / "c_2021.tif", built, transform=(PX, 0, X0, 0, -PX, Y0))
    write_tif(src / "d_undated.tif", base, transform=(PX, 0, X0 + 3, 0, -PX, Y0))
    write_tif(src / "e_far.tif", textured(512, 512, seed=93), transform=(PX, 0, X0 + 50000, 0, -PX, Y0))
    write_tif(src / "f_nocrs.tif", textured(512, 512, seed=94), crs=None, transform=None)
    (root / "d.csv").write_text("path,acquired\na_2018.tif,2018-05-01\nb_2019.tif,2019-05-01\n"
                                "c_2021.tif,2021-05-01\ne_far.tif,2021-05-01\nf_nocrs.tif,2021-05-01\n")  # fmt: skip
    path = root / "s.zarr"
    assert main(["ingest", str(src), "--store", str(path), *PROBE, "--dates", str(root / "d.csv")]) == 0
    lon, lat = warp("EPSG:32617", "EPSG:4326", [PLACE_XY[0]], [PLACE_XY[1]])
    return root, src, path, float(lon[0]), float(lat[0])


def brute_windows(src, store) -> dict[str, tuple[int, int]]:
    """Per image covering the place: the valid grid window containing it whose centre is nearest
    (rasterio's inverse affine; validity from the store), over every window of the image."""
    import rasterio

    ds = open_store(store)
    valid = {(int(i), int(r), int(c)) for i, r, c, v in zip(ds["image"].values, ds["row"].values, ds["col"].values,
                                                           ds["valid"].values) if v}  # fmt: skip
    ids = {str(p).rsplit("/", 1)[-1]: i for i, p in enumerate(ds["image_path"].values)}
    out = {}
    for name, i in ids.items():
        with rasterio.open(src / name) as f:
            if f.crs is None:
                continue
            x, y = ~f.transform * PLACE_XY
            best = None
            for r in range(0, f.height // 256 * 256 - 255, 128):
                for c in range(0, f.width // 256 * 256 - 255, 128):
                    if c <= x <= c + 256 and r <= y <= r + 256 and (i, r, c) in valid:
                        d = (r + 128 - y) ** 2 + (c + 128 - x) ** 2
                        if best is None or d < best[0]:
                            best = (d, (r, c))
            if best is not None:
                out[name] = best[1]
    return out


def fingerprints(store) -> dict[int, np.ndarray]:
    ds = open_store(store)
    v = ds["valid"].values
    return {int(u): f for u, f in zip(ds["uid"].values[v], ds["fingerprint"].values[v].astype(np.float64))}


def test_history_picks_the_window_over_the_place_in_every_image_in_time_order(place, tmp_path, capsys):
    from PIL import Image

    from pipeline.render import GAP, LABEL_H, read_tile

    root, src, store, lon, lat = place
    out, gj, png = tmp_path / "h.json", tmp_path / "h.geojson", tmp_path / "h.png"
    capsys.readouterr()
    assert main(["history", "--store", str(store), f"--lonlat={lon},{lat}", "--json", str(out), "--geojson", str(gj),
                 "--sheet", str(png)]) == 0  # fmt: skip
    assert "history of" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    recs = doc["results"]
    names = [r["image_path"].rsplit("/", 1)[-1] for r in recs]
    assert names == ["a_2018.tif", "b_2019.tif", "c_2021.tif", "d_undated.tif"]  # by date, undated last
    assert [r["acquired"] for r in recs] == ["2018-05-01T00:00:00Z", "2019-05-01T00:00:00Z", "2021-05-01T00:00:00Z", None]
    expect = brute_windows(src, store)
    assert set(expect) == set(names)  # e_far misses the place, f_nocrs has no place on the ground
    assert {n: (r["row"], r["col"]) for n, r in zip(names, recs)} == expect
    fp = fingerprints(store)
    x = [fp[int(r["uid"])] for r in recs]
    assert [r["distance"] for r in recs] == pytest.approx([0.0] + [np.linalg.norm(b - a) for a, b in zip(x, x[1:])], rel=1e-9)
    assert [r["distance_to_first"] for r in recs] == pytest.approx([np.linalg.norm(v - x[0]) for v in x], rel=1e-9)
    # 2019's georeference is 14 px off, but the place still falls in the same window of the same
    # pixels: nothing changed; the roof came in 2021; the undated flight has the old ground again
    assert recs[1]["distance"] == 0 and recs[2]["distance"] > 0 and recs[3]["distance"] == pytest.approx(recs[2]["distance"])
    assert recs[3]["distance_to_first"] == 0
    assert doc["query"]["type"] == "history" and doc["query"]["images"] == 4
    assert [f["properties"]["uid"] for f in json.loads(gj.read_text())["features"]] == [r["uid"] for r in recs]
    img = np.asarray(Image.open(png).convert("RGB"))
    for i, r in enumerate(recs):  # the sheet: each window's own pixels, oldest first
        y, xx = GAP + LABEL_H, GAP + i * (256 + GAP)
        np.testing.assert_array_equal(img[y : y + 256, xx : xx + 256].transpose(2, 0, 1), read_tile(r["image_path"], r["row"], r["col"]))

    # --uid: the place is that tile's centre; --date keeps a range
    first = recs[0]["uid"]
    assert main(["history", "--store", str(store), "--uid", first, "--date", "2019/", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["image_path"].rsplit("/", 1)[-1] for r in doc["results"]] == ["b_2019.tif", "c_2021.tif"]
    assert doc["query"]["date"]["kept"] == 4 and doc["query"]["date"]["undated"] == 1  # e_far and f_nocrs kept, neither covers it


def test_history_distances_follow_the_post_processing_and_errors_are_one_line(place, tmp_path, capsys):
    root, src, store, lon, lat = place
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    assert main(["postprocess", "--store", str(copy), "--method", "l2"]) == 0
    out = tmp_path / "h.json"
    assert main(["history", "--store", str(copy), f"--lonlat={lon},{lat}", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["results"]
    fp = fingerprints(copy)
    x = [fp[int(r["uid"])] / np.linalg.norm(fp[int(r["uid"])]) for r in recs]
    assert [r["distance"] for r in recs[1:]] == pytest.approx([np.linalg.norm(b - a) for a, b in zip(x, x[1:])], rel=1e-5)
    assert main(["history", "--store", str(copy), f"--lonlat={lon},{lat}", "--raw", "--json", str(out)]) == 0
    raw = json.loads(out.read_text())["results"]
    y = [fp[int(r["uid"])] for r in raw]
    assert raw[2]["distance"] == pytest.approx(np.linalg.norm(y[2] - y[1]), rel=1e-9)

    capsys.readouterr()
    assert main(["history", "--store", str(store), "--lonlat", "10,10"]) == 2
    err = capsys.readouterr().err
    assert "no searchable image covers lon 10.0, lat 10.0" in err and len(err.strip().splitlines()) == 1
    ds = open_store(store)
    nocrs = [i for i, p in enumerate(ds["image_path"].values) if str(p).endswith("f_nocrs.tif")][0]
    uid = str(int(ds["uid"].values[np.flatnonzero((ds["image"].values == nocrs) & ds["valid"].values)[0]]))
    assert main(["history", "--store", str(store), "--uid", uid]) == 2
    assert "has no CRS" in capsys.readouterr().err
    assert main(["history", "--store", str(store), "--uid", "banana"]) == 2
    assert main(["history", "--store", str(store), f"--lonlat={lon},{lat}", "--date", "1990/1991"]) == 2
    assert "no image acquired in that range" in capsys.readouterr().err


def test_http_api_history_equals_the_command_line(place, tmp_path):
    pytest.importorskip("fastapi", reason="serve needs fastapi: pip install -e .")
    from fastapi.testclient import TestClient

    from pipeline.serve.app import create_app
    from pipeline.serve.service import Service

    root, src, store, lon, lat = place
    out = tmp_path / "h.json"
    assert main(["history", "--store", str(store), f"--lonlat={lon},{lat}", "--json", str(out)]) == 0
    cli = json.loads(out.read_text())
    svc = Service.open(str(store))
    try:
        c = TestClient(create_app(svc))
        doc = c.get("/api/history", params={"lonlat": f"{lon},{lat}", "footprints": "true"}).json()
        assert doc["results"] == cli["results"]
        assert [f["properties"]["uid"] for f in doc["footprints"]["features"]] == [r["uid"] for r in cli["results"]]
        by_uid = c.get("/api/history", params={"uid": cli["results"][2]["uid"], "date": "2019/"}).json()
        assert [r["image_path"].rsplit("/", 1)[-1] for r in by_uid["results"]] == ["b_2019.tif", "c_2021.tif"]
        for params in ({}, {"lonlat": f"{lon},{lat}", "uid": "1"}, {"lonlat": "10,10"}, {"lonlat": "x"},
                       {"lonlat": f"{lon},{lat}", "date": "2019-13/"}):  # fmt: skip
            bad = c.get("/api/history", params=params)
            assert bad.status_code == 400 and bad.json()["error"], params
        assert c.get("/api/search", params={"lonlat": f"{lon},{lat}"}).status_code == 200  # still serving
    finally:
        svc.close()
