"""``aerial-search changes`` (issue 26): two dated flights of the same ground, the second a copy of
the first with patches pasted from another image at known windows and its georeference shifted
by a few metres. The CLI's top N are exactly the windows touching the patches; the pairing equals
a brute force over every window pair with shapely (also for a rotated georeference); JSON,
GeoJSON and the change maps are checked against rasterio-computed footprints and NumPy
distances of the stored fingerprints."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline.cli import main
from pipeline.store import open_store

PX = 0.5
X0, Y0 = 400000.0, 3300000.0
SHIFT = (7.0, -5.0)  # metres: the second flight's georeference, off by 14 and 10 pixels
PATCHES = [(300, 420, 600, 700), (40, 100, 40, 90), (880, 1000, 880, 1010)]  # rows r0:r1, cols c0:c1 of after.tif
PROBE = ["--model", "probe", "--weights", "random", "--chunk-px", "512", "--chunk-tiles", "8", "--no-progress"]


def touching(patches, size: int) -> set[tuple[int, int]]:
    """(row, col) of the grid windows of an image of ``size`` px that touch any patch."""
    out = set()
    for r0, r1, c0, c1 in patches:
        for r in range(0, size - 255, 128):
            for c in range(0, size - 255, 128):
                if r < r1 and r + 256 > r0 and c < c1 and c + 256 > c0:
                    out.add((r, c))
    return out


@pytest.fixture(scope="module")
def flights2(tmp_path_factory):
    root = tmp_path_factory.mktemp("change")
    src = root / "src"
    src.mkdir()
    base = textured(1024, 1024, seed=61)
    other = textured(1024, 1024, seed=62)
    write_tif(src / "before.tif", base, transform=(PX, 0, X0, 0, -PX, Y0))
    after = base.copy()
    for r0, r1, c0, c1 in PATCHES:
        after[:, r0:r1, c0:c1] = other[:, r0:r1, c0:c1]
    write_tif(src / "after.tif", after, transform=(PX, 0, X0 + SHIFT[0], 0, -PX, Y0 + SHIFT[1]))
    write_tif(src / "far.tif", textured(512, 512, seed=63), transform=(PX, 0, X0 + 50000, 0, -PX, Y0))  # no partner
    (root / "dates.csv").write_text("path,acquired\nbefore.tif,2019-06-01\nafter.tif,2021-06-01\nfar.tif,2021-07-01\n")
    path = root / "s.zarr"
    assert main(["ingest", str(src), "--store", str(path), *PROBE, "--dates", str(root / "dates.csv")]) == 0
    return root, src, path


def footprint(transform, row: int, col: int, crs_from: str):
    """A window's corners (lon, lat) computed by rasterio: its affine, then rasterio.warp."""
    from rasterio.warp import transform as warp

    xs, ys = [], []
    for c, r in ((col, row), (col + 256, row), (col + 256, row + 256), (col, row + 256), (col, row)):
        x, y = transform * (c, r)
        xs.append(x)
        ys.append(y)
    lon, lat = warp(crs_from, "EPSG:4326", xs, ys)
    return np.column_stack([lon, lat])


