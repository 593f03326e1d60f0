"""``serve`` follows its store (issue 26): images ingested, finished or removed while it runs are
searched without a restart, the persisted blocks of unchanged slots are kept (only new and
changed ones load), a compacted store is loaded anew, ``/api/info`` names the snapshot served,
and every answer equals a NumPy brute force over the store as it is on disk."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline import store
from pipeline.cli import main
from pipeline.search import SearchIndex
from pipeline.store import open_store

pytest.importorskip("fastapi", reason="serve needs fastapi: pip install -e .")

PROBE = ["--model", "probe", "--weights", "random", "--chunk-px", "512", "--chunk-tiles", "8", "--no-progress"]


def brute(path, uid: int, k: int) -> list[str]:
    """The k nearest valid tiles of done images to tile ``uid`` (its own image's overlapping
    windows excluded, other images' ground overlap too when both have a CRS: none overlap here)."""
    ds = open_store(path)
    done = ds["status"].values.astype(object) == "done"
    image, uids = ds["image"].values, ds["uid"].values
    ok = ds["valid"].values & (image >= 0)
    ok &= done[np.clip(image, 0, None)]
    fp = ds["fingerprint"].values.astype(np.float64)
    q = int(np.flatnonzero(ok & (uids == uid))[0])
    ok &= ~((image == image[q]) & (np.abs(ds["row"].values - ds["row"].values[q]) < 256)
            & (np.abs(ds["col"].values - ds["col"].values[q]) < 256))  # fmt: skip
    cand = np.flatnonzero(ok)
    d = np.sqrt(((fp[cand] - fp[q]) ** 2).sum(1))
    return [str(int(u)) for u in uids[cand][np.lexsort((uids[cand], d))][:k]]


def far(k: int) -> tuple[float, ...]:
    return (0.5, 0, 400000.0 + 5000 * k, 0, -0.5, 3300000.0)  # images never overlap on the ground


def archive(tmp_path, n: int, size: int, seed: int):
    """``n`` images of ``size`` px far apart in ``tmp_path/src``, ingested into ``tmp_path/s.zarr``."""
    src = tmp_path / "src"
    src.mkdir()
    for k in range(n):
        write_tif(src / f"a{k}.tif", textured(size, size, seed=seed + k), transform=far(k))
    path = tmp_path / "s.zarr"
    assert main(["ingest", str(src), "--store", str(path), *PROBE]) == 0
    return src, path


def test_serve_follows_a_growing_shrinking_and_compacted_store(tmp_path):
    from fastapi.testclient import TestClient

    from pipeline.serve.app import create_app
    from pipeline.serve.service import Service

    src, path = archive(tmp_path, 2, 768, 900)
    index = SearchIndex.open(str(path)).persist(block_rows=16)
    service = Service(index)
    client = TestClient(create_app(service))
    try:
        ds = open_store(path)
        uid = int(ds["uid"].values[ds["valid"].values][3])
        info = client.get("/api/info").json()["server"]["snapshot"]
        assert info["id"] == store.snapshot_id(path) and info["images"] == 2

        def answer():
            r = client.get("/api/search", params={"uid": str(uid), "k": 30})
            assert r.status_code == 200, r.text
            return [x["uid"] for x in r.json()["results"]]

        assert answer() == brute(path, uid, 30)
        assert service.refresh() == "same"

        # a new image: appended as new blocks, the full blocks of old slots kept as they were
        write_tif(src / "a2.tif", textured(768, 768, seed=902), transform=far(2))
        assert main(["ingest", str(src), "--store", str(path), *PROBE]) == 0
        old_blocks, n_old = list(index._blocks), index.ds.sizes["tile"]
        assert service.refresh() == "grown"
        grown = service.index
        assert grown is not index and grown.ds.sizes["tile"] > n_old
        kept = [i for i in range(len(old_blocks)) if (i + 1) * 16 <= n_old]
        assert kept and all(grown._blocks[i] is old_blocks[i] for i in kept)
        got = answer()
        assert got == brute(path, uid, 30) and any(int(u) >> 40 == 2 for u in map(int, got))
        info = client.get("/api/info").json()["server"]["snapshot"]
        assert info["id"] == store.snapshot_id(path) and info["images"] == 3 and info["grown"] == 1
        fresh = SearchIndex.open(str(path))
        [res] = fresh.search(fresh.queries_from_uids([uid])[0], 30)
        assert [str(int(u)) for u in res.uid] == got

        # a removal drops out at once
        assert main(["remove", "--store", str(path), "a2.tif"]) == 0
        assert service.refresh() == "grown"
        got = answer()
        assert got == brute(path, uid, 30) and not any(int(u) >> 40 == 2 for u in map(int, got))

        # compaction renumbers slots: a full reload
        assert main(["compact", "--store", str(path)]) == 0
        assert service.refresh() == "reloaded"
        assert answer() == brute(path, uid, 30)
        assert client.get("/api/info").json()["server"]["snapshot"]["reloaded"] == 1
    finally:
        service.close()


def test_the_follower_thread_serves_an_ingest_without_a_restart(tmp_path):
    from fastapi.testclient import TestClient

    from pipeline.serve.app import create_app
    from pipeline.serve.service import Service

    src, path = archive(tmp_path, 1, 512, 910)
    service = Service.open(str(path))
    service.follow(0.2)
    client = TestClient(create_app(service))
    try:
        first = client.get("/api/info").json()["server"]["snapshot"]["id"]
        write_tif(src / "a1.tif", textured(512, 512, seed=911), transform=far(1))
        assert main(["ingest", str(src), "--store", str(path), *PROBE]) == 0
        deadline = time.time() + 20
        final = store.snapshot_id(path)
        assert final != first
        while client.get("/api/info").json()["server"]["snapshot"]["id"] != final:
            assert time.time() < deadline, "the server never picked up the grown store"
            time.sleep(0.1)
        ds = open_store(path)
        uid = int(ds["uid"].values[ds["valid"].values & (ds["image"].values == 1)][0])
        r = client.get("/api/search", params={"uid": str(uid), "k": 5})
        assert r.status_code == 200 and [x["uid"] for x in r.json()["results"]] == brute(path, uid, 5)
    finally:
        service.close()


def test_serve_command_follow_seconds(tmp_path):
    """``serve --follow-seconds`` through the command line: an image ingested while it runs is
    searched without a restart."""
    import httpx
    from test_serve import start_serve

    src, path = archive(tmp_path, 1, 512, 920)
    proc, url, _ = start_serve(["--store", str(path), "--port", "0", "--follow-seconds", "0.3"])
    try:
        first = httpx.get(url + "/api/info").json()["server"]["snapshot"]
        assert first["images"] == 1
        write_tif(src / "a1.tif", textured(512, 512, seed=921), transform=far(1))
        assert main(["ingest", str(src), "--store", str(path), *PROBE]) == 0
        deadline = time.time() + 30
        final = store.snapshot_id(path)  # (it may have followed the ingest's commits on the way: grown >= 1)
        while (snap := httpx.get(url + "/api/info").json()["server"]["snapshot"])["id"] != final:
            assert time.time() < deadline, "serve never followed the store"
            time.sleep(0.2)
        assert snap["images"] == 2 and snap["grown"] >= 1 and snap["reloaded"] == 0
        ds = open_store(path)
        uid = int(ds["uid"].values[ds["valid"].values & (ds["image"].values == 1)][0])
        doc = httpx.get(url + "/api/search", params={"uid": str(uid), "k": 4}).json()
        assert [x["uid"] for x in doc["results"]] == brute(path, uid, 4)
    finally:
        proc.terminate()
        proc.wait(30)


def test_an_image_that_becomes_done_after_the_blocks_loaded_is_reloaded(tmp_path):
    """The race an ingest's commit makes: the index loads while an image is pending (its rows not
    yet written), then its rows are written and it becomes done. The statuses the index compares
    are those read before its blocks, so the image's blocks are reloaded, never served stale."""
    import zarr

    from pipeline.serve.service import Service

    src, path = archive(tmp_path, 2, 768, 930)
    table = store.read_table(path)
    a, n = int(table["tile_start"][1]), int(table["tile_count"][1])
    g = zarr.open_group(str(path), mode="r+", zarr_format=3, use_consolidated=False)
    rows, valid = g["fingerprint"][a : a + n], g["valid"][a : a + n]
    store.set_status(path, [1], "pending")  # as an ingest has it before its rows are written
    g["fingerprint"][a : a + n] = np.zeros_like(rows)
    g["valid"][a : a + n] = np.zeros_like(valid)
    service = Service(SearchIndex.open(str(path)).persist(block_rows=16))
    try:
        g["fingerprint"][a : a + n] = rows  # the ingest writes the rows, then commits the image
        g["valid"][a : a + n] = valid
        store.set_status(path, [1], "done")
        assert service.refresh() == "grown"
        ds = open_store(path)
        uid = int(ds["uid"].values[ds["valid"].values & (ds["image"].values == 1)][0])
        [res] = service.index.search(service.index.queries_from_uids([uid])[0], 10)
        assert [str(int(u)) for u in res.uid] == brute(path, uid, 10)
    finally:
        service.close()
