"""The command line: flags reach the config, errors are one clear line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from conftest import textured, write_tif

from pipeline import open_store
from pipeline.cli import main


def test_ingest_and_info(tmp_path, capsys):
    img = write_tif(tmp_path / "img one é.tif", textured(520, 700, seed=3))
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("store:\n  chunk_tiles: 4\nread:\n  chunk_px: 256\n")
    rc = main(
        [
            "ingest",
            str(img),
            "--store",
            str(tmp_path / "s.zarr"),
            "--model",
            "probe",
            "--config",
            str(cfgfile),
            "--dtype",
            "float16",
            "--batch-size",
            "3",
            "--no-progress",
            "--compressor",
            "zstd",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "windows      9 (9 kept, 0 dropped" in out and "NOT PRETRAINED" in out
    ds = open_store(tmp_path / "s.zarr")
    assert ds["fingerprint"].dtype == np.float16 and ds["fingerprint"].encoding["chunks"] == (4, 512)
    import zarr

    codecs = zarr.open_group(tmp_path / "s.zarr", mode="r")["fingerprint"].metadata.codecs
    assert [type(c).__name__ for c in codecs] == ["BytesCodec", "ZstdCodec"], codecs
    assert ds.attrs["config"]["model"]["batch_size"] == 3 and ds.attrs["config"]["read"]["chunk_px"] == 256
    assert ds["image_path"].values[0] == str(img.resolve())
    assert main(["info", "--store", str(tmp_path / "s.zarr"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tiles"] == 9 and info["images_by_status"] == {"done": 1} and info["model"]["arch"] == "probe"


def test_ingest_a_folder_of_jpeg_and_png_scenes(tmp_path, capsys):
    """A scene-classification set (class folders of JPEGs/PNGs, no GeoTIFF) ingests as a folder,
    into the same store as the same files named one by one."""
    from PIL import Image

    files = []
    for k, name in enumerate(("beach/a.jpg", "beach/b.jpg", "forest/c.png", "forest/tiny.png")):
        path = tmp_path / "scenes" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 120 if "tiny" in name else 256 + 40 * k
        Image.fromarray(np.ascontiguousarray(textured(size, size, seed=k).transpose(1, 2, 0))).save(path, quality=92)
        files.append(path)
    common = ["--model", "probe", "--no-progress"]
    assert main(["ingest", str(tmp_path / "scenes"), "--store", str(tmp_path / "folder.zarr"), *common]) == 0
    assert "windows      3 (3 kept" in capsys.readouterr().out  # tiny.png is under one window
    assert main(["ingest", *map(str, files), "--store", str(tmp_path / "files.zarr"), *common]) == 0
    folder, named = open_store(tmp_path / "folder.zarr"), open_store(tmp_path / "files.zarr")
    assert list(folder["image_path"].values) == sorted(str(f.resolve()) for f in files)
    np.testing.assert_array_equal(folder["uid"].values, named["uid"].values)
    np.testing.assert_array_equal(folder["fingerprint"].values, named["fingerprint"].values)


def test_errors_are_one_line_naming_the_file(tmp_path, capsys):
    grey = write_tif(tmp_path / "grey.tif", textured(300, 300, bands=1))
    assert main(["ingest", str(grey), "--store", str(tmp_path / "s.zarr"), "--model", "probe"]) == 2
    err = capsys.readouterr().err
    assert "grey.tif" in err and "--bands 1,1,1" in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()
    assert main(["ingest", str(grey), "--store", str(tmp_path / "s.zarr"), "--chunk-px", "300"]) == 2
    assert "read.chunk_px" in capsys.readouterr().err
    assert (
        main(
            [
                "ingest",
                str(grey),
                "--store",
                str(tmp_path / "t.zarr"),
                "--bands",
                "1,1,1",
                "--weights",
                str(tmp_path / "no.pth"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["info", "--store", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_runs_with_local_cluster(tmp_path):
    img = write_tif(tmp_path / "img.tif", textured(256, 512, seed=4))
    exe = [sys.executable, "-m", "pipeline.cli"]
    res = subprocess.run(
        exe
        + [
            "ingest",
            str(img),
            "--store",
            str(tmp_path / "s.zarr"),
            "--model",
            "probe",
            "--scheduler",
            "local",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "dask cluster" in res.stdout and "windows      3" in res.stdout


def test_ingest_and_search_on_a_running_scheduler(tmp_path, capsys):
    """--scheduler tcp://host:port: the graph runs on an existing cluster's workers."""
    from distributed import LocalCluster

    img = write_tif(tmp_path / "img.tif", textured(512, 512, seed=5))
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, protocol="tcp", dashboard_address=":0"
    ) as cluster:
        addr = cluster.scheduler_address
        assert addr.startswith("tcp://")
        assert (
            main(["ingest", str(img), "--store", str(tmp_path / "s.zarr"), "--model", "probe", "--scheduler", addr])
            == 0
        )
        out = capsys.readouterr()
        assert f"dask cluster {addr}" in out.out and "dashboard" in out.err
        uid = str(int(open_store(tmp_path / "s.zarr")["uid"].values[4]))
        rc = main(["search", "--store", str(tmp_path / "s.zarr"), "--uid", uid, "-k", "3", "--include-overlapping",
                   "--scheduler", addr, "--json", str(tmp_path / "r.json")])  # fmt: skip
        assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"][0]["uid"] == uid and doc["results"][0]["distance"] == 0.0


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, capsys, monkeypatch):
    img = write_tif(tmp_path / "img.tif", textured(512, 512, seed=6))
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", str(img), "--store", store, "--model", "probe", "--no-progress"]) == 0
    uid = str(int(open_store(store)["uid"].values[0]))
    (tmp_path / "plain").mkdir()
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("store:\n  chunk_tile: 4\n")  # typo of chunk_tiles
    cases = {
        "missing store": (["search", "--store", str(tmp_path / "nope.zarr"), "--uid", uid], "does not exist"),
        "not a store": (["info", "--store", str(tmp_path / "plain")], "not a fingerprint store"),
        "unknown uid": (["search", "--store", store, "--uid", str(5 * 2**40)], "names image 5"),
        "k 0": (["search", "--store", store, "--uid", uid, "-k", "0"], "positive"),
        "unknown config key": (
            ["search", "--store", store, "--uid", uid, "--config", str(bad_cfg)],
            "store.chunk_tile",
        ),
        "pca dims": (["postprocess", "--store", store, "--method", "pca", "--dims", "100"], "--dims 9 or fewer"),
        "split every": (["search", "--store", store, "--uid", uid, "--split-every", "1"], "split_every"),
    }
    for what, (argv, message) in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (what, err)
        assert err.count("\n") == 1 and err.startswith(f"aerial-search {argv[0]}: error: "), (what, err)
    # A cluster kind whose package is missing (made unimportable here).
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    capsys.readouterr()
    assert main(["search", "--store", store, "--uid", uid, "--scheduler", "kubernetes"]) == 2
    err = capsys.readouterr().err
    assert "pip install dask-kubernetes" in err and err.count("\n") == 1 and "Traceback" not in err