def test_changes_ranks_exactly_the_pasted_windows_first(flights2, tmp_path, capsys):
    import rasterio
    from shapely.geometry import Polygon

    root, src, path = flights2
    expect = touching(PATCHES, 1024)
    n = len(expect)
    out, gj = tmp_path / "c.json", tmp_path / "c.geojson"
    capsys.readouterr()
    assert main(["changes", "--store", str(path), "--before", "2019-01-01/2019-12-31", "--after", "2021-01-01/",
                 "-k", str(n), "--json", str(out), "--geojson", str(gj)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "after 2021-01-01/ against before 2019-01-01/2019-12-31" in text
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert {(r["row"], r["col"]) for r in res} == expect and len(res) == n
    assert all(r["image_path"].endswith("after.tif") and r["before_image_path"].endswith("before.tif") for r in res)
    assert all(r["acquired"] == "2021-06-01T00:00:00Z" and r["before_acquired"] == "2019-06-01T00:00:00Z" for r in res)
    d = [r["distance"] for r in res]
    assert d == sorted(d, reverse=True) and min(d) > 0
    # every distance against NumPy over the stored fingerprints of the two windows
    ds = open_store(path)
    v = ds["valid"].values  # padding slots hold uid 0 too
    fp = {int(u): f for u, f in zip(ds["uid"].values[v], ds["fingerprint"].values[v].astype(np.float64))}
    for r in res:
        assert r["distance"] == pytest.approx(np.linalg.norm(fp[int(r["uid"])] - fp[int(r["before_uid"])]), rel=1e-9)
    # footprints: GeoJSON polygons are the after windows' corners as rasterio computes them, and
    # each before window covers at least half of its after window (in the images' CRS)
    feats = json.loads(gj.read_text())["features"]
    assert [f["properties"]["uid"] for f in feats] == [r["uid"] for r in res]
    with rasterio.open(src / "after.tif") as fa, rasterio.open(src / "before.tif") as fb:
        for f, r in zip(feats, res):
            for key in ("before_uid", "before_image_path", "before_row", "before_col", "before_acquired", "distance"):
                assert f["properties"][key] == r[key], key
            np.testing.assert_allclose(np.array(f["geometry"]["coordinates"][0]),
                                       footprint(fa.transform, r["row"], r["col"], fa.crs), atol=1e-9)  # fmt: skip
            wa = Polygon([fa.transform * (c, rr) for c, rr in ((r["col"], r["row"]), (r["col"] + 256, r["row"]),
                                                                (r["col"] + 256, r["row"] + 256), (r["col"], r["row"] + 256))])
            bc, br = r["before_col"], r["before_row"]
            wb = Polygon([fb.transform * (c, rr) for c, rr in ((bc, br), (bc + 256, br), (bc + 256, br + 256), (bc, br + 256))])
            assert wa.intersection(wb).area >= 0.5 * wa.area
            assert r["overlap"] == pytest.approx(wa.intersection(wb).area / wa.area, abs=1e-4)


def brute_pairs(src, after: str, befores: list[str]) -> dict[tuple[int, int], tuple[str, int, int]]:
    """The best-overlapping before window (>= 50 % of the smaller) of every after window, over every
    window pair, with shapely in the after image's CRS (rasterio.warp for other CRSs)."""
    import rasterio
    from rasterio.warp import transform as warp
    from shapely.geometry import Polygon

    def windows(ds):
        h, w = ds.height // 256 * 256, ds.width // 256 * 256
        return [(r, c) for r in range(0, h - 255, 128) for c in range(0, w - 255, 128)]

    def poly(ds, r, c, crs):
        pts = [ds.transform * (cc, rr) for cc, rr in ((c, r), (c + 256, r), (c + 256, r + 256), (c, r + 256))]
        if ds.crs != crs:
            xs, ys = warp(ds.crs, crs, [p[0] for p in pts], [p[1] for p in pts])
            pts = list(zip(xs, ys))
        return Polygon(pts)

    out = {}
    with rasterio.open(src / after) as fa:
        polys = {name: None for name in befores}
        for name in befores:
            with rasterio.open(src / name) as fb:
                polys[name] = [(r, c, poly(fb, r, c, fa.crs)) for r, c in windows(fb)]
        for r, c in windows(fa):
            pa = poly(fa, r, c, fa.crs)
            best = (0.0, None)
            for name in befores:
                for br, bc, pb in polys[name]:
                    if not pa.intersects(pb):
                        continue
                    frac = pa.intersection(pb).area / min(pa.area, pb.area)
                    if frac > best[0] + 1e-9:
                        best = (frac, (name, br, bc))
            if best[0] >= 0.5 - 1e-9:
                out[(r, c)] = best[1]
    return out


def pairing_of(path):
    from pipeline.changes import pair_windows
    from pipeline.dates import DateRange
    from pipeline.search import SearchIndex

    index = SearchIndex.open(str(path))
    after, _ = index.image_ids_acquired(DateRange.parse("2021"))
    before, _ = index.image_ids_acquired(DateRange.parse("2019"))
    pairing = pair_windows(index, after, before)
    ds = index.ds
    got = {}
    assert (np.diff(pairing.slots) > 0).all()  # one entry per paired after window, ascending
    partner, overlap = pairing.partner_of(np.arange(ds.sizes["tile"]))
    assert np.array_equal(np.flatnonzero(partner >= 0), pairing.slots) and (overlap[partner < 0] == 0).all()
    for s, b in zip(pairing.slots, pairing.partner):
        got[(int(ds["row"].values[s]), int(ds["col"].values[s]), int(ds["image"].values[s]))] = (
            str(index.image_paths[int(ds["image"].values[b])]).rsplit("/", 1)[-1],
            int(ds["row"].values[b]), int(ds["col"].values[b]))  # fmt: skip
    return index, got


def test_pairing_equals_a_brute_force_over_every_window_pair(flights2):
    _, src, path = flights2
    index, got = pairing_of(path)
    a = [i for i, p in enumerate(index.image_paths) if str(p).endswith("after.tif")][0]
    expect = brute_pairs(src, "after.tif", ["before.tif"])
    assert {(r, c): v for (r, c, i), v in got.items() if i == a} == expect
    assert len(expect) == 49  # every after window: the shift is small
    assert not any(i != a for (_, _, i) in got)  # far.tif meets no before image


def test_pairing_through_a_rotated_and_reprojected_georeference(tmp_path):
    """The after flight in another CRS (EPSG:3857) with a rotated, coarser pixel grid: the general
    path (pyproj, shapely intersections) against the brute force."""
    import math

    from pyproj import Transformer

    src = tmp_path / "src"
    src.mkdir()
    write_tif(src / "before.tif", textured(768, 768, seed=71), transform=(PX, 0, X0, 0, -PX, Y0))
    x, y = Transformer.from_crs("EPSG:32617", "EPSG:3857", always_xy=True).transform(X0 + 40, Y0 - 30)
    th, s = math.radians(12), 0.62  # EPSG:3857 metres are ~1.15 ground metres here
    write_tif(src / "after.tif", textured(512, 512, seed=72), crs="EPSG:3857",
              transform=(s * math.cos(th), -s * math.sin(th), x, -s * math.sin(th), -s * math.cos(th), y))  # fmt: skip
    (tmp_path / "d.csv").write_text("path,acquired\nbefore.tif,2019-01-01\nafter.tif,2021-01-01\n")
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(src), "--store", str(path), *PROBE, "--dates", str(tmp_path / "d.csv")]) == 0
    index, got = pairing_of(path)
    expect = brute_pairs(src, "after.tif", ["before.tif"])
    assert len(expect) >= 4, expect  # the rotated grid still meets the before grid at 50 % in places
    assert {(r, c): v for (r, c, _), v in got.items()} == expect


