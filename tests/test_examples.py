"""Search by examples, classifiers, thresholds, GIS exports and score maps, each against an
independent oracle: NumPy brute force over the store's fingerprints, rasterio for corners and
georeference, shapely and pyproj for areas, scikit-learn fitted directly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
from conftest import textured

from pipeline import Config, ingest, open_store
from pipeline.cli import main
from pipeline.search import SearchIndex
from pipeline.search.kernels import Exclusions, Filters
from pipeline.search.scorers import CentroidScorer, LinearScorer, NearestScorer


@pytest.fixture(scope="module")
def archive(flights):
    """The shared archive: two overlapping flights, a far image with dropped windows (nodata in
    the score maps), a geographic one (degrees, EPSG:4326), one without a CRS and its copy."""
    return flights


@pytest.fixture(scope="module")
def store(flights, ingest_store):
    return ingest_store(flights)


def load(path):
    ds = open_store(path)
    return {n: ds[n].values for n in ("fingerprint", "valid", "uid", "image", "row", "col", "lon", "lat")}


def overlapping(s, t):
    same = (
        (s["image"] == s["image"][t]) & (np.abs(s["row"] - s["row"][t]) < 256) & (np.abs(s["col"] - s["col"][t]) < 256)
    )
    if not np.isfinite(s["lon"][t]):
        return same
    dx = (s["lon"] - s["lon"][t]) * 111_320 * np.cos(np.radians(s["lat"][t]))
    dy = (s["lat"] - s["lat"][t]) * 111_320
    with np.errstate(invalid="ignore"):
        return same | ((s["image"] != s["image"][t]) & (np.abs(dx) < 128) & (np.abs(dy) < 128))


def ranked(s, score, allowed, k=None):
    """The oracle's ranking: by score, ties (within 1e-9: the twin images e_nocrs and f_copy) by uid."""
    idx = np.flatnonzero(allowed & s["valid"])
    order = idx[np.lexsort((s["uid"][idx], np.round(score[idx], 9)))]
    return order if k is None else order[:k]


def assert_ranking(res, want_uids):
    """The engine's results in the oracle's order, taking ties within 1e-9 in uid order (the
    engine's scores of identical fingerprints can differ in the last bits of a float64)."""
    key = np.round(np.asarray(res.value, np.float64), 9) * (-1.0 if res.higher_is_better else 1.0)
    np.testing.assert_array_equal(res.uid[np.lexsort((res.uid, key))], want_uids)


def oracle_scores(s, pos, neg, method, w=0.5):
    x = s["fingerprint"].astype(np.float64)
    P, N = x[pos], x[neg]
    if method == "centroid":
        mp = P.mean(0)
        q = mp + (w * (mp - N.mean(0)) if len(neg) else 0)
        return np.sqrt(((x - q) ** 2).sum(1))
    dp = np.sqrt(((x[:, None, :] - P[None]) ** 2).sum(-1)).min(1)
    dn = np.sqrt(((x[:, None, :] - N[None]) ** 2).sum(-1)).min(1) if len(neg) else 0
    return dp - w * dn