def test_workers_size_their_torch_threads_to_their_cores(tmp_path):
    """The runtime registers a worker plugin: each worker runs cores // its dask threads torch
    threads, without the model code asking which scheduler it runs on."""
    from pipeline.cluster import runtime
    from pipeline.config import ClusterConfig
    from pipeline.resources import cpu_count

    def torch_threads():
        import os

        import torch

        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    with runtime(ClusterConfig(scheduler="local", n_workers=1, threads=2, progress=False)) as rt:
        got = list(rt.client.run(torch_threads).values())
    assert got == [(max(1, cpu_count() // 2), str(max(1, cpu_count() // 2)))]


def test_info_images_lists_each_image_with_its_centre_tile_to_search_from(flights, ingest_store, capsys):
    """``info --images``: per image, its valid tile count and the valid tile nearest its centre
    (a brute force over the store's tiles), lon/lat where it has a CRS; the uid is searchable."""
    from pipeline import grid

    path = ingest_store(flights)
    capsys.readouterr()
    assert main(["info", "--store", str(path), "--images", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["image_list"]
    ds = open_store(path)
    image, valid = ds["image"].values, ds["valid"].values.astype(bool)
    assert [r["path"] for r in rows] == [str(p) for p in ds["image_path"].values]
    for i, r in enumerate(rows):
        mine = np.flatnonzero(valid & (image == i))
        assert r["id"] == i and r["tiles"] == len(mine) and r["status"] == "done"
        if not len(mine):
            assert r["uid"] is None
            continue
        cy, cx = grid.cropped_size(r["height"]) / 2, grid.cropped_size(r["width"]) / 2
        d = (ds["row"].values[mine] + 128 - cy) ** 2 + (ds["col"].values[mine] + 128 - cx) ** 2
        tied = mine[d == d.min()]
        t = tied[np.argmin(ds["uid"].values[tied])]  # ties: the lowest uid
        assert r["uid"] == str(int(ds["uid"].values[t])), i
        assert (r["lon"] is None) == (not np.isfinite(ds["lon"].values[t]))
        if r["lon"] is not None:
            assert abs(r["lon"] - ds["lon"].values[t]) < 1e-6 and abs(r["lat"] - ds["lat"].values[t]) < 1e-6
    assert any(r["lon"] is None and r["uid"] for r in rows)  # the image without a CRS still has a uid
    assert main(["info", "--store", str(path), "--images"]) == 0
    text = capsys.readouterr().out
    assert "centre uid" in text and all(r["uid"] in text for r in rows if r["uid"])
    assert main(["search", "--store", str(path), "--uid", rows[0]["uid"], "-k", "3"]) == 0