def test_threshold_heatmap_bbox_post_processing_and_images_without_crs(flights2, tmp_path, capsys):
    import rasterio

    root, src, path = flights2
    store = tmp_path / "s.zarr"
    shutil.copytree(path, store)
    assert main(["postprocess", "--store", str(store), "--method", "l2"]) == 0
    ds = open_store(store)
    v = ds["valid"].values
    fp = {int(u): f / max(np.linalg.norm(f), 1e-12) for u, f in zip(ds["uid"].values[v],
                                                                      ds["fingerprint"].values[v].astype(np.float64))}  # fmt: skip
    out = tmp_path / "all.json"
    assert main(["changes", "--store", str(store), "--before", "2019", "--after", "2021", "-k", "1000",
                 "--json", str(out), "--heatmap", str(tmp_path / "maps")]) == 0  # fmt: skip
    every = json.loads(out.read_text())["results"]
    assert len(every) == 49
    dist = {r["uid"]: r["distance"] for r in every}
    for r in every:  # after the store's post-processing (L2), as search ranks
        assert r["distance"] == pytest.approx(np.linalg.norm(fp[int(r["uid"])] - fp[int(r["before_uid"])]), abs=1e-6)
    ranked = sorted(dist.values(), reverse=True)
    cut = (ranked[5] + ranked[6]) / 2  # six pairs past it (a cut on a value itself would test float rounding)
    raw_fp = {int(u): f for u, f in zip(ds["uid"].values[v], ds["fingerprint"].values[v].astype(np.float64))}
    assert main(["changes", "--store", str(store), "--before", "2019", "--after", "2021", "-k", "3", "--raw",
                 "--json", str(tmp_path / "raw.json")]) == 0  # fmt: skip
    for r in json.loads((tmp_path / "raw.json").read_text())["results"]:  # --raw: the fingerprints as stored
        assert r["distance"] == pytest.approx(np.linalg.norm(raw_fp[int(r["uid"])] - raw_fp[int(r["before_uid"])]), rel=1e-9)
    assert main(["changes", "--store", str(store), "--before", "2019", "--after", "2021", "--min-distance", str(cut),
                 "--limit", "4", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["total_passed"] == sum(v >= cut for v in dist.values()) and len(doc["results"]) == 4
    assert [r["uid"] for r in doc["results"]] == [r["uid"] for r in every[:4]]
    with rasterio.open(tmp_path / "maps" / "after.tif") as m:
        values = m.read(1)
    for r in every:
        assert values[r["row"] // 128, r["col"] // 128] == pytest.approx(r["distance"], rel=1e-5)
    assert (tmp_path / "maps" / "after.png").is_file()
    with rasterio.open(tmp_path / "maps" / "far.tif") as m:  # an after image without a partner: all NaN
        assert np.isnan(m.read(1)).all()
    # bbox: only after windows centred inside
    lon, lat = ds["lon"].values, ds["lat"].values
    img = ds["image"].values
    a = int(img[[i for i, u in enumerate(ds["uid"].values) if str(int(u)) == every[0]["uid"]][0]])
    sel = img == a
    w, e = float(np.min(lon[sel])), float(np.median(lon[sel]))
    s_, n = float(np.min(lat[sel])), float(np.max(lat[sel]))
    assert main(["changes", "--store", str(store), "--before", "2019", "--after", "2021", "-k", "1000",
                 f"--bbox={w},{s_},{e},{n}", "--json", str(out)]) == 0  # fmt: skip
    inside = json.loads(out.read_text())["results"]
    assert inside and all(w <= r["lon"] <= e for r in inside) and len(inside) < 49
    # an image without a CRS cannot be placed: a warning, and it is left out
    nocrs = tmp_path / "nocrs"
    nocrs.mkdir()
    write_tif(nocrs / "x.tif", textured(512, 512, seed=64), crs=None, transform=None)
    (tmp_path / "x.csv").write_text("path,acquired\nx.tif,2021-03-01\n")
    assert main(["ingest", str(nocrs), "--store", str(store), *PROBE, "--dates", str(tmp_path / "x.csv")]) == 0
    capsys.readouterr()
    assert main(["changes", "--store", str(store), "--before", "2019", "--after", "2021", "--json", str(out)]) == 0
    assert "1 image(s) without a CRS cannot be paired" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["results"]) == 49


def test_geoparquet_and_dissolved_change_areas(flights2, tmp_path):
    """``--geoparquet`` holds the JSON's pairs (acquisition times as UTC timestamps); ``--dissolve``
    merges the changed windows into areas: as many as the connected parts of the windows'
    polygons (computed here from rasterio's corners), each with its windows' count and largest
    distance."""
    import geopandas as gpd
    import pandas as pd
    import rasterio
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    _, src, path = flights2
    n = len(touching(PATCHES, 1024))
    js, pq, dj = tmp_path / "c.json", tmp_path / "c.parquet", tmp_path / "d.geojson"
    assert main(["changes", "--store", str(path), "--before", "2019", "--after", "2021", "-k", str(n),
                 "--json", str(js), "--geoparquet", str(pq)]) == 0  # fmt: skip
    res = json.loads(js.read_text())["results"]
    gdf = gpd.read_parquet(pq)
    assert list(gdf["uid"]) == [r["uid"] for r in res] and list(gdf["before_uid"]) == [r["before_uid"] for r in res]
    assert list(gdf["distance"]) == pytest.approx([r["distance"] for r in res])
    for col in ("acquired", "before_acquired"):
        assert str(gdf[col].dtype).startswith("datetime64") and str(gdf[col].dt.tz) == "UTC"
        assert list(gdf[col]) == [pd.Timestamp(r[col]) for r in res]
    assert main(["changes", "--store", str(path), "--before", "2019", "--after", "2021", "-k", str(n),
                 "--geojson", str(dj), "--dissolve"]) == 0  # fmt: skip
    areas = json.loads(dj.read_text())["features"]
    with rasterio.open(src / "after.tif") as fa:
        polys = [Polygon(footprint(fa.transform, r["row"], r["col"], fa.crs)) for r in res]
    parts = list(getattr(unary_union(polys), "geoms", [unary_union(polys)]))
    assert len(areas) == len(parts) >= 2
    assert sum(a["properties"]["hits"] for a in areas) == n
    for a in areas:
        shape = Polygon(a["geometry"]["coordinates"][0])
        inside = [r["distance"] for r, p in zip(res, polys) if p.representative_point().within(shape)]
        assert a["properties"]["hits"] == len(inside)
        assert a["properties"]["best_distance"] == pytest.approx(max(inside))
        assert a["properties"]["area_m2"] > 256 * 256 * PX * PX * 0.99  # at least one window of ground


def test_robust_score_ranks_a_local_change_above_a_flight_that_changed_everywhere(tmp_path, capsys):
    """Place A flown again brighter and flatter everywhere (light, season), place B with a small
    patch: the plain distance ranks A's windows first; ``--score robust`` ranks exactly the
    patch's 4 windows first, its values equal to (d - median) / max(1.4826 MAD, 1e-3 max d) of
    each image pair's distances computed here from the stored fingerprints."""
    src = tmp_path / "src"
    src.mkdir()
    a, b, other = textured(1024, 1024, seed=101), textured(1024, 1024, seed=102), textured(1024, 1024, seed=103)
    write_tif(src / "a_before.tif", a, transform=(PX, 0, X0, 0, -PX, Y0))
    write_tif(src / "a_after.tif", np.clip(a * 0.8 + 50, 0, 255).astype(np.uint8), transform=(PX, 0, X0, 0, -PX, Y0))
    write_tif(src / "b_before.tif", b, transform=(PX, 0, X0 + 20000, 0, -PX, Y0))
    patched = b.copy()
    patched[:, 420:480, 560:620] = other[:, 420:480, 560:620]
    write_tif(src / "b_after.tif", patched, transform=(PX, 0, X0 + 20000, 0, -PX, Y0))
    (tmp_path / "d.csv").write_text("path,acquired\na_before.tif,2019-01-01\nb_before.tif,2019-01-01\n"
                                    "a_after.tif,2021-01-01\nb_after.tif,2021-01-01\n")  # fmt: skip
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(src), "--store", str(path), *PROBE, "--dates", str(tmp_path / "d.csv")]) == 0
    patch = touching([(420, 480, 560, 620)], 1024)
    assert len(patch) == 4
    base = ["changes", "--store", str(path), "--before", "2019", "--after", "2021"]
    plain, robust = tmp_path / "p.json", tmp_path / "r.json"
    assert main([*base, "-k", "4", "--json", str(plain)]) == 0
    assert all(r["image_path"].endswith("a_after.tif") for r in json.loads(plain.read_text())["results"])
    capsys.readouterr()
    assert main([*base, "-k", "200", "--score", "robust", "--json", str(robust)]) == 0
    assert "robust" in capsys.readouterr().out
    doc = json.loads(robust.read_text())
    res = doc["results"]
    assert doc["query"]["score"] == "robust" and len(res) == 2 * 49
    assert {(r["row"], r["col"]) for r in res[:4]} == patch and all(r["image_path"].endswith("b_after.tif") for r in res[:4])
    fp = {int(u): f for u, f, v in zip(open_store(path)["uid"].values, open_store(path)["fingerprint"].values.astype(np.float64),
                                        open_store(path)["valid"].values) if v}  # fmt: skip
    d = np.array([np.linalg.norm(fp[int(r["uid"])] - fp[int(r["before_uid"])]) for r in res])
    assert [r["distance"] for r in res] == pytest.approx(d.tolist(), rel=1e-9)
    for place in ("a_after.tif", "b_after.tif"):
        mine = np.array([r["image_path"].endswith(place) for r in res])
        med = np.median(d[mine])
        scale = max(1.4826 * np.median(np.abs(d[mine] - med)), 1e-3 * d[mine].max())
        assert [r["robust"] for r, m in zip(res, mine) if m] == pytest.approx(((d[mine] - med) / scale).tolist(), rel=1e-9)
    assert [r["robust"] for r in res] == sorted((r["robust"] for r in res), reverse=True)
    # a view: only windows centred in it, their scores from their whole image pairs (the same values)
    lon = sorted(r["lon"] for r in res if r["image_path"].endswith("b_after.tif"))
    lat = [r["lat"] for r in res if r["image_path"].endswith("b_after.tif")]
    box = (lon[0], min(lat), lon[len(lon) // 2], max(lat))
    assert main([*base, "-k", "200", "--score", "robust", f"--bbox={','.join(map(str, box))}", "--json", str(robust)]) == 0
    inview = json.loads(robust.read_text())["results"]
    whole = {r["uid"]: r["robust"] for r in res}
    assert 0 < len(inview) < 49 and all(box[0] <= r["lon"] <= box[2] for r in inview)
    assert [r["robust"] for r in inview] == pytest.approx([whole[r["uid"]] for r in inview], rel=1e-12)
    # threshold mode: pairs at least D apart, ranked by robust score; the HTTP API takes score= too
    assert main([*base, "--min-distance", "0.05", "--score", "robust", "--json", str(robust)]) == 0
    doc = json.loads(robust.read_text())
    assert doc["total_passed"] == int((d >= 0.05).sum()) and all(r["distance"] >= 0.05 for r in doc["results"])
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pipeline.serve.app import create_app
    from pipeline.serve.service import Service

    svc = Service.open(str(path))
    try:
        api = TestClient(create_app(svc)).get("/api/changes", params={"before": "2019", "after": "2021", "k": 4,
                                                                     "score": "robust"}).json()  # fmt: skip
        assert [r["uid"] for r in api["results"]] == [r["uid"] for r in res[:4]]
    finally:
        svc.close()


def test_pairing_tasks_and_the_view_give_the_same_pairs(tmp_path, monkeypatch):
    """A survey of 3 x 3 overlapping images per flight: the pairing split into one task per after
    image (or per few windows) equals the pairing in one task; with a bbox, only the after
    images that meet it are paired, and their pairs are exactly the windows centred inside."""
    from pipeline import changes as changes_mod
    from pipeline.dates import DateRange
    from pipeline.search import SearchIndex

    src = tmp_path / "src"
    src.mkdir()
    base = textured(512, 512, seed=81)
    step = 512 * PX * 0.7  # 30 % overlap between neighbours
    lines = ["path,acquired"]
    for f, (dx, dy, year) in enumerate([(0.0, 0.0, 2019), (3.0, -2.0, 2021)]):
        for i in range(3):
            for j in range(3):
                name = f"f{f}_{i}{j}.tif"
                write_tif(src / name, base, transform=(PX, 0, X0 + j * step + dx, 0, -PX, Y0 - i * step + dy))
                lines.append(f"{name},{year}-06-01")
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(src), "--store", str(path), *PROBE, "--dates", str(tmp_path / "d.csv")]) == 0
    index = SearchIndex.open(str(path))
    after, _ = index.image_ids_acquired(DateRange.parse("2021"))
    before, _ = index.image_ids_acquired(DateRange.parse("2019"))
    one = changes_mod.pair_windows(index, after, before)
    assert one.pairs == 9 * 9 and set(one.after_ids) == set(after)
    for images, tiles in ((1, 1 << 16), (64, 20)):  # a task per image; a task per two images (9 windows each)
        monkeypatch.setattr(changes_mod, "GROUP_IMAGES", images)
        monkeypatch.setattr(changes_mod, "GROUP_TILES", tiles)
        split = changes_mod.pair_windows(index, after, before)
        for name in ("slots", "partner", "overlap"):
            assert np.array_equal(getattr(split, name), getattr(one, name)), name
    ds = index.ds
    lon, lat = ds["lon"].values, ds["lat"].values
    first = [i for i, p in enumerate(index.image_paths) if str(p).endswith("f1_00.tif")][0]
    mine = (ds["image"].values == first) & ds["valid"].values
    bbox = (float(lon[mine].min()), float(lat[mine].min()), float(np.median(lon[mine])), float(lat[mine].max()))
    view = changes_mod.pair_windows(index, after, before, bbox)
    assert 0 < len(view.after_ids) < len(after)  # the images far from the view are not even read
    inside = (lon[one.slots] >= bbox[0]) & (lon[one.slots] <= bbox[2]) & (lat[one.slots] >= bbox[1]) & (lat[one.slots] <= bbox[3])
    assert np.array_equal(view.slots, one.slots[inside]) and np.array_equal(view.partner, one.partner[inside])