@pytest.mark.parametrize("method", ["centroid", "nearest"])
def test_example_set_top_k_and_threshold_equal_a_brute_force(store, method):
    s = load(store)
    index = SearchIndex.open(str(store))
    valid = np.flatnonzero(s["valid"])
    pos, neg = valid[[3, 11, 40]], valid[[25, 60]]
    from pipeline.examples import Ref, example_set

    es, _ = example_set(index, [Ref("uid", int(s["uid"][t])) for t in pos],
                        [Ref("uid", int(s["uid"][t])) for t in neg], method)  # fmt: skip
    allowed = ~np.any([overlapping(s, t) for t in np.r_[pos, neg]], axis=0)
    score = oracle_scores(s, pos, neg, method)
    [res] = index.search_examples([es], k=15)
    want = ranked(s, score, allowed, 15)
    assert_ranking(res, s["uid"][want])
    np.testing.assert_allclose(res.value, score[want], rtol=1e-5, atol=1e-4)
    assert res.value_name == "score" and res.to_json()["results"][0]["score"] == pytest.approx(score[want[0]], abs=1e-4)
    # threshold mode: every tile scoring at most a value between the 30th and 31st best (not on a
    # score: floating point decides ties there); --limit cuts and says how many passed
    sorted_scores = np.sort(score[allowed & s["valid"]])
    cut = float(sorted_scores[29] + sorted_scores[30]) / 2
    scorer, exclude = index.example_scorer([es])
    [every] = index.run(scorer, exclude, k=None, max_score=scorer.internal(cut))
    passing = ranked(s, score, allowed & (score <= cut))
    assert every.total == len(passing) == len(every)
    assert_ranking(every, s["uid"][passing])
    [capped] = index.run(scorer, exclude, k=None, max_score=scorer.internal(cut), limit=7)
    assert capped.total == len(passing) and len(capped) == 7
    assert_ranking(capped, s["uid"][passing[:7]])
    # filters apply as to single queries
    box = Filters(image_ids=(0, 1))
    [boxed] = index.search_examples([es], k=10, filters=box)
    assert_ranking(boxed, s["uid"][ranked(s, score, allowed & np.isin(s["image"], [0, 1]), 10)])


def test_scorers_after_post_processing_and_a_linear_scorer(store, tmp_path):
    path = tmp_path / "p.zarr"
    shutil.copytree(store, path)
    assert main(["postprocess", "--store", str(path), "--method", "l2"]) == 0
    s = load(path)
    xn = s["fingerprint"] / np.linalg.norm(s["fingerprint"], axis=1, keepdims=True).clip(1e-12)
    index = SearchIndex.open(str(path))
    valid = np.flatnonzero(s["valid"])
    pos, neg = valid[[5, 9]], valid[[30]]
    from pipeline.examples import Ref, example_set

    es, _ = example_set(index, [Ref("uid", int(s["uid"][t])) for t in pos], [Ref("uid", int(s["uid"][neg[0]]))])
    allowed = ~np.any([overlapping(s, t) for t in np.r_[pos, neg]], axis=0)
    [res] = index.search_examples([es], k=8)
    want = ranked(s, oracle_scores({**s, "fingerprint": xn}, pos, neg, "centroid"), allowed, 8)
    assert_ranking(res, s["uid"][want])
    coef = np.random.default_rng(1).normal(size=(1, 512)).astype(np.float32)
    logit = xn.astype(np.float64) @ coef[0].astype(np.float64) + 0.25
    [top] = index.run(LinearScorer(coef, np.array([0.25])), Exclusions.none(), k=9)
    assert_ranking(top, s["uid"][ranked(s, -logit, np.ones(len(logit), bool), 9)])
    np.testing.assert_allclose(top.value, 1 / (1 + np.exp(-logit[ranked(s, -logit, np.ones(len(logit), bool), 9)])))
    assert top.higher_is_better


