"""Acquisition times (issue 26): the four sources of ``acquired`` through the CLI and their order,
bad dates refused before the store changes, ``info``, ``migrate`` from version 2, ``relocate`` and
``compact`` keeping the field, ``--date`` on search / classify / heatmap / the HTTP API against
a NumPy brute force over the images the range keeps, and STAC ItemCollections and catalogues as
sources (pystac builds them around GeoTIFFs written here)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline import store
from pipeline.cli import main
from pipeline.dates import DateRange, parse_when
from pipeline.store import open_store

FIXTURE_V2 = Path(__file__).parent / "fixtures" / "store_v2.zarr"
PROBE = ["--model", "probe", "--weights", "random", "--chunk-px", "384", "--chunk-tiles", "8", "--no-progress"]


def t(text: str) -> np.datetime64:
    return np.datetime64(text, "s")


def acquired_of(path: Path) -> dict[str, np.datetime64]:
    table = store.read_table(path)
    return {Path(str(p)).name: np.datetime64(a, "s") for p, a in zip(table["image_path"], table["acquired"])}


def test_parse_when_and_date_ranges():
    assert parse_when("2019-11-09") == t("2019-11-09T00:00:00")
    assert parse_when("20191109") == t("2019-11-09T00:00:00")
    assert parse_when("2019:11:09 10:30:00") == t("2019-11-09T10:30:00")  # TIFF
    assert parse_when("2019-11-09T10:30:00+02:00") == t("2019-11-09T08:30:00")  # to UTC
    assert parse_when("2019-11-09T10:30:00Z") == t("2019-11-09T10:30:00")
    for bad in ("", "yesterday", "2019-13-01", "0000:00:00 00:00:00"):
        with pytest.raises(ValueError):
            parse_when(bad)
    a = np.array(["2018-12-31T23:59:59", "2019-01-01", "2019-12-31T23:59:59", "2020-01-01", "NaT"], "datetime64[s]")
    assert DateRange.parse("2019-01-01/2019-12-31").mask(a).tolist() == [False, True, True, False, False]
    assert DateRange.parse("2019").mask(a).tolist() == [False, True, True, False, False]
    assert DateRange.parse("2019-01-01/").mask(a).tolist() == [False, True, True, True, False]
    assert DateRange.parse("/2019-01-01").mask(a).tolist() == [True, True, False, False, False]
    assert DateRange.parse("../2018").mask(a).tolist() == [True, False, False, False, False]
    assert DateRange.parse("2019-12").mask(a).tolist() == [False, False, True, False, False]
    assert DateRange.parse("2019-01-01/2019-12-31").describe() == {"from": "2019-01-01T00:00:00Z",
                                                                   "to": "2019-12-31T23:59:59Z"}  # fmt: skip
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="ends before it starts"):
        DateRange.parse("2020/2019")
    with pytest.raises(ConfigError, match="not an ISO date"):
        DateRange.parse("2019-01-01/soon")
    for bad in ("2019-13", "2019-00/2020", "2019/2020-13"):  # month shorthands: one line, not a traceback
        with pytest.raises(ConfigError, match="is not a month"):
            DateRange.parse(bad)


@pytest.fixture(scope="module")
def dated(tmp_path_factory):
    """Six images: dates from a CSV (a, b), a pattern (m_..._20200315), a TIFF tag (tagged), a
    junk tag (junk: NaT) and none (plain: NaT); ingested through the CLI."""
    import rasterio

    root = tmp_path_factory.mktemp("dated")
    src = root / "src"
    src.mkdir()
    names = ["a.tif", "b.tif", "m_3008601_ne_16_060_20200315.tif", "tagged.tif", "junk.tif", "plain.tif"]
    for k, name in enumerate(names):
        write_tif(src / name, textured(512, 512, seed=300 + k),
                  transform=(0.5, 0, 400000.0 + 2000 * k, 0, -0.5, 3300000.0))  # fmt: skip
    for name, tag in (("tagged.tif", "2021:07:04 12:00:00"), ("junk.tif", "    :  :     :  :  "),
                      ("a.tif", "1999:01:01 00:00:00")):  # fmt: skip
        with rasterio.open(src / name, "r+") as f:
            f.update_tags(TIFFTAG_DATETIME=tag)
    (root / "dates.csv").write_text("path,acquired\nsrc/a.tif,2018-05-01\nb.tif,2019-06-30T23:00:00-02:00\n")
    path = root / "s.zarr"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["ingest", str(src), "--store", str(path), *PROBE, "--dates", str(root / "dates.csv"),
                     "--date-pattern", r"_(?P<date>\d{8})\.tif$"]) == 0  # fmt: skip
    (root / "ingest.err").write_text(err.getvalue())
    return root, src, path


def test_the_four_sources_of_dates_in_their_order(dated):
    root, _, path = dated
    err = (root / "ingest.err").read_text()
    assert re.search(r"junk.tif: its DateTime tag .* is not a date; acquired left unknown \(NaT\)", err), err
    assert "finds no date in 3 of 6 file name(s) or path(s)" in err  # the CSV dated two, the pattern one
    assert "dates.csv has no line for 4 of 6 new image(s)" in err and "take the --date-pattern, then" in err
    assert "name no image" not in err  # both lines found their image
    got = acquired_of(path)
    assert got["a.tif"] == t("2018-05-01T00:00:00")  # the CSV wins over the file's own tag
    assert got["b.tif"] == t("2019-07-01T01:00:00")  # an offset becomes UTC
    assert got["m_3008601_ne_16_060_20200315.tif"] == t("2020-03-15T00:00:00")
    assert got["tagged.tif"] == t("2021-07-04T12:00:00")
    assert np.isnat(got["junk.tif"]) and np.isnat(got["plain.tif"])
    assert open_store(path)["acquired"].dtype == np.dtype("datetime64[s]")  # xarray reads it as a time


def test_info_shows_the_date_range_and_counts_per_year(dated, capsys):
    _, _, path = dated
    capsys.readouterr()
    assert main(["info", "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "acquired      2018-05-01T00:00:00Z to 2021-07-04T12:00:00Z" in out
    assert "2018: 1, 2019: 1, 2020: 1, 2021: 1, unknown: 2" in out
    assert main(["info", "--store", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["acquired"] == {"from": "2018-05-01T00:00:00Z", "to": "2021-07-04T12:00:00Z",
                               "per_year": {"2018": 1, "2019": 1, "2020": 1, "2021": 1, "unknown": 2}}  # fmt: skip


@pytest.mark.parametrize("bad", ["csv", "pattern"])
def test_a_date_that_is_no_date_stops_the_ingest_before_the_store_changes(dated, tmp_path, capsys, bad):
    root, src, path = dated
    store_copy = tmp_path / "s.zarr"
    shutil.copytree(path, store_copy)
    before = {p.relative_to(store_copy): p.read_bytes() for p in store_copy.rglob("*") if p.is_file()}
    new = tmp_path / "new"
    new.mkdir()
    write_tif(new / "z_20201345.tif", textured(512, 512, seed=399))
    if bad == "csv":
        (tmp_path / "d.csv").write_text("path,acquired\nz_20201345.tif,2020-02-30\n")
        flags = ["--dates", str(tmp_path / "d.csv")]
        expect = [str(tmp_path / "d.csv"), "line 2", "'2020-02-30'"]
    else:
        flags = ["--date-pattern", r"_(?P<date>\d{8})\.tif$"]
        expect = [str(new / "z_20201345.tif"), "'20201345'"]
    capsys.readouterr()
    for target in (store_copy, tmp_path / "fresh.zarr"):
        assert main(["ingest", str(new), "--store", str(target), *PROBE, *flags]) == 2
        err = capsys.readouterr().err
        assert all(e in err for e in expect), err
        assert "store was not changed" in err and len([x for x in err.splitlines() if "warning:" not in x]) == 1
    after = {p.relative_to(store_copy): p.read_bytes() for p in store_copy.rglob("*") if p.is_file()}
    assert after == before  # the existing store: not a byte changed
    assert not (tmp_path / "fresh.zarr").exists() and not list(tmp_path.glob(".fresh.zarr*"))


def test_a_csv_that_misses_images_says_which_and_names_its_lines_that_match_none(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for k, name in enumerate(("a.tif", "b.tif", "c.tif")):
        write_tif(src / name, textured(512, 512, seed=310 + k), transform=(0.5, 0, 400000.0 + 2000 * k, 0, -0.5, 3300000.0))
    (tmp_path / "d.csv").write_text("path,acquired\na.tif,2019-01-01\nbb.tif,2020-01-01\nsub/cc.tif,2021-01-01\n")
    capsys.readouterr()
    assert main(["ingest", str(src), "--store", str(tmp_path / "s.zarr"), *PROBE, "--dates", str(tmp_path / "d.csv")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"d\.csv has no line for 2 of 3 new image\(s\) \(e\.g\. b\.tif\); those take the file's DateTime "
                     r"tag, if any; 2 line\(s\) of it name no image of this ingest \(e\.g\. bb\.tif\)", err), err  # fmt: skip
    got = acquired_of(tmp_path / "s.zarr")
    assert got["a.tif"] == t("2019-01-01T00:00:00") and np.isnat(got["b.tif"]) and np.isnat(got["c.tif"])


def test_a_date_pattern_reads_dated_folders_when_the_file_name_has_none(tmp_path):
    """Drone flights kept one folder per date: the pattern finds the date in the path; a date in
    the file name still wins over one in the folders."""
    src = tmp_path / "flights"
    for k, (folder, name) in enumerate((("2019-05-02", "DJI_0001.tif"), ("2021-06-01", "DJI_0001.tif"),
                                         ("2021-06-01", "x_2022-01-03_.tif"))):  # fmt: skip
        (src / folder).mkdir(parents=True, exist_ok=True)
        write_tif(src / folder / name, textured(512, 512, seed=320 + k), transform=(0.5, 0, 400000.0 + 2000 * k, 0, -0.5, 3300000.0))
    assert main(["ingest", str(src), "--store", str(tmp_path / "s.zarr"), *PROBE,
                 "--date-pattern", r"(?P<date>\d{4}-\d{2}-\d{2})"]) == 0  # fmt: skip
    table = store.read_table(tmp_path / "s.zarr")
    got = {str(Path(str(p)).relative_to(src)): np.datetime64(a, "s") for p, a in zip(table["image_path"], table["acquired"])}
    assert got == {"2019-05-02/DJI_0001.tif": t("2019-05-02T00:00:00"), "2021-06-01/DJI_0001.tif": t("2021-06-01T00:00:00"),
                   "2021-06-01/x_2022-01-03_.tif": t("2022-01-03T00:00:00")}  # fmt: skip


@pytest.mark.parametrize("decoder", ["auto", "gdal"])  # headers by Pillow, and by GDAL
def test_drone_frames_are_dated_by_their_exif_capture_time(tmp_path, decoder):
    """JPEG frames as drones write them: EXIF DateTimeOriginal (capture) wins over DateTime (last
    written); a frame with DateTime alone takes it; one without EXIF stays undated."""
    from PIL import Image

    src = tmp_path / "frames"
    src.mkdir()
    times = {"DJI_0001.JPG": ("2021:06:01 10:30:05", "2023:01:01 00:00:00"), "DJI_0002.JPG": ("", "2021:06:02 08:00:00"),
             "DJI_0003.JPG": ("", "")}  # fmt: skip
    for k, (name, (original, written)) in enumerate(times.items()):
        exif = Image.Exif()
        if written:
            exif[306] = written
        if original:
            exif.get_ifd(0x8769)[36867] = original
        Image.fromarray(textured(320, 320, seed=330 + k).transpose(1, 2, 0)).save(src / name, exif=exif, quality=90)
    assert main(["ingest", str(src), "--store", str(tmp_path / "s.zarr"), *PROBE, "--decoder", decoder]) == 0
    got = acquired_of(tmp_path / "s.zarr")
    assert got["DJI_0001.JPG"] == t("2021-06-01T10:30:05") and got["DJI_0002.JPG"] == t("2021-06-02T08:00:00")
    assert np.isnat(got["DJI_0003.JPG"])


def test_a_later_ingest_with_dates_dates_images_already_in_the_store(dated, tmp_path, capsys):
    root, src, path = dated
    copy = tmp_path / "s.zarr"
    shutil.copytree(path, copy)
    (tmp_path / "more.csv").write_text("path,acquired\nplain.tif,2022-01-02\n")
    capsys.readouterr()
    assert main(["ingest", str(src), "--store", str(copy), *PROBE, "--dates", str(tmp_path / "more.csv")]) == 0
    out, err = capsys.readouterr()
    assert "dates        1 image(s) already in the store dated" in out
    assert "has no line" not in err  # a CSV for images already in the store: nothing new to date
    got = acquired_of(copy)
    assert got["plain.tif"] == t("2022-01-02T00:00:00")
    assert got["a.tif"] == t("2018-05-01T00:00:00")  # the CSV does not name it: kept (not its tag)


def test_relocate_and_compact_keep_acquired(dated, tmp_path):
    root, src, path = dated
    copy = tmp_path / "s.zarr"
    shutil.copytree(path, copy)
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    before = acquired_of(copy)

    def same(after: dict[str, np.datetime64]) -> bool:  # NaT never equals NaT: compared apart
        return after.keys() == before.keys() and all(
            (np.isnat(a) and np.isnat(before[k])) or a == before[k] for k, a in after.items())

    assert main(["relocate", "--store", str(copy), str(src), str(moved)]) == 0
    assert all(str(p).startswith(str(moved)) for p in store.read_table(copy)["image_path"])
    assert same(acquired_of(copy))
    assert main(["remove", "--store", str(copy), "b.tif"]) == 0
    assert main(["compact", "--store", str(copy)]) == 0
    assert same(acquired_of(copy))


def test_migrate_from_version_2_adds_acquired_unknown_then_dates_come_from_the_next_ingest(tmp_path, capsys):
    path = tmp_path / "v2.zarr"
    shutil.copytree(FIXTURE_V2, path)
    from pipeline.errors import StoreError

    with pytest.raises(StoreError, match="schema version 2.*aerial-search migrate"):
        open_store(path)
    assert main(["migrate", "--store", str(path)]) == 0
    assert "schema version 2 -> 3" in capsys.readouterr().out
    ds = open_store(path)
    assert np.isnat(ds["acquired"].values).all() and ds["item_id"].values.astype(object).tolist() == ["", ""]
    assert ds.attrs["migrated"]["added"] == ["acquired", "item_id"]
    assert main(["info", "--store", str(path)]) == 0
    assert "acquired      unknown for every image" in capsys.readouterr().out
    uid = str(int(ds["uid"].values[ds["valid"].values][0]))
    assert main(["search", "--store", str(path), "--uid", uid, "--date", "2019/"]) == 2
    err = capsys.readouterr().err
    assert "no searchable image has an acquisition time" in err and "--dates FILE" in err


# --------------------------------------------------------------------------------------------
# --date filters


def brute(path: Path, uid: int, k: int, ids: set[int]) -> list[int]:
    """The k nearest valid tiles of done images ``ids`` to tile ``uid`` (same image's overlapping
    windows excluded as search excludes them), by NumPy."""
    ds = open_store(path)
    fp = ds["fingerprint"].values.astype(np.float64)
    uids, image = ds["uid"].values, ds["image"].values
    row, col = ds["row"].values, ds["col"].values
    q = int(np.flatnonzero(uids == uid)[0])
    keep = ds["valid"].values & np.isin(image, sorted(ids))
    keep &= ~((image == image[q]) & (np.abs(row - row[q]) < 256) & (np.abs(col - col[q]) < 256))
    d = np.sqrt(((fp - fp[q]) ** 2).sum(1))
    cand = np.flatnonzero(keep)
    order = np.lexsort((uids[cand], d[cand]))[:k]
    return [int(u) for u in uids[cand][order]]


def test_search_date_filter_equals_brute_force_and_results_carry_acquired(dated, tmp_path, capsys):
    import geopandas as gpd

    _, _, path = dated
    ds = open_store(path)
    acquired = ds["acquired"].values.astype("datetime64[s]")
    rng = DateRange.parse("2019-01-01/2020-12-31")
    ids = set(np.flatnonzero(rng.mask(acquired)).tolist())
    assert len(ids) == 2
    uid = int(ds["uid"].values[ds["valid"].values & (ds["image"].values == 0)][0])
    out = tmp_path / "r.json"
    capsys.readouterr()
    assert main(["search", "--store", str(path), "--uid", str(uid), "-k", "7", "--date", "2019-01-01/2020-12-31",
                 "--json", str(out), "--geojson", str(tmp_path / "r.geojson"),
                 "--geoparquet", str(tmp_path / "r.parquet")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "left out 2 acquired outside it and 2 without a date" in text
    doc = json.loads(out.read_text())
    assert [int(r["uid"]) for r in doc["results"]] == brute(path, uid, 7, ids)
    assert doc["query"]["date"] == {"from": "2019-01-01T00:00:00Z", "to": "2020-12-31T23:59:59Z", "kept": 2,
                                    "outside": 2, "undated": 2}  # fmt: skip
    by_path = {str(p): a for p, a in zip(ds["image_path"].values, acquired)}
    for r in doc["results"]:
        assert r["acquired"] == f"{np.datetime_as_string(by_path[r['image_path']], unit='s')}Z"
    gj = json.loads((tmp_path / "r.geojson").read_text())
    assert [f["properties"]["acquired"] for f in gj["features"]] == [r["acquired"] for r in doc["results"]]
    gdf = gpd.read_parquet(tmp_path / "r.parquet")
    assert str(gdf["acquired"].dtype).startswith("datetime64") and str(gdf["acquired"].dt.tz) == "UTC"
    assert [v.isoformat().replace("+00:00", "Z") for v in gdf["acquired"]] == [r["acquired"] for r in doc["results"]]
    # open ends, and a range with no image: one line naming what the store holds
    assert main(["search", "--store", str(path), "--uid", str(uid), "-k", "50", "--date", "2021-01-01/",
                 "--json", str(out)]) == 0  # fmt: skip
    assert {r["image_path"].rsplit("/", 1)[-1] for r in json.loads(out.read_text())["results"]} == {"tagged.tif"}
    capsys.readouterr()
    assert main(["search", "--store", str(path), "--uid", str(uid), "--date", "1990/1991"]) == 2
    err = capsys.readouterr().err
    assert "no image acquired in that range" in err and "2018-05-01T00:00:00Z to 2021-07-04T12:00:00Z" in err


def test_classify_and_heatmap_take_the_date_filter(dated, tmp_path):
    _, _, path = dated
    ds = open_store(path)
    valid = ds["valid"].values
    image = ds["image"].values
    pos = [str(int(u)) for u in ds["uid"].values[valid & (image == 1)][:2]]
    neg = [str(int(u)) for u in ds["uid"].values[valid & (image == 3)][:2]]
    out = tmp_path / "c.json"
    argv = ["classify", "--store", str(path), *sum([["--positive", u] for u in pos], []),
            *sum([["--negative", u] for u in neg], []), "-k", "40", "--date", "2020", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["results"] and {r["image_path"].rsplit("/", 1)[-1] for r in doc["results"]} == {
        "m_3008601_ne_16_060_20200315.tif"}
    assert doc["query"]["date"]["kept"] == 1
    maps = tmp_path / "maps"
    assert main(["heatmap", "--store", str(path), "--uid", pos[0], "--out", str(maps), "--date", "2019/2021"]) == 0
    assert sorted(p.name for p in maps.glob("*.tif")) == ["b.tif", "m_3008601_ne_16_060_20200315.tif", "tagged.tif"]


def test_http_api_takes_date_and_images_carry_acquired(dated):
    from fastapi.testclient import TestClient

    from pipeline.serve.app import create_app
    from pipeline.serve.service import Service

    _, _, path = dated
    service = Service.open(str(path))
    try:
        client = TestClient(create_app(service))
        ds = open_store(path)
        uid = int(ds["uid"].values[ds["valid"].values & (ds["image"].values == 0)][0])
        ids = set(np.flatnonzero(DateRange.parse("2019/2020").mask(ds["acquired"].values)).tolist())
        r = client.get("/api/search", params={"uid": str(uid), "k": 6, "date": "2019/2020"})
        assert r.status_code == 200, r.text
        assert [int(x["uid"]) for x in r.json()["results"]] == brute(path, uid, 6, ids)
        assert r.json()["query"]["date"]["undated"] == 2
        r = client.post("/api/search", json={"uid": [str(uid)], "k": 6, "date": "2019/2020"})
        assert [int(x["uid"]) for x in r.json()["results"]] == brute(path, uid, 6, ids)
        r = client.get("/api/search", params={"uid": str(uid), "date": "2019/tomorrow"})
        assert r.status_code == 400 and "not an ISO date" in r.json()["error"]
        feats = client.get("/api/images").json()["features"]
        assert {f["properties"]["name"]: f["properties"]["acquired"] for f in feats}["tagged.tif"] == "2021-07-04T12:00:00Z"
    finally:
        service.close()


# --------------------------------------------------------------------------------------------
# STAC sources


def _item(pystac, item_id: str, href: str, when: str, bbox, assets: dict[str, dict] | None = None):
    import datetime as dt

    from shapely.geometry import box, mapping

    item = pystac.Item(item_id, mapping(box(*bbox)), list(bbox),
                       dt.datetime.fromisoformat(when).replace(tzinfo=dt.timezone.utc), {})  # fmt: skip
    item.add_asset("thumbnail", pystac.Asset(href.replace(".tif", ".png"), media_type="image/png", roles=["thumbnail"]))
    item.add_asset("visual", pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["visual"]))
    return item


@pytest.fixture(scope="module")
def stac_items(tmp_path_factory):
    """Three GeoTIFFs and STAC items around them (two dates), as an ItemCollection file with
    absolute hrefs (what pystac-client saves) and as a static catalogue with relative ones."""
    import pystac

    root = tmp_path_factory.mktemp("stac")
    items = []
    for k, when in enumerate(["2019-11-09T16:00:00", "2019-11-09T16:00:00", "2021-10-02T15:30:00"]):
        tif = write_tif(root / "data" / f"scene{k}.tif" if (root / "data").mkdir(exist_ok=True) is None else None,
                        textured(512, 512, seed=500 + k), transform=(0.5, 0, 400000.0 + 1000 * k, 0, -0.5, 3300000.0))  # fmt: skip
        items.append(_item(pystac, f"item-{k}", str(tif), when, (-82.0, 29.8, -81.99, 29.81)))
    ic = pystac.ItemCollection(items)
    ic.save_object(dest_href=str(root / "search.json"))
    cat = pystac.Catalog("archive", "a static catalogue")
    for item in items:
        cat.add_item(item.clone())
    cat.normalize_hrefs(str(root / "catalog"))
    cat.make_all_asset_hrefs_relative()
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    saved = json.loads((root / "catalog" / "item-0" / "item-0.json").read_text())
    assert saved["assets"]["visual"]["href"] == "../../data/scene0.tif"  # relative, as the test means
    return root


def test_a_stac_item_collection_ingests_with_dates_and_ids_and_search_filters_by_date(stac_items, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(stac_items / "search.json"), "--store", str(path), *PROBE]) == 0
    table = store.read_table(path)
    assert [Path(str(p)).name for p in table["image_path"]] == ["scene0.tif", "scene1.tif", "scene2.tif"]
    assert table["item_id"].tolist() == ["item-0", "item-1", "item-2"]
    assert np.asarray(table["acquired"], "datetime64[s]").tolist() == [
        t("2019-11-09T16:00:00").item(), t("2019-11-09T16:00:00").item(), t("2021-10-02T15:30:00").item()]
    capsys.readouterr()
    assert main(["info", "--store", str(path)]) == 0
    assert "2019-11-09T16:00:00Z to 2021-10-02T15:30:00Z (done images per year: 2019: 2, 2021: 1)" in capsys.readouterr().out
    ds = open_store(path)
    uid = int(ds["uid"].values[ds["valid"].values & (ds["image"].values == 0)][0])
    out = tmp_path / "r.json"
    assert main(["search", "--store", str(path), "--uid", str(uid), "-k", "100", "--date", "2021-01-01/",
                 "--json", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())["results"]
    assert res and {r["image_path"].rsplit("/", 1)[-1] for r in res} == {"scene2.tif"}
    assert {r["acquired"] for r in res} == {"2021-10-02T15:30:00Z"}
    # the static catalogue (relative hrefs) gives the same images and dates
    cpath = tmp_path / "c.zarr"
    assert main(["ingest", str(stac_items / "catalog" / "catalog.json"), "--store", str(cpath), *PROBE,
                 "--asset", "visual"]) == 0  # fmt: skip
    ctable = store.read_table(cpath)
    assert ctable["image_path"].tolist() == table["image_path"].tolist()
    assert np.array_equal(np.asarray(ctable["acquired"], "datetime64[s]"), np.asarray(table["acquired"], "datetime64[s]"))


def test_a_missing_stac_asset_is_one_line_naming_the_available_keys(stac_items, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    capsys.readouterr()
    assert main(["ingest", str(stac_items / "search.json"), "--store", str(path), *PROBE, "--asset", "analytic"]) == 2
    err = "\n".join(x for x in capsys.readouterr().err.splitlines() if "warning:" not in x)
    assert len(err.splitlines()) == 1 and "has no asset 'analytic'" in err and "thumbnail, visual" in err
    assert not path.exists()
