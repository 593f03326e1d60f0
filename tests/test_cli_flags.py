"""Every documented flag through the command line, each checked by its effect read back from the
store, the JSON output or a NumPy brute force (flags tested elsewhere are not repeated here:
test_cli, test_search, test_examples, test_upkeep, test_driver). The last test checks, from the
parsers themselves, that the suite's command lines used every flag."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_store, textured, write_tif

from pipeline import open_store
from pipeline.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def archive(flights):
    return flights


@pytest.fixture(scope="module")
def built(flights, ingest_store):
    return ingest_store(flights)


def load(path):
    ds = open_store(path)
    return {n: ds[n].values for n in ("fingerprint", "valid", "uid", "image", "row", "col", "lon", "lat")}


def run_json(argv, tmp_path):
    out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    assert main([*argv, "--json", str(out)]) == 0, argv
    return json.loads(out.read_text())


def overlaps(s, q):
    """Tiles overlapping tile q: same image within 256 px, or intersecting ground boxes."""
    same = (
        (s["image"] == s["image"][q]) & (np.abs(s["row"] - s["row"][q]) < 256) & (np.abs(s["col"] - s["col"][q]) < 256)
    )
    dx = (s["lon"] - s["lon"][q]) * 111_320 * np.cos(np.radians(s["lat"][q]))
    dy = (s["lat"] - s["lat"][q]) * 111_320
    return same | ((s["image"] != s["image"][q]) & (np.abs(dx) < 128) & (np.abs(dy) < 128))


def brute(s, qvec, k, allowed):
    d = np.sqrt(((s["fingerprint"].astype(np.float64) - qvec) ** 2).sum(1))
    idx = np.flatnonzero(allowed & s["valid"])
    order = idx[np.lexsort((s["uid"][idx], d[idx]))][:k]
    return [str(int(u)) for u in s["uid"][order]]


def test_search_filters_bbox_images_diverse_and_uids_file(built, tmp_path):
    s = load(built)
    q = int(np.flatnonzero(s["valid"] & (s["image"] == 0))[4])
    uid = str(int(s["uid"][q]))
    base = ["search", "--store", str(built), "--uid", uid]
    near = ~overlaps(s, q)
    lon, lat = s["lon"][s["valid"]], s["lat"][s["valid"]]
    w, e = float(np.quantile(lon, 0.2)), float(np.quantile(lon, 0.8))
    south, north = float(lat.min()), float(np.quantile(lat, 0.6))
    doc = run_json([*base, "-k", "12", f"--bbox={w},{south},{e},{north}"], tmp_path)
    inside = (s["lon"] >= w) & (s["lon"] <= e) & (s["lat"] >= south) & (s["lat"] <= north)
    assert [r["uid"] for r in doc["results"]] == brute(s, s["fingerprint"][q], 12, near & inside)
    doc = run_json([*base, "-k", "5", "--images", "c_far*"], tmp_path)
    assert [r["uid"] for r in doc["results"]] == brute(s, s["fingerprint"][q], 5, near & (s["image"] == 2))
    doc = run_json([*base, "-k", "6", "--diverse"], tmp_path)
    picked = [int(r["uid"]) for r in doc["results"]]
    slots = [int(np.flatnonzero(s["uid"] == u)[0]) for u in picked]
    assert len(picked) == 6 and not any(overlaps(s, a)[b] for i, a in enumerate(slots) for b in slots[i + 1 :])
    plain = run_json([*base, "-k", "6"], tmp_path)
    assert [int(r["uid"]) for r in plain["results"]] != picked
    (tmp_path / "uids.txt").write_text(f"# queries\n{uid}\n{int(s['uid'][q + 1])}\n")
    docs = run_json(["search", "--store", str(built), "--uids-file", str(tmp_path / "uids.txt"), "-k", "3"], tmp_path)
    assert [d["query"]["uid"] for d in docs] == [uid, str(int(s["uid"][q + 1]))]
    assert [r["uid"] for r in docs[0]["results"]] == brute(s, s["fingerprint"][q], 3, near)


def test_search_raw_qe_alpha_and_split_every(built, tmp_path):
    path = copy_store(built, tmp_path / "p.zarr")
    assert main(["postprocess", "--store", str(path), "--method", "l2"]) == 0
    s = load(path)
    q = int(np.flatnonzero(s["valid"])[7])
    near = ~overlaps(s, q)
    base = ["search", "--store", str(path), "--uid", str(int(s["uid"][q])), "-k", "5"]
    xn = s["fingerprint"] / np.linalg.norm(s["fingerprint"], axis=1, keepdims=True).clip(1e-12)
    post = run_json(base, tmp_path)
    assert [r["uid"] for r in post["results"]] == brute({**s, "fingerprint": xn}, xn[q], 5, near)
    raw = run_json([*base, "--raw", "--split-every", "2"], tmp_path)
    assert [r["uid"] for r in raw["results"]] == brute(s, s["fingerprint"][q], 5, near)
    first = brute({**s, "fingerprint": xn}, xn[q], 3, near)
    acc = xn[q].astype(np.float64).copy()
    for u in first:
        nb = xn[np.flatnonzero(s["uid"] == int(u))[0]]
        acc += max(float(xn[q] @ nb), 0.0) ** 2.0 * nb
    expanded = acc / np.linalg.norm(acc)
    qe = run_json([*base, "--qe", "3", "--alpha", "2"], tmp_path)
    assert [r["uid"] for r in qe["results"]] == brute({**s, "fingerprint": xn}, expanded, 5, near)


def test_query_store_and_image_queries_with_resize(archive, built, tmp_path):
    """--query-store takes a tile of another store of the same model; --image of any size is
    resized so its shorter side is 256 px (bilinear, antialiased) and centre-cropped."""
    from PIL import Image

    from pipeline.render import read_tile

    other = tmp_path / "other.zarr"
    assert main(["ingest", str(archive / "c_far.tif"), "--store", str(other), "--model", "probe", "--chunk-px", "384",
                 "--no-progress"]) == 0  # fmt: skip
    o = load(other)
    t = int(np.flatnonzero(o["valid"])[2])
    doc = run_json(["search", "--store", str(built), "--query-store", str(other), "--uid", str(int(o["uid"][t])),
                    "-k", "4", "--include-overlapping"], tmp_path)  # fmt: skip
    s = load(built)
    assert [r["uid"] for r in doc["results"]] == brute(s, o["fingerprint"][t], 4, np.ones(len(s["uid"]), bool))
    assert doc["results"][0]["distance"] < 1e-3  # the same pixels are in this store
    q = int(np.flatnonzero(s["valid"] & (s["image"] == 0))[5])
    px = read_tile(str(open_store(built)["image_path"].values[0]), int(s["row"][q]), int(s["col"][q]))
    # 256 x 512: already 256 on its shorter side, so the centre crop is exactly the middle tile.
    junk = textured(256, 128, seed=5)
    Image.fromarray(np.concatenate([junk, px, junk], axis=2).transpose(1, 2, 0)).save(tmp_path / "wide.png")
    doc = run_json(["search", "--store", str(built), "--image", str(tmp_path / "wide.png"), "-k", "3",
                    "--include-overlapping", "--device", "cpu"], tmp_path)  # fmt: skip
    assert doc["query"]["type"] == "image"
    assert doc["results"][0]["uid"] == str(int(s["uid"][q])) and doc["results"][0]["distance"] < 1e-3
    # 384 x 640: torchvision's Resize(256) (bilinear, antialiased) + CenterCrop(256) is the rule.
    import torch
    import torchvision.transforms.functional as F

    from pipeline.embed import ModelSpec, embed_batch

    big = textured(384, 640, seed=8)
    Image.fromarray(big.transpose(1, 2, 0)).save(tmp_path / "big.png")
    doc = run_json(["search", "--store", str(built), "--image", str(tmp_path / "big.png"), "-k", "5",
                    "--include-overlapping"], tmp_path)  # fmt: skip
    ref = F.center_crop(F.resize(torch.from_numpy(big).float(), 256, antialias=True), 256).round().clamp(0, 255)
    fp = embed_batch(ref.to(torch.uint8).numpy()[None], ModelSpec(arch="probe", weights="random", torch_threads=1))[0]
    assert [r["uid"] for r in doc["results"]] == brute(s, fp, 5, np.ones(len(s["uid"]), bool))


def test_search_weights_names_a_copy_of_the_store_weights(archive, tmp_path, capsys):
    import torch
    import torchvision

    torch.manual_seed(3)
    w = tmp_path / "net.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), w)  # a weights file: the subject here
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(archive / "c_far.tif"), "--store", str(path), "--model", "squeezenet1_1", "--weights",
                 str(w), "--no-progress"]) == 0  # fmt: skip
    s = load(path)
    q = int(np.flatnonzero(s["valid"])[1])
    from PIL import Image

    from pipeline.render import read_tile

    Image.fromarray(read_tile(str(archive / "c_far.tif"), int(s["row"][q]), int(s["col"][q])).transpose(1, 2, 0)).save(
        tmp_path / "q.png"
    )
    copy = tmp_path / "copy" / "net.pth"
    copy.parent.mkdir()
    shutil.copy(w, copy)
    w.unlink()  # the store's file is gone; a copy is named on the command line
    base = ["search", "--store", str(path), "--image", str(tmp_path / "q.png"), "-k", "2", "--include-overlapping"]
    assert main(base) == 2
    assert "pass --weights PATH" in capsys.readouterr().err
    doc = run_json([*base, "--weights", str(copy)], tmp_path)
    assert doc["results"][0]["uid"] == str(int(s["uid"][q])) and doc["results"][0]["distance"] < 1e-3
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), copy)  # another network
    capsys.readouterr()
    assert main([*base, "--weights", str(copy)]) == 2
    assert "sha256" in capsys.readouterr().err


def test_ingest_layout_and_model_flags_reach_the_store(archive, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  progress: false\n")
    path = tmp_path / "s.zarr"
    rc = main(["ingest", str(archive / "c_far.tif"), "--store", str(path), "--weights", "random", "--model", "probe",
               "--bands", "3,2,1", "--black-level", "5", "--chunk-px", "256", "--chunk-tiles", "4", "--dtype", "float16",
               "--compressor", "none", "--batch-size", "4", "--device", "cpu", "--amp", "none", "--torch-threads", "1",
               "--threads", "1", "--scheduler", "threads", "--config", str(cfg), "-v"])  # fmt: skip
    assert rc == 0
    ds = open_store(path)
    c = ds.attrs["config"]
    assert ds.attrs["preprocessing"]["bands"] == [3, 2, 1] and ds.attrs["preprocessing"]["black_level"] == 5
    assert (c["read"]["chunk_px"], c["store"]["chunk_tiles"], c["store"]["dtype"], c["store"]["compressor"]) == (
        256, 4, "float16", "none")  # fmt: skip
    assert (c["model"]["batch_size"], c["model"]["device"], c["model"]["torch_threads"], c["cluster"]["threads"]) == (
        4, "cpu", 1, 1)  # fmt: skip
    assert ds["fingerprint"].dtype == np.float16 and ds["fingerprint"].encoding["chunks"] == (4, 512)
    f = write_tif(tmp_path / "f.tif", (textured(300, 300, seed=6) / 255.0).astype("float32"))
    assert main(["ingest", str(f), "--store", str(tmp_path / "f.zarr"), "--model", "probe", "--scale", "0,1"]) == 0
    assert open_store(tmp_path / "f.zarr").attrs["preprocessing"]["scale"] == [0.0, 1.0]


def test_ingest_hash_overwrite_strict_and_exit_status(archive, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    a = tmp_path / "a.tif"
    shutil.copy(archive / "a.tif", a)
    base = ["ingest", "--store", str(path), "--model", "probe", "--no-progress"]
    assert main([*base[:1], str(a), *base[1:], "--hash"]) == 0
    assert open_store(path)["sha256"].values.astype(object)[0]
    os.utime(a, (5, 5))  # touched, same bytes: unchanged by content
    capsys.readouterr()
    assert main([*base[:1], str(a), *base[1:], "--hash"]) == 0
    assert "0 fingerprinted, 1 unchanged" in capsys.readouterr().out
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    capsys.readouterr()
    assert main([*base[:1], str(a), str(bad), *base[1:], "--hash"]) == 1  # finished, one file failed
    assert "FAILED" in capsys.readouterr().out
    assert main([*base[:1], str(bad), str(a), *base[1:], "--strict"]) == 2  # stops at the bad file
    before = open_store(path)["uid"].values.copy()
    assert main([*base[:1], str(archive / "c_far.tif"), *base[1:], "--overwrite"]) == 0
    after = open_store(path)
    assert after.sizes["img"] == 1 and not np.array_equal(after["uid"].values, before)


def test_postprocess_pca_dims_sample_and_info(built, tmp_path, capsys):
    path = copy_store(built, tmp_path / "p.zarr")
    assert main(["postprocess", "--store", str(path), "--method", "pca", "--dims", "8", "--sample", "40"]) == 0
    ds = open_store(path)
    assert ds["post_projection"].shape == (512, 8) and ds.attrs["postprocess"]["fitted_on_tiles"] == 40
    capsys.readouterr()
    assert main(["info", "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "'method': 'pca'" in out and f"{int(ds['valid'].values.sum())} valid" in out


def test_relocate_dry_run_changes_nothing(archive, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(archive, src)
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(src / "c_far.tif"), "--store", str(path), "--model", "probe", "--no-progress"]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    capsys.readouterr()
    assert main(["relocate", "--store", str(path), str(src), str(moved), "--dry-run"]) == 0
    assert "would move" in capsys.readouterr().out
    assert open_store(path)["image_path"].values[0] == str(src / "c_far.tif")


def test_evaluate_tune_picks_on_one_half(tmp_path):
    from PIL import Image

    for c, seed in (("fields", 1), ("roofs", 2), ("water", 3)):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(textured(256, 256, seed=seed * 10 + i % 3).transpose(1, 2, 0)).save(
                tmp_path / "set" / c / f"{i}.png"
            )
    out = tmp_path / "ev"
    assert main(["evaluate", str(tmp_path / "set"), "--weights", "random", "--model", "probe", "--options", "l2",
                 "--tune", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    grid = [t["options"] for t in report["tuning"]["grid"]]  # 18 post/DBA/QE settings + 18 diffusion ones
    assert len(grid) == 36 and sum("diffusion" in g for g in grid) == 18
    assert report["tuning"]["chosen"] == report["runs"][-1]["options"]
    best = max(report["tuning"]["grid"], key=lambda t: t["mAP_tuning_half"])
    assert report["tuning"]["chosen"] == best["options"]


def test_demo_runs_end_to_end_on_local_samples(archive, tmp_path, monkeypatch, capsys):
    """`aerial-search demo` with its flags; the samples come from a local folder here (the real
    download is the slow-marked test below)."""
    from pipeline import demo

    samples = [archive / "a.tif", archive / "b.tif", archive / "c_far.tif"]
    monkeypatch.setattr(demo, "sample_images", lambda dest=None: samples)
    out = tmp_path / "d"
    assert main(["demo", "--out", str(out), "--model", "probe", "--weights", "random", "-k", "4"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["results"]) == 4 and (out / "sheet.png").stat().st_size > 0
    s = load(out / "demo.zarr")
    q = int(np.flatnonzero(s["uid"] == int(doc["query"]["uid"]))[0])
    assert s["image"][q] == 0
    assert "demo done" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_downloads_its_samples(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "d"), "--weights", "random", "-k", "3"]) == 0
    assert (tmp_path / "d" / "sheet.png").is_file()


def test_weights_fetch_dest(tmp_path, capsys):
    """`weights fetch ... --dest`: a file already built there is reused, not rebuilt (the build
    itself is tested in test_weights against the package index)."""
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "squeezenet1_1-imagenet.pth").write_bytes(b"built earlier")
    assert main(["weights", "fetch", "squeezenet1_1", "--dest", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"--weights {dest / 'squeezenet1_1-imagenet.pth'}" in out
    assert (dest / "squeezenet1_1-imagenet.pth").read_bytes() == b"built earlier"


def _sigmoid_ranking(s, coef, intercept, allowed, k):
    p = 1 / (1 + np.exp(-(s["x"] @ coef + intercept)))
    idx = np.flatnonzero(allowed & s["valid"])
    return idx[np.lexsort((s["uid"][idx], -p[idx]))][:k], p


def test_classify_seed_raw_filters_and_outputs(built, tmp_path):
    """classify's own flags: --seed draws the background (same seed, same model), --raw fits on
    raw fingerprints, the filters and --diverse shape the ranking by the saved model's
    probability (a NumPy oracle), --include-overlapping lets example tiles back in, and the
    outputs (--geojson, --geoparquet, --dissolve, --pixel-coords, --sheet) hold the results."""
    import geopandas as gpd

    path = copy_store(built, tmp_path / "h.zarr")
    assert main(["postprocess", "--store", str(path), "--method", "hellinger"]) == 0
    s = load(path)
    in_a = np.flatnonzero(s["valid"] & (s["image"] == 0))
    pos = [int(s["uid"][in_a[0]]), int(s["uid"][in_a[-1]])]
    neg = int(s["uid"][np.flatnonzero(s["valid"] & (s["image"] == 2))[3]])
    base = ["classify", "--store", str(path), "--positive", str(pos[0]), "--positive", str(pos[1]), "--negative",
            str(neg), "--background", "30"]  # fmt: skip
    saved = []
    for extra in (["--seed", "1"], ["--seed", "1"], ["--seed", "2"], ["--seed", "1", "--raw"]):
        m = tmp_path / f"m{len(saved)}.json"
        assert main([*base, *extra, "-k", "3", "--save", str(m)]) == 0
        saved.append(json.loads(m.read_text()))
    assert saved[0]["coef"] == saved[1]["coef"] and saved[0]["coef"] != saved[2]["coef"]
    assert saved[0]["signature"]["postprocess"]["method"] == "hellinger" and saved[3]["signature"]["postprocess"] is None
    x = s["fingerprint"].astype(np.float64)
    s["x"] = np.sign(x) * np.sqrt(np.abs(x))
    s["x"] /= np.linalg.norm(s["x"], axis=1, keepdims=True).clip(1e-12)
    coef, intercept = np.asarray(saved[0]["coef"]), saved[0]["intercept"]
    near = ~np.any([overlaps(s, int(np.flatnonzero(s["uid"] == u)[0])) for u in [*pos, neg]], axis=0)
    lon = s["lon"][s["valid"] & np.isfinite(s["lon"])]
    w, e = float(lon.min()), float(np.quantile(lon, 0.7))
    out = {n: tmp_path / f"c.{n}" for n in ("json", "geojson", "parquet", "png")}
    assert main([*base, "--seed", "1", "-k", "5", f"--bbox={w},-90,{e},90", "--images", "*.tif", "--diverse",
                 "--json", str(out["json"]), "--geojson", str(out["geojson"]), "--geoparquet", str(out["parquet"]),
                 "--sheet", str(out["png"])]) == 0  # fmt: skip
    doc = json.loads(out["json"].read_text())
    inside = (s["lon"] >= w) & (s["lon"] <= e)
    got = [int(r["uid"]) for r in doc["results"]]
    slots = [int(np.flatnonzero(s["uid"] == u)[0]) for u in got]
    assert len(got) == 5 and inside[slots].all() and near[slots].all()
    assert not any(overlaps(s, a)[b] for i, a in enumerate(slots) for b in slots[i + 1 :])  # --diverse
    ranked, p = _sigmoid_ranking(s, coef, intercept, near & inside, 100)
    np.testing.assert_allclose([r["score"] for r in doc["results"]], p[slots], rtol=1e-5)
    assert list(ranked[:1]) == slots[:1]  # the best tile is the oracle's best
    features = json.loads(out["geojson"].read_text())["features"]
    assert [f["properties"]["uid"] for f in features] == [r["uid"] for r in doc["results"]]
    assert gpd.read_parquet(out["parquet"])["uid"].tolist() == [r["uid"] for r in doc["results"]]
    assert out["png"].stat().st_size > 10_000
    # --include-overlapping: with --min-score 0 every allowed tile passes; the examples' tiles too
    counts = {}
    for extra in ([], ["--include-overlapping"]):
        assert main([*base, "--seed", "1", "--min-score", "0", "--limit", "5", *extra, "--json", str(out["json"])]) == 0
        counts[bool(extra)] = json.loads(out["json"].read_text())["total_passed"]
    assert counts == {False: int((near & s["valid"]).sum()), True: int(s["valid"].sum())}
    # --dissolve merges touching hits per image; --pixel-coords keeps the hits of images without a CRS
    nocrs = ["--images", "e_nocrs*", "-k", "6", "--geojson", str(out["geojson"])]
    assert main([*base, *nocrs]) == 0
    assert json.loads(out["geojson"].read_text())["features"] == []  # no CRS: left out
    assert main([*base, *nocrs, "--pixel-coords", "--dissolve"]) == 0
    feats = json.loads(out["geojson"].read_text())["features"]
    assert feats and sum(f["properties"]["hits"] for f in feats) == 6 and len(feats) < 6


def test_heatmap_queries_lonlat_image_examples_raw(built, flights, tmp_path):
    """heatmap's query flags, each map checked pixel by pixel against a NumPy oracle of the same
    query (--raw: the raw fingerprints, not the store's post-processing)."""
    import rasterio
    from PIL import Image

    from pipeline.render import read_tile

    path = copy_store(built, tmp_path / "h.zarr")
    assert main(["postprocess", "--store", str(path), "--method", "l2"]) == 0
    s = load(path)
    a = np.flatnonzero(s["valid"] & (s["image"] == 0))
    t = int(a[6])

    def grid_of(out: Path) -> np.ndarray:
        with rasterio.open(out / "a.tif") as src:
            return src.read(1)

    def oracle(score: np.ndarray) -> np.ndarray:
        mine = s["image"] == 0
        g = np.full((int(s["row"][mine].max()) // 128 + 1, int(s["col"][mine].max()) // 128 + 1), np.nan)
        for i in np.flatnonzero(mine & s["valid"]):
            g[s["row"][i] // 128, s["col"][i] // 128] = score[i]
        return g

    x = s["fingerprint"].astype(np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    run = lambda out, *q: main(["heatmap", "--store", str(path), "--out", str(tmp_path / out), *q])  # noqa: E731
    assert run("lonlat", f"--lonlat={s['lon'][t]},{s['lat'][t]}") == 0
    np.testing.assert_allclose(grid_of(tmp_path / "lonlat"), oracle(np.linalg.norm(xn - xn[t], axis=1)), atol=1e-4)
    Image.fromarray(read_tile(str(flights / "a.tif"), int(s["row"][t]), int(s["col"][t])).transpose(1, 2, 0)).save(
        tmp_path / "q.png")  # fmt: skip
    assert run("image", "--image", str(tmp_path / "q.png"), "--raw") == 0
    np.testing.assert_allclose(grid_of(tmp_path / "image"), oracle(np.linalg.norm(x - x[t], axis=1)), atol=1e-3)
    p1, p2, n1 = int(a[0]), int(a[-1]), int(np.flatnonzero(s["valid"] & (s["image"] == 2))[2])
    near = lambda e: np.sqrt(((xn[:, None, :] - xn[e][None]) ** 2).sum(-1)).min(axis=1)  # noqa: E731
    want = oracle(near([p1, p2]) - 0.3 * near([n1]))
    assert run("nearest", "--positive", str(int(s["uid"][p1])), "--positive", str(int(s["uid"][p2])), "--negative",
               str(int(s["uid"][n1])), "--score", "nearest", "--negative-weight", "0.3") == 0  # fmt: skip
    np.testing.assert_allclose(grid_of(tmp_path / "nearest"), want, atol=1e-4)
    (tmp_path / "ex.csv").write_text(f"uid,label\n{int(s['uid'][p1])},positive\n{int(s['uid'][p2])},positive\n"
                                     f"{int(s['uid'][n1])},negative\n")  # fmt: skip
    assert run("file", "--examples", str(tmp_path / "ex.csv"), "--score", "nearest", "--negative-weight", "0.3") == 0
    np.testing.assert_array_equal(grid_of(tmp_path / "file"), grid_of(tmp_path / "nearest"))


def test_heatmap_image_query_with_a_copy_of_the_stores_weights(flights, tmp_path, capsys):
    """heatmap --image --weights: the store's weights file is gone; a copy is named (by sha256)."""
    import rasterio
    import torch
    import torchvision
    from PIL import Image

    from pipeline.render import read_tile

    torch.manual_seed(4)
    w = tmp_path / "net.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), w)
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(flights / "c_far.tif"), "--store", str(path), "--model", "squeezenet1_1", "--weights",
                 str(w), "--no-progress"]) == 0  # fmt: skip
    s = load(path)
    q = int(np.flatnonzero(s["valid"])[4])
    Image.fromarray(read_tile(str(flights / "c_far.tif"), int(s["row"][q]), int(s["col"][q])).transpose(1, 2, 0)).save(
        tmp_path / "q.png")  # fmt: skip
    copy = tmp_path / "copy.pth"
    shutil.move(w, copy)
    out = tmp_path / "hm"
    assert main(["heatmap", "--store", str(path), "--image", str(tmp_path / "q.png"), "--out", str(out)]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["heatmap", "--store", str(path), "--image", str(tmp_path / "q.png"), "--weights", str(copy),
                 "--out", str(out)]) == 0  # fmt: skip
    with rasterio.open(out / "c_far.tif") as src:
        values = src.read(1)
    assert values[s["row"][q] // 128, s["col"][q] // 128] < 1e-3 and np.nanmin(values) >= 0


def test_evaluate_model_flags_give_the_same_rankings(tmp_path, capsys):
    """evaluate's model flags (--device, --batch-size, --torch-threads, --amp) change how the
    fingerprints are computed, not what they are: the metrics equal the default run's; --amp
    on the CPU says it applies to CUDA only."""
    from PIL import Image

    for c, seed in (("fields", 1), ("roofs", 2)):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(textured(256, 256, seed=seed * 10 + i).transpose(1, 2, 0)).save(tmp_path / "set" / c / f"{i}.png")
    runs = {}
    for name, extra in (("default", []), ("flags", ["--device", "cpu", "--batch-size", "3", "--torch-threads", "1",
                                                    "--amp", "bf16"])):  # fmt: skip
        out = tmp_path / name
        assert main(["evaluate", str(tmp_path / "set"), "--model", "probe", "--options", "none", "--out", str(out),
                     *extra]) == 0  # fmt: skip
        runs[name] = json.loads((out / "metrics.json").read_text())["runs"]
    assert "CUDA only" in capsys.readouterr().err
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(runs["flags"]) == strip(runs["default"])


def _subcommands(parser) -> dict[str, object]:
    """Every (sub)command's parser by its path: ``{"search": ..., "weights fetch": ...}``."""
    import argparse

    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = _subcommands(sub)
                out.update({f"{name} {k}": v for k, v in inner.items()} if inner else {name: sub})
    return out


def _options(sub) -> set[str]:
    return {o for a in sub._actions for o in a.option_strings if o not in ("-h", "--help")}


def test_every_cli_flag_is_documented_and_run_by_the_suite():
    """The flags come from the argparse parsers themselves. Each is documented in README, README's
    command-line block names no flag the parsers lack, and each is used by at least one command
    line that the suite really ran (``pipeline.cli.main`` logs every one to $AERIAL_SEARCH_ARGV_LOG,
    in this process and in subprocesses; conftest runs this test last). Flags of the shared
    groups (``--config``, ``--verbose``, the scheduler flags) count once for all commands."""
    import argparse
    import os

    from pipeline.cli import ARGV_LOG, build_parser
    from pipeline.commands.common import add_cluster, add_common

    commands = _subcommands(build_parser())
    shared = argparse.ArgumentParser()
    add_common(shared)
    add_cluster(shared)
    shared_flags = _options(shared)
    readme = README.read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    every = set().union(*(_options(sub) for sub in commands.values()))
    assert sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-k)\b", block)) - every) == []  # no stale docs
    undocumented = sorted(f for f in every if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", readme))
    assert undocumented == [], undocumented
    assert set(commands) >= {"ingest", "search", "classify", "heatmap", "serve", "info", "postprocess", "remove",
                             "relocate", "compact", "migrate", "evaluate", "demo", "weights fetch"}  # fmt: skip
    used: dict[str, set[str]] = {name: set() for name in commands}
    runs = [json.loads(line) for line in Path(os.environ[ARGV_LOG]).read_text().splitlines() if line.strip()]
    for argv in runs:
        words = [a for a in argv if not a.startswith("-")]
        name = " ".join(words[:2]) if " ".join(words[:2]) in commands else (words[0] if words else "")
        if name not in commands:
            continue
        options = commands[name]._option_string_actions
        for token in argv:
            action = options.get(token.split("=", 1)[0]) if token.startswith("-") else None
            if action is not None:
                used[name] |= set(action.option_strings)
    shared_used = set().union(*used.values()) & shared_flags
    missing = {name: sorted(_options(sub) - used[name] - (shared_flags & shared_used) - {"--help"})
               for name, sub in commands.items()}  # fmt: skip
    missing = {k: v for k, v in missing.items() if v}
    assert missing == {}, f"flags no command line of the suite used (of {len(runs)} runs): {missing}"
