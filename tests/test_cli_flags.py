"""Every documented flag through the command line, each checked by its effect read back from the
store, the JSON output or a NumPy brute force (flags tested elsewhere are not repeated here:
test_cli, test_search, test_upkeep, test_driver)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline import grid, open_store
from pipeline.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
PX = 0.5


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    base = textured(900, 1300, seed=101)
    write_tif(root / "a.tif", base[:, :768, :768], transform=(PX, 0, 400000.0, 0, -PX, 3300000.0))
    write_tif(root / "b.tif", base[:, 100:740, 500:1268], transform=(PX, 0, 400250.0, 0, -PX, 3299950.0))
    far = textured(512, 768, seed=102)
    write_tif(root / "c_far.tif", far, transform=(PX, 0, 460000.0, 0, -PX, 3300000.0))
    return root


@pytest.fixture(scope="module")
def built(archive, tmp_path_factory):
    path = tmp_path_factory.mktemp("flagstore") / "s.zarr"
    assert main(["ingest", str(archive), "--store", str(path), "--weights", "random", "--chunk-px", "384",
                 "--chunk-tiles", "8", "--no-progress"]) == 0  # fmt: skip
    return path


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
    path = tmp_path / "p.zarr"
    shutil.copytree(built, path)
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
    assert (
        main(["ingest", str(archive / "c_far.tif"), "--store", str(other), "--weights", "random", "--no-progress"]) == 0
    )
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
    fp = embed_batch(ref.to(torch.uint8).numpy()[None], ModelSpec(weights="random", torch_threads=1))[0]
    assert [r["uid"] for r in doc["results"]] == brute(s, fp, 5, np.ones(len(s["uid"]), bool))


def test_search_weights_names_a_copy_of_the_store_weights(archive, tmp_path, capsys):
    import torch
    import torchvision

    torch.manual_seed(3)
    w = tmp_path / "net.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), w)
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(archive / "c_far.tif"), "--store", str(path), "--weights", str(w), "--no-progress"]) == 0
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
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), copy)  # another network
    capsys.readouterr()
    assert main([*base, "--weights", str(copy)]) == 2
    assert "sha256" in capsys.readouterr().err


def test_ingest_layout_and_model_flags_reach_the_store(archive, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  progress: false\n")
    path = tmp_path / "s.zarr"
    rc = main(["ingest", str(archive / "c_far.tif"), "--store", str(path), "--weights", "random", "--model", "resnet18",
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
    assert main(["ingest", str(f), "--store", str(tmp_path / "f.zarr"), "--weights", "random", "--scale", "0,1"]) == 0
    assert open_store(tmp_path / "f.zarr").attrs["preprocessing"]["scale"] == [0.0, 1.0]


def test_ingest_hash_overwrite_strict_and_exit_status(archive, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    a = tmp_path / "a.tif"
    shutil.copy(archive / "a.tif", a)
    base = ["ingest", "--store", str(path), "--weights", "random", "--no-progress"]
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
    path = tmp_path / "p.zarr"
    shutil.copytree(built, path)
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
    assert main(["ingest", str(src / "c_far.tif"), "--store", str(path), "--weights", "random", "--no-progress"]) == 0
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
    assert main(["evaluate", str(tmp_path / "set"), "--weights", "random", "--model", "resnet18", "--options", "l2",
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
    assert main(["demo", "--out", str(out), "--model", "resnet18", "--weights", "random", "-k", "4"]) == 0
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


def test_every_documented_flag_is_exercised_by_a_cli_test():
    """Each flag of README's command-line block appears in a test that runs the CLI."""
    block = README.read_text().split("## Command line", 1)[1].split("```", 2)[1]
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-k)\b", block))
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    missing = sorted(f for f in flags if f'"{f}"' not in tests and f'"{f}=' not in tests and f"{f}=" not in tests)
    assert not missing, missing
    assert grid.TILE == 256