def test_search_cli_with_examples_file_and_errors(store, tmp_path, capsys):
    s = load(store)
    valid = np.flatnonzero(s["valid"] & np.isfinite(s["lon"]))
    pos, neg = valid[[2, 17]], valid[[33]]
    csv = tmp_path / "ex.csv"
    csv.write_text("lon,lat,label\n" + "".join(f"{s['lon'][t]},{s['lat'][t]},positive\n" for t in pos)
                   + f"{s['lon'][neg[0]]},{s['lat'][neg[0]]},negative\n")  # fmt: skip
    out, sheet = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["search", "--store", str(store), "--examples", str(csv), "-k", "6", "--json", str(out),
                 "--sheet", str(sheet)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    allowed = ~np.any([overlapping(s, t) for t in np.r_[pos, neg]], axis=0)
    want = ranked(s, oracle_scores(s, pos, neg, "centroid"), allowed, 6)
    assert [r["uid"] for r in doc["results"]] == [str(int(u)) for u in s["uid"][want]]
    assert doc["query"]["type"] == "examples" and "score" in doc["results"][0] and "distance" not in doc["results"][0]
    # the sheet of an example set's results (it failed on the missing 'distance' of score results)
    from PIL import Image

    from pipeline.render import GAP, LABEL_H, read_tile

    img = np.asarray(Image.open(sheet).convert("RGB"))
    assert img.shape[1] == GAP + 6 * (256 + GAP)  # the first positive and 6 results, 6 to a row
    first = doc["results"][0]
    y, x = GAP + LABEL_H, GAP + (256 + GAP)
    np.testing.assert_array_equal(img[y : y + 256, x : x + 256].transpose(2, 0, 1),
                                  read_tile(first["image_path"], first["row"], first["col"]))  # fmt: skip
    geo = tmp_path / "ex.geojson"
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"label": "positive"},
         "geometry": {"type": "Point", "coordinates": [float(s["lon"][t]), float(s["lat"][t])]}} for t in pos]}))  # fmt: skip
    assert main(["search", "--store", str(store), "--examples", str(geo), "--score", "nearest", "-k", "4",
                 "--json", str(out)]) == 0  # fmt: skip
    allowed = ~np.any([overlapping(s, t) for t in pos], axis=0)
    want = ranked(s, oracle_scores(s, pos, [], "nearest"), allowed, 4)
    assert [r["uid"] for r in json.loads(out.read_text())["results"]] == [str(int(u)) for u in s["uid"][want]]
    uid = str(int(s["uid"][pos[0]]))
    # --positive/--negative with an explicit --negative-weight
    argv = ["search", "--store", str(store), "--positive", uid, "--positive", str(int(s["uid"][pos[1]])),
            "--negative", str(int(s["uid"][neg[0]])), "--negative-weight", "1.5", "-k", "5", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    allowed = ~np.any([overlapping(s, t) for t in np.r_[pos, neg]], axis=0)
    want = ranked(s, oracle_scores(s, pos, neg, "centroid", w=1.5), allowed, 5)
    got = json.loads(out.read_text())
    assert [r["uid"] for r in got["results"]] == [str(int(u)) for u in s["uid"][want]]
    assert got["query"]["negative_weight"] == 1.5
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe garbage")
    cases = [
        (["--positive", uid, "--uid", uid], "use one kind per search"),
        (["--negative", uid], "at least one positive"),
        (["--positive", str(9 * 2**40)], "names image 9"),
        (["--examples", str(bad)], "cannot be read"),
        (["--examples", str(tmp_path / "none.csv")], "does not exist"),
        (["--positive", uid, "-k", "3", "--max-distance", "2"], "choose one"),
        (["--positive", "lonlat:x,y"], "lonlat:LON,LAT"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["search", "--store", str(store), *extra]) == 2, extra
        assert message in capsys.readouterr().err, (extra, message)


def test_max_distance_threshold_through_the_cli(store, tmp_path, capsys):
    s = load(store)
    t = int(np.flatnonzero(s["valid"])[6])
    d = np.sqrt(((s["fingerprint"].astype(np.float64) - s["fingerprint"][t]) ** 2).sum(1))
    allowed = ~overlapping(s, t)
    ds_ = np.sort(d[allowed & s["valid"]])
    cut = float(ds_[12] + ds_[13]) / 2
    out = tmp_path / "r.json"
    capsys.readouterr()
    assert main(["search", "--store", str(store), "--uid", str(int(s["uid"][t])), "--max-distance", str(cut),
                 "--limit", "5", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    passing = ranked(s, d, allowed & (d <= cut))
    assert doc["total_passed"] == len(passing) == 13 and [r["uid"] for r in doc["results"]] == [
        str(int(u)) for u in s["uid"][passing[:5]]]  # fmt: skip
    assert "13 tiles passed the threshold" in capsys.readouterr().out


def expected_ring(path, row, col):
    """The window's corners from rasterio: pixel corners through the file's transform, then
    EPSG:4326 with rasterio.warp (an oracle independent of pipeline.export)."""
    from rasterio.warp import transform as warp

    with rasterio.open(path) as src:
        pts = [
            src.xy(r, c, offset="ul")
            for r, c in ((row, col), (row, col + 256), (row + 256, col + 256), (row + 256, col))
        ]
        crs = src.crs
    xs, ys = zip(*pts)
    if crs.to_epsg() == 4326:
        return list(zip(xs, ys))
    lon, lat = warp(crs, "EPSG:4326", list(xs), list(ys))
    return list(zip(lon, lat))


def test_geojson_geoparquet_and_dissolve(store, tmp_path, capsys):
    import geopandas as gpd
    from pyproj import Geod
    from shapely.geometry import Polygon, shape
    from shapely.ops import unary_union

    s = load(store)
    t = int(np.flatnonzero(s["valid"] & (s["image"] == 0))[4])
    base = ["search", "--store", str(store), "--uid", str(int(s["uid"][t])), "-k", "40"]
    gj, gp = tmp_path / "h.geojson", tmp_path / "h.parquet"
    capsys.readouterr()
    assert main([*base, "--geojson", str(gj), "--geoparquet", str(gp), "--json", str(tmp_path / "r.json")]) == 0
    assert "without a CRS left out" in capsys.readouterr().err  # e_nocrs and f_copy hits are skipped, with a warning
    doc = json.loads(gj.read_text())
    results = {r["uid"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    paths = {r["image_path"] for r in results.values()}
    assert any(p.endswith("d_geo.tif") for p in paths) and any(p.endswith("a.tif") for p in paths)
    assert len(doc["features"]) == sum(1 for r in results.values() if r["lon"] is not None)  # not e_nocrs, f_copy
    for f in doc["features"]:
        p = f["properties"]
        assert set(p) == {"rank", "uid", "distance", "query", "image_path", "row", "col", "acquired"}
        assert p["acquired"] is None  # the shared archive has no dates
        assert results[p["uid"]]["rank"] == p["rank"] and results[p["uid"]]["distance"] == pytest.approx(p["distance"])
        ring = f["geometry"]["coordinates"][0]
        np.testing.assert_allclose(
            np.array(ring[:4]), np.array(expected_ring(p["image_path"], p["row"], p["col"])), atol=1e-9
        )
    frame = gpd.read_parquet(gp)
    assert frame.crs.to_epsg() == 4326 and len(frame) == len(doc["features"])
    assert list(frame["uid"]) == [f["properties"]["uid"] for f in doc["features"]]
    # dissolve: per image, connected areas; areas against shapely (in metres, projected) and pyproj
    dj = tmp_path / "d.geojson"
    assert main([*base, "--geojson", str(dj), "--dissolve"]) == 0
    dissolved = json.loads(dj.read_text())["features"]
    geod = Geod(ellps="WGS84")
    for img in {f["properties"]["image_path"] for f in doc["features"]}:
        raw = [shape(f["geometry"]) for f in doc["features"] if f["properties"]["image_path"] == img]
        mine = [f for f in dissolved if f["properties"]["image_path"] == img]
        union = unary_union(raw)
        parts = list(getattr(union, "geoms", [union]))
        assert len(mine) == len(parts)
        assert sum(f["properties"]["hits"] for f in mine) == len(raw)
        geodesic = sum(abs(geod.geometry_area_perimeter(p)[0]) for p in parts)
        assert sum(f["properties"]["area_m2"] for f in mine) == pytest.approx(geodesic, rel=1e-9)
        if img.endswith("a.tif"):  # projected at 0.5 m: the union of the raw UTM squares
            with rasterio.open(img) as src:
                squares = [Polygon([src.xy(r, c, offset="ul") for r, c in ((f["properties"]["row"], f["properties"]["col"]),
                           (f["properties"]["row"], f["properties"]["col"] + 256), (f["properties"]["row"] + 256,
                           f["properties"]["col"] + 256), (f["properties"]["row"] + 256, f["properties"]["col"]))])
                           for f in doc["features"] if f["properties"]["image_path"] == img]  # fmt: skip
            planar = unary_union(squares).area
            assert sum(f["properties"]["area_m2"] for f in mine) == pytest.approx(planar, rel=2e-3)
    # --pixel-coords keeps the image without a CRS, in pixels
    pj = tmp_path / "p.geojson"
    assert main([*base, "--geojson", str(pj), "--pixel-coords"]) == 0
    px = [f for f in json.loads(pj.read_text())["features"] if f["properties"]["image_path"].endswith("e_nocrs.tif")]
    assert px and all(
        f["geometry"]["coordinates"][0][0] == [f["properties"]["col"], f["properties"]["row"]] for f in px
    )


def test_heatmap_pixels_are_the_window_scores_and_georeferenced_like_the_image(store, archive, tmp_path):
    s = load(store)
    t = int(np.flatnonzero(s["valid"] & (s["image"] == 0))[2])
    out = tmp_path / "maps"
    assert main(["heatmap", "--store", str(store), "--uid", str(int(s["uid"][t])), "--out", str(out)]) == 0
    d = np.sqrt(((s["fingerprint"].astype(np.float64) - s["fingerprint"][t]) ** 2).sum(1))
    ds = open_store(store)
    for i, path in enumerate(ds["image_path"].values):
        stem = path.rsplit("/", 1)[-1][:-4]
        with rasterio.open(out / f"{stem}.tif") as m, rasterio.open(path) as src:
            grid_values = m.read(1)
            assert m.dtypes[0] == "float32" and (m.crs == src.crs)
            assert m.profile.get("tiled") or m.profile.get("blockxsize")  # COG blocks
            sel = np.flatnonzero(s["image"] == i)
            for slot in sel:
                r, c = int(s["row"][slot]) // 128, int(s["col"][slot]) // 128
                if s["valid"][slot]:
                    assert grid_values[r, c] == pytest.approx(d[slot], rel=1e-5, abs=1e-4)
                    if m.crs is not None:  # the map pixel's centre is the window's centre
                        assert m.xy(r, c) == pytest.approx(
                            src.xy(int(s["row"][slot]) + 128, int(s["col"][slot]) + 128, offset="ul")
                        )
                else:
                    assert np.isnan(grid_values[r, c])
        assert (out / f"{stem}.png").stat().st_size > 0
    assert np.isnan(rasterio.open(out / "c_far.tif").read(1)).any()  # the black band's windows


def test_classify_save_load_threshold_and_refusals(store, archive, tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    s = load(store)
    valid = np.flatnonzero(s["valid"])
    pos, neg = valid[[1, 7, 13, 21]], valid[[40, 50, 60]]
    csv = tmp_path / "ex.csv"
    csv.write_text("uid,label\n" + "".join(f"{int(s['uid'][t])},positive\n" for t in pos)
                   + "".join(f"{int(s['uid'][t])},negative\n" for t in neg))  # fmt: skip
    model = tmp_path / "m.json"
    out = tmp_path / "c.json"
    capsys.readouterr()
    assert main(["classify", "--store", str(store), "--examples", str(csv), "--background", "20", "-k", "10",
                 "--save", str(model), "--json", str(out)]) == 0  # fmt: skip
    assert "cross-validated AP" in capsys.readouterr().out
    saved = json.loads(model.read_text())
    index = SearchIndex.open(str(store))
    from pipeline.classify import background_rows
    from pipeline.examples import Ref, example_set

    es, _ = example_set(index, [Ref("uid", int(s["uid"][t])) for t in pos], [Ref("uid", int(s["uid"][t])) for t in neg])
    bg = background_rows(index, es, 20)
    assert len(bg) == 20 and not np.any([overlapping(s, t)[bg] for t in np.r_[pos, neg]])
    x = s["fingerprint"].astype(np.float64)
    ref = LogisticRegression(class_weight="balanced", max_iter=2000).fit(
        np.r_[x[pos], x[neg], x[bg]], np.r_[np.ones(len(pos)), np.zeros(len(neg) + len(bg))])  # fmt: skip
    np.testing.assert_allclose(saved["coef"], ref.coef_[0], rtol=1e-6, atol=1e-8)
    p = ref.predict_proba(x)[:, 1]
    allowed = ~np.any([overlapping(s, t) for t in np.r_[pos, neg]], axis=0)
    doc = json.loads(out.read_text())
    want = ranked(s, -p, allowed, 10)
    assert [r["uid"] for r in doc["results"]] == [str(int(u)) for u in s["uid"][want]]
    np.testing.assert_allclose([r["score"] for r in doc["results"]], p[want], rtol=1e-6)
    # --load: the same model scores the store the same way (no example excluded now)
    out2 = tmp_path / "c2.json"
    assert (
        main(["classify", "--store", str(store), "--load", str(model), "--min-score", "0.5", "--json", str(out2)]) == 0
    )
    doc2 = json.loads(out2.read_text())
    passing = ranked(s, -p, p >= 0.5)
    assert doc2["total_passed"] == len(passing) and [r["uid"] for r in doc2["results"]] == [
        str(int(u)) for u in s["uid"][passing]
    ]
    # a model from another store's fingerprints is refused
    other = tmp_path / "o.zarr"
    ingest([archive / "a.tif"], other, Config().override(**{"model.arch": "standin",
                                                            "cluster.progress": False}))  # fmt: skip
    capsys.readouterr()
    assert main(["classify", "--store", str(other), "--load", str(model)]) == 2
    assert "fitted on other fingerprints" in capsys.readouterr().err
    assert main(["classify", "--store", str(store), "--load", str(tmp_path / "c.json")]) == 2
    assert main(["classify", "--store", str(store), "--load", str(model), "-k", "3", "--min-score", "0.5"]) == 2
    assert main(["heatmap", "--store", str(store), "--load", str(model), "--out", str(tmp_path / "hm")]) == 0
    with rasterio.open(tmp_path / "hm" / "a.tif") as m:
        sel = np.flatnonzero((s["image"] == 0) & s["valid"])
        r, c = s["row"][sel[0]] // 128, s["col"][sel[0]] // 128
        assert m.read(1)[r, c] == pytest.approx(p[sel[0]], rel=1e-5)


def test_evaluate_example_sets_through_the_cli(tmp_path):
    from PIL import Image

    for c, seed in (("fields", 1), ("roofs", 2), ("water", 3)):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(textured(256, 256, seed=seed * 10 + i % 4).transpose(1, 2, 0)).save(
                tmp_path / "set" / c / f"{i}.png"
            )
    out = tmp_path / "ev"
    assert main(["evaluate", str(tmp_path / "set"), "--model", "probe", "--options", "l2", "--n-examples", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads((out / "metrics.json").read_text())["examples"]
    assert [r["method"] for r in rows] == ["single", "centroid", "nearest", "classifier"]
    assert all(r["sets"] == 3 * 4 and 0 <= r["mAP"] <= 1 for r in rows)


def test_the_nearest_scorer_kernel_equals_numpy(store):
    from pipeline.search.kernels import make_block

    s = load(store)
    rng = np.random.default_rng(4)
    P, N = rng.normal(size=(3, 512)).astype(np.float32), rng.normal(size=(2, 512)).astype(np.float32)
    block = make_block(s["fingerprint"], s["valid"], s["uid"], s["lon"], s["lat"], with_norms=True)
    sc = NearestScorer((P,), (N,), (0.3,))
    got = sc.scores(block)[:, 0]
    x = s["fingerprint"].astype(np.float64)
    want = np.sqrt(((x[:, None] - P[None]) ** 2).sum(-1)).min(1) - 0.3 * np.sqrt(
        ((x[:, None] - N[None]) ** 2).sum(-1)
    ).min(1)
    np.testing.assert_allclose(got[s["valid"]], want[s["valid"]], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(sc.exact(block, np.flatnonzero(s["valid"]), 0), want[s["valid"]], rtol=1e-9)
    assert CentroidScorer(P[:1]).name == "score"