def test_overlapping_ranges_warn_and_never_pair_an_image_with_itself(flights2, tmp_path, capsys):
    """after.tif (2021-06-01) is in both ranges: a warning names it; it is still only paired with
    before.tif, so the answer is the disjoint ranges' answer."""
    _, _, path = flights2
    out, ref = tmp_path / "o.json", tmp_path / "r.json"
    assert main(["changes", "--store", str(path), "--before", "2019", "--after", "2021", "-k", "60", "--json", str(ref)]) == 0
    capsys.readouterr()
    assert main(["changes", "--store", str(path), "--before", "2019/2021-06-30", "--after", "2021", "-k", "60",
                 "--json", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert re.search(r"--before 2019/2021-06-30 and --after 2021 share 1 image\(s\) \(e\.g\. \S+after\.tif\)", err), err
    got = json.loads(out.read_text())["results"]
    assert [(r["uid"], r["before_uid"]) for r in got] == [(r["uid"], r["before_uid"]) for r in json.loads(ref.read_text())["results"]]
    assert all(r["uid"] != r["before_uid"] and r["image_path"] != r["before_image_path"] for r in got)
    capsys.readouterr()
    assert main(["changes", "--store", str(path), "--before", "2019", "--after", "2021", "-k", "5"]) == 0
    assert "share" not in capsys.readouterr().err  # disjoint ranges: no warning


def test_the_readme_example_script_builds_a_second_flight_whose_patches_rank_first(tmp_path):
    """docs/second_flight.py (the README's worked example) on GeoTIFFs written here: the top N of
    `changes` are exactly the windows that touch its pasted patches, and its picture is drawn."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "second_flight.py"
    image = write_tif(tmp_path / "flight.tif", textured(1000, 1000, seed=66), transform=(0.25, 0, 120000.0, 0, -0.25, 480000.0),
                      crs="EPSG:28992")  # fmt: skip
    donor = write_tif(tmp_path / "donor.tif", textured(700, 700, seed=67))
    out = tmp_path / "flights"
    subprocess.run([sys.executable, str(script), "build", str(out), "--image", str(image), "--donor", str(donor)],
                   check=True, capture_output=True)  # fmt: skip
    sys.path.insert(0, str(script.parent))
    try:
        from second_flight import touching
    finally:
        sys.path.remove(str(script.parent))
    patches = json.loads((out / "patches.json").read_text())["patches"]
    expect = touching(patches, 1000, 1000)
    store = tmp_path / "flights.zarr"
    assert main(["ingest", str(out), "--store", str(store), *PROBE, "--dates", str(out / "dates.csv")]) == 0
    res = tmp_path / "changes.json"
    assert main(["changes", "--store", str(store), "--before", "2019", "--after", "2021", "-k", str(len(expect)),
                 "--json", str(res)]) == 0  # fmt: skip
    assert {(r["row"], r["col"]) for r in json.loads(res.read_text())["results"]} == expect
    subprocess.run([sys.executable, str(script), "picture", str(res), str(tmp_path / "p.jpg")], check=True,
                   capture_output=True)  # fmt: skip
    from PIL import Image

    assert Image.open(tmp_path / "p.jpg").size[0] > 500
