"""Reliability II: resume inside an image, consolidated metadata, the lock, searches that need no
pixels, concurrent readers, and the upkeep commands (remove, relocate, compact, migrate), each
checked against stores built from scratch or a NumPy brute force."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline import Config, faults, grid, ingest, locations, open_store, schema, store
from pipeline.cli import main
from pipeline.errors import StoreError
from pipeline.ingest import graph, staging
from pipeline.search import SearchIndex

FIXTURE_V1 = Path(__file__).resolve().parent / "fixtures" / "store_v1.zarr"


def _cfg(**extra):
    return Config().override(**{
        "model.arch": "probe", "model.weights": "random", "read.chunk_px": 256, "store.chunk_tiles": 8, "cluster.progress": False, **extra,
    })  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("upkeep")
    write_tif(root / "a.tif", textured(768, 768, seed=81))  # 25 windows in 9 grid chunks at chunk_px 256
    write_tif(root / "b.tif", textured(512, 640, seed=82))
    write_tif(root / "c.tif", textured(512, 512, seed=83), crs=None, transform=None)
    return root


def assert_same_store(a, b, names=("uid", "valid", "image", "row", "col", "lon", "lat", "status")):
    x, y = open_store(a), open_store(b)
    for name in names:
        np.testing.assert_array_equal(x[name].values, y[name].values, err_msg=name)
    np.testing.assert_allclose(x["fingerprint"].values, y["fingerprint"].values, atol=1e-5)


def brute_uids(path, qvec, k):
    """NumPy oracle: the k nearest valid tiles of done images, overlaps not excluded."""
    ds = open_store(path)
    done = ds["status"].values.astype(object) == "done"
    ok = ds["valid"].values & (ds["image"].values >= 0) & done[np.clip(ds["image"].values, 0, None)]
    x = ds["fingerprint"].values.astype(np.float64)
    d = np.sqrt(((x - qvec) ** 2).sum(1))
    idx = np.flatnonzero(ok)
    return ds["uid"].values[idx[np.lexsort((ds["uid"].values[idx], d[idx]))][:k]]


# --------------------------------------------------------------------------------------------
# Resume inside an image


def test_a_crash_inside_an_image_resumes_without_recomputing_finished_chunks(images, tmp_path, monkeypatch):
    """The process dies after staging 4 of a.tif's 9 grid chunks (one batch, one image): the
    rerun reads and fingerprints only the other 5 and writes the same store as a clean run."""
    cfg = _cfg(**{"store.chunk_tiles": 64})
    clean = tmp_path / "clean.zarr"
    ingest([images / "a.tif"], clean, cfg)
    target = tmp_path / "t.zarr"
    script = textwrap.dedent(f"""
        from pipeline import Config, ingest
        cfg = Config().override(**{{"model.arch": "probe", "model.weights": "random", "read.chunk_px": 256, "store.chunk_tiles": 64,
                                    "cluster.progress": False, "cluster.threads": 1}})
        ingest([{str(images / "a.tif")!r}], {str(target)!r}, cfg)
    """)
    env = {**os.environ, faults.EXIT_AFTER_UNITS: "4"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 17, res.stderr
    assert len(staging.staged(locations.partial_path(target))) == 4
    reads = []
    real = graph.read_task
    monkeypatch.setattr(graph, "read_task", lambda unit: reads.append(unit.start) or real(unit))
    report = ingest([images / "a.tif"], target, cfg)
    assert len(reads) == 9 - 4 and report.processed == 1
    assert_same_store(target, clean)
    assert not staging.staging_path(target).exists() and not staging.staging_path(locations.partial_path(target)).exists()


def test_images_become_searchable_before_their_batch_ends(images, tmp_path, monkeypatch):
    """store.commit_seconds 0: each image is committed as soon as the Zarr chunks holding it are
    written, not when the whole batch (here all three images) is."""
    commits = []
    real = store.set_status
    monkeypatch.setattr(
        store, "set_status", lambda p, ids, s, e=None: (commits.append((s, list(ids))), real(p, ids, s, e))[1]
    )
    ingest([images], tmp_path / "s.zarr", _cfg(**{"store.commit_seconds": 0.0, "store.batch_tiles": 10_000}))
    done = [ids for s, ids in commits if s == "done" and ids]
    assert len(done) >= 2 and sorted(i for ids in done for i in ids) == [0, 1, 2]
    ingest([images], tmp_path / "t.zarr", _cfg(**{"store.commit_seconds": 1e9, "store.batch_tiles": 10_000}))
    assert_same_store(tmp_path / "s.zarr", tmp_path / "t.zarr")


# --------------------------------------------------------------------------------------------
# Consolidated metadata, concurrent readers


def test_xarray_opens_a_store_with_default_arguments_and_no_warning(images, tmp_path):
    import xarray as xr

    path = tmp_path / "s.zarr"
    ingest([images / "b.tif"], path, _cfg())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path)
    assert ds.sizes["tile"] == open_store(path).sizes["tile"] and ds.attrs["schema_version"] == schema.SCHEMA_VERSION
    assert "consolidated_metadata" in json.loads((path / "zarr.json").read_text())


def test_searches_during_an_ingest_see_only_completely_done_images(images, tmp_path):
    """A second process searches in a loop while an ingest commits batch after batch: every
    answer equals a brute force over the images done at the moment the search read the statuses,
    a moment between the search's start and its end (no half-written image, ever)."""
    src = tmp_path / "src"
    src.mkdir()
    first = write_tif(src / "a0.tif", textured(512, 512, seed=90))
    path = tmp_path / "live.zarr"
    cfg = _cfg(**{"store.batch_tiles": 1, "store.chunk_tiles": 4, "model.arch": "standin"})
    ingest([first], path, cfg)
    cfg = cfg.override(**{"model.standin_rate": 15.0})  # a slow device: the reader sees many states
    for k in range(1, 9):
        write_tif(src / f"a{k}.tif", textured(512, 384 + 128 * (k % 3), seed=90 + k))
    q = open_store(path)["fingerprint"].values[4].astype(np.float64)
    np.save(tmp_path / "q.npy", q)
    reader = textwrap.dedent(f"""
        import json, sys, time, numpy as np
        from pipeline.search import Queries, SearchIndex
        from pipeline.store import open_store
        q = np.load({str(tmp_path / "q.npy")!r})
        SearchIndex.open({str(path)!r}).search(Queries.from_fingerprints(q[None].astype(np.float32)), 6)  # warm
        print("ready", flush=True)
        stop = time.time() + 60
        while time.time() < stop:
            before = open_store({str(path)!r})["status"].values.astype(object).tolist()
            index = SearchIndex.open({str(path)!r})
            [res] = index.search(Queries.from_fingerprints(q[None].astype(np.float32)), 6)
            used = ["done" if u else "" for u in index.usable]  # the snapshot the search itself took
            after = open_store({str(path)!r})["status"].values.astype(object).tolist()
            print(json.dumps({{"uids": [str(u) for u in res.uid], "before": before, "used": used, "after": after}}), flush=True)
            if all(s == "done" for s in after) and len(after) == 9:
                break
    """)
    proc = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # imports done: the reader searches from the first commit
    ingest([src], path, cfg)
    out, err = proc.communicate(timeout=120)
    answers = [json.loads(line) for line in out.splitlines()]
    assert answers, err
    ds = open_store(path)
    x = ds["fingerprint"].values.astype(np.float64)
    d = np.sqrt(((x - q) ** 2).sum(1))
    image, valid, uid = ds["image"].values, ds["valid"].values, ds["uid"].values
    seen_partial = False
    for a in answers:

        def top(statuses):
            done = [i for i, s in enumerate(statuses) if s == "done"]
            idx = np.flatnonzero(valid & np.isin(image, done))
            return [str(u) for u in uid[idx[np.lexsort((uid[idx], d[idx]))][:6]]]

        # The search read the statuses once, between the start and the end of this round: its
        # answer is a brute force over exactly the images done then, which includes the images
        # done at its start and is included in those done at its end.
        assert a["uids"] == top(a["used"]), a
        assert set(i for i, s in enumerate(a["before"]) if s == "done") <= set(i for i, s in enumerate(a["used"]) if s)
        assert set(i for i, s in enumerate(a["used"]) if s) <= set(i for i, s in enumerate(a["after"]) if s == "done")
        seen_partial |= 1 < len([s for s in a["before"] if s == "done"]) < 9
    assert seen_partial and len(answers) >= 3  # the searches did run while batches were committed


# --------------------------------------------------------------------------------------------
# The lock


def test_a_taken_over_lock_is_not_removed_by_its_old_holder_and_a_reused_pid_is_stale(tmp_path):
    from pipeline.lock import StoreLock, lock_path, process_start

    target = tmp_path / "s.zarr"
    old = StoreLock(target)
    old.acquire()
    os.utime(lock_path(target), (0, 0))  # old holder stalls for over an hour: taken over
    new = StoreLock(target, stale_after=60)
    new.acquire()
    old.release()  # the old holder wakes up and finishes
    assert lock_path(target).exists() and new.held()  # the new holder keeps its lock
    with pytest.raises(StoreError, match="being written"):
        StoreLock(target).acquire()
    new.release()
    assert not lock_path(target).exists()
    # A lock whose pid is alive but belongs to another process now (the holder died, the pid was
    # reused): recognised by the process start time, and taken over.
    assert process_start(os.getpid())
    lock_path(target).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                             "started": "another-boot:12345", "since": 0}))  # fmt: skip
    with StoreLock(target) as lock:
        assert lock.held()


# --------------------------------------------------------------------------------------------
# Searching without the imagery


def test_search_reads_source_pixels_only_for_sheets(images, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(images, src)
    path = tmp_path / "s.zarr"
    ingest([src], path, _cfg())
    ds = open_store(path)
    uids = [str(int(u)) for u in ds["uid"].values[ds["valid"].values][::7]]
    (tmp_path / "uids.txt").write_text("\n".join(uids))
    shutil.rmtree(src)  # the imagery is gone (moved, offline)
    out = tmp_path / "r.json"
    argv = ["search", "--store", str(path), "--uids-file", str(tmp_path / "uids.txt"), "-k", "3", "--json", str(out)]
    assert main(argv) == 0
    assert len(json.loads(out.read_text())) == len(uids)
    capsys.readouterr()
    assert main(argv + ["--sheet", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "aerial-search relocate" in err


# --------------------------------------------------------------------------------------------
# Upkeep commands


@pytest.fixture
def built(images, tmp_path):
    """A store with a replaced image (c.tif changed after its first ingest) and padding slots."""
    src = tmp_path / "src"
    shutil.copytree(images, src)
    path = tmp_path / "s.zarr"
    cfg = _cfg(**{"store.batch_tiles": 1})
    ingest([src / "a.tif", src / "c.tif"], path, cfg)
    write_tif(src / "c.tif", textured(512, 512, seed=99), crs=None, transform=None)
    os.utime(src / "c.tif", (1, 1))
    ingest([src], path, cfg)
    return src, path, cfg


def test_remove_takes_images_out_of_every_search(built, capsys):
    src, path, cfg = built
    ds = open_store(path)
    q = ds["fingerprint"].values[np.flatnonzero(ds["valid"].values)[0]].astype(np.float64)
    assert main(["remove", "--store", str(path), "b.t*"]) == 0
    assert "removed " + str(src / "b.tif") in capsys.readouterr().out
    status = dict(
        zip(open_store(path)["image_path"].values.astype(object), open_store(path)["status"].values.astype(object))
    )
    assert status[str(src / "b.tif")] == "removed"
    index = SearchIndex.open(str(path))
    from pipeline.search import Queries

    [res] = index.search(Queries.from_fingerprints(q[None]), 50)
    np.testing.assert_array_equal(res.uid, brute_uids(path, q, 50))
    b_id = list(status).index(str(src / "b.tif"))
    assert not np.isin(grid.unpack_uid(res.uid)[0], [b_id]).any()
    b_uid = int(open_store(path)["uid"].values[open_store(path)["image"].values == b_id][0])
    assert main(["search", "--store", str(path), "--uid", str(b_uid)]) == 2
    assert "status is removed" in capsys.readouterr().err
    assert main(["remove", "--store", str(path), "nothing*.tif"]) == 2


def test_relocate_checks_the_new_paths_then_rewrites_them(built, tmp_path, capsys):
    src, path, cfg = built
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    (moved / "b.tif").write_bytes((moved / "b.tif").read_bytes()[:-10])  # a damaged copy: refused
    before = open_store(path)["image_path"].values.astype(object).tolist()
    assert main(["relocate", "--store", str(path), str(src), str(moved)]) == 2
    assert "b.tif has" in capsys.readouterr().err
    assert open_store(path)["image_path"].values.astype(object).tolist() == before  # nothing changed
    shutil.copy(src / "b.tif", moved / "b.tif")
    shutil.rmtree(src)
    assert main(["relocate", "--store", str(path), str(src), str(moved)]) == 0
    after = open_store(path)["image_path"].values.astype(object).tolist()
    status = open_store(path)["status"].values.astype(object).tolist()
    for old, new, st in zip(before, after, status):
        assert new == (old.replace(str(src), str(moved)) if st != "replaced" else old)
    assert ingest([moved], path, cfg).skipped == 3  # the moved files are the same images
    uid = str(int(open_store(path)["uid"].values[np.flatnonzero(open_store(path)["valid"].values)[0]]))
    assert main(["search", "--store", str(path), "--uid", uid, "-k", "2", "--sheet", str(tmp_path / "s.png")]) == 0


def test_compact_drops_removed_replaced_and_padding_slots_and_keeps_uids(built, tmp_path, capsys):
    src, path, cfg = built
    assert main(["remove", "--store", str(path), str(src / "a.tif")]) == 0
    ds = open_store(path)
    status = ds["status"].values.astype(object)
    live = np.isin(status, ["done"])
    keep = (ds["image"].values >= 0) & live[np.clip(ds["image"].values, 0, None)]
    assert (~keep).sum() > 0 and (ds["image"].values < 0).any()  # removed, replaced and padding slots
    q = ds["fingerprint"].values[np.flatnonzero(ds["valid"].values & keep)[0]].astype(np.float64)
    out = tmp_path / "c.zarr"
    assert main(["compact", "--store", str(path), "--out", str(out)]) == 0
    c = open_store(out)
    assert c.sizes["tile"] == keep.sum() and not (c["image"].values < 0).any()
    order = np.argsort(ds["uid"].values[keep])
    for name in ("uid", "valid", "row", "col", "image", "lon", "lat"):
        np.testing.assert_array_equal(np.sort(c[name].values) if name == "uid" else c[name].values[np.argsort(c["uid"].values)],
                                      ds[name].values[keep][order] if name != "uid" else np.sort(ds["uid"].values[keep]))  # fmt: skip
    np.testing.assert_array_equal(
        c["fingerprint"].values[np.argsort(c["uid"].values)], ds["fingerprint"].values[keep][order]
    )
    for i in np.flatnonzero(live):  # each live image's slots: contiguous, at its new tile_start
        s, n = int(c["tile_start"].values[i]), int(c["tile_count"].values[i])
        assert (c["image"].values[s : s + n] == i).all() and n == ds["tile_count"].values[i]
    assert (c["tile_count"].values[~live] == 0).all()
    np.testing.assert_array_equal(brute_uids(out, q, 20), brute_uids(path, q, 20))
    from pipeline.search import Queries

    for p in (path, out):
        [res] = SearchIndex.open(str(p)).search(Queries.from_fingerprints(q[None]), 20)
        np.testing.assert_array_equal(res.uid, brute_uids(path, q, 20))
    uid = int(c["uid"].values[np.flatnonzero(c["valid"].values)[3]])
    assert SearchIndex.open(str(out)).slot_of(uid) == 3  # slot lookups follow the new layout
    # In place: swapped in when done; an ingest afterwards appends after the compacted slots.
    assert main(["compact", "--store", str(path)]) == 0
    assert_same_store(path, out)
    assert ingest([src / "a.tif"], path, cfg).replaced == 0  # a removed image comes back as new
    assert open_store(path)["status"].values.astype(object).tolist().count("done") == 3


def test_compact_carries_current_derived_arrays_sized_to_the_compacted_store(images, tmp_path):
    """Padding is the only thing to drop (two ingests, nothing removed): DBA and the k-NN graph
    stay current and come along, row for row by uid (they were created with the old slot count
    and so read back as stale)."""
    path, out = tmp_path / "s.zarr", tmp_path / "c.zarr"
    cfg = _cfg(**{"store.batch_tiles": 1})
    ingest([images / "a.tif"], path, cfg)
    ingest([images], path, cfg)
    assert (open_store(path)["image"].values < 0).any()  # padding between the two batches
    assert main(["postprocess", "--store", str(path), "--method", "l2", "--dba", "2"]) == 0
    assert main(["postprocess", "--store", str(path), "--knn", "3"]) == 0
    assert main(["compact", "--store", str(path), "--out", str(out)]) == 0
    ds, c = open_store(path), open_store(out)
    assert c.sizes["tile"] < ds.sizes["tile"]
    for name in ("fingerprint_dba", "knn_uid", "knn_sim"):
        assert name in c and c[name].shape[0] == c.sizes["tile"], name
        assert not schema.stale_reason(c, name), name
        by_uid = dict(zip(ds["uid"].values[ds["valid"].values].tolist(), ds[name].values[ds["valid"].values]))
        for u, row in zip(c["uid"].values[c["valid"].values].tolist(), c[name].values[c["valid"].values]):
            np.testing.assert_array_equal(row, by_uid[u])


def test_upkeep_refuses_while_an_ingest_runs_and_on_object_storage(built, capsys):
    from pipeline.lock import StoreLock

    src, path, cfg = built
    with StoreLock(path):
        for argv in (["remove", "--store", str(path), "*.tif"], ["relocate", "--store", str(path), str(src), "/x"],
                     ["compact", "--store", str(path)], ["migrate", "--store", str(path)]):  # fmt: skip
            capsys.readouterr()
            assert main(argv) == 2
            assert "being written by pid" in capsys.readouterr().err
    for cmd in ("remove", "compact", "migrate"):
        capsys.readouterr()
        assert main([cmd, "--store", "s3://bucket/tiles.zarr"] + (["*.tif"] if cmd == "remove" else [])) == 2
        assert "local stores only" in capsys.readouterr().err


def test_a_version_1_store_is_refused_with_the_migrate_command_then_migrated(tmp_path, capsys):
    path = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE_V1, path)
    with pytest.raises(StoreError, match=rf"schema version 1.*aerial-search migrate --store {path}"):
        open_store(path)
    assert main(["info", "--store", str(path)]) == 2
    assert "aerial-search migrate" in capsys.readouterr().err
    assert main(["migrate", "--store", str(path)]) == 0
    assert f"schema version 1 -> {schema.SCHEMA_VERSION}" in capsys.readouterr().out
    ds = open_store(path)
    assert ds.attrs["schema_version"] == schema.SCHEMA_VERSION
    assert ds["status"].values.astype(object).tolist() == ["done", "pending"]
    assert np.isnat(ds["acquired"].values).all() and ds["item_id"].values.astype(object).tolist() == ["", ""]
    uid = int(ds["uid"].values[5])
    [res] = SearchIndex.open(str(path)).search(SearchIndex.open(str(path)).queries_from_uids([uid])[0], 3)
    x = ds["fingerprint"].values.astype(np.float64)
    assert res.uid[0] in ds["uid"].values[ds["image"].values == 0] and np.isfinite(res.value).all()
    assert len(x) == 13
    assert main(["migrate", "--store", str(path)]) == 0
    assert f"already schema version {schema.SCHEMA_VERSION}" in capsys.readouterr().out


def test_searches_use_done_images_only_over_pending_failed_replaced_and_removed(built, tmp_path):
    """A store holding every status: each search equals a brute force over the done images."""
    import rasterio

    from pipeline.search import Queries

    src, path, cfg = built  # done a, b; c replaced by a new c
    bad = src / "d_bad.tif"
    data = textured(512, 256, seed=5)
    with rasterio.open(bad, "w", driver="GTiff", width=256, height=512, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate") as dst:  # fmt: skip
        dst.write(data)
    with rasterio.open(bad) as f:
        off = int(f.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
    raw = bytearray(bad.read_bytes())
    raw[off : off + 300] = bytes(300)
    bad.write_bytes(bytes(raw))
    write_tif(src / "e_pending.tif", textured(512, 512, seed=6))
    report = ingest([src], path, cfg)
    assert [p for p, _ in report.failed] == [str(bad)]
    table = store.read_table(path)
    pending = [str(p) for p in table["image_path"]].index(str(src / "e_pending.tif"))
    store.set_status(path, [pending], "pending")  # as an interrupted ingest leaves it
    assert main(["remove", "--store", str(path), str(src / "b.tif")]) == 0
    statuses = set(open_store(path)["status"].values.astype(object))
    assert statuses == {"done", "replaced", "failed", "pending", "removed"}
    ds = open_store(path)
    rng = np.random.default_rng(0)
    index = SearchIndex.open(str(path)).persist()
    for t in rng.choice(np.flatnonzero(ds["valid"].values), 4, replace=False):
        q = ds["fingerprint"].values[t].astype(np.float64)
        [res] = index.search(Queries.from_fingerprints(q[None]), 15)
        np.testing.assert_array_equal(res.uid, brute_uids(path, q, 15))


def test_a_crash_inside_a_large_unit_keeps_its_finished_windows(images, tmp_path, monkeypatch):
    """One unit of 25 windows (a.tif in a single 768 px chunk), 4 windows per model batch,
    staged every batch: the process dies after its 3rd partial stage; the rerun runs the model
    on the 25 - 12 windows left and writes the same store as a clean run."""
    from pipeline import embed

    cfg = _cfg(**{"read.chunk_px": 768, "store.chunk_tiles": 64, "model.batch_size": 4, "store.stage_seconds": 0.0})
    clean = tmp_path / "clean.zarr"
    ingest([images / "a.tif"], clean, cfg)
    target = tmp_path / "t.zarr"
    script = textwrap.dedent(f"""
        from pipeline import Config, ingest
        cfg = Config().override(**{{"model.arch": "probe", "model.weights": "random", "read.chunk_px": 768, "store.chunk_tiles": 64,
                                    "model.batch_size": 4, "store.stage_seconds": 0.0, "cluster.progress": False}})
        ingest([{str(images / "a.tif")!r}], {str(target)!r}, cfg)
    """)
    env = {**os.environ, faults.EXIT_AFTER_PARTS: "3"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 17, res.stderr
    assert staging.load_partial(locations.partial_path(target), 0, 25).shape == (12, 512)
    computed = []
    real = embed.Runner.forward
    monkeypatch.setattr(embed.Runner, "forward", lambda self, x: computed.append(len(x)) or real(self, x))
    ingest([images / "a.tif"], target, cfg)
    assert sum(computed) == 25 - 12
    assert_same_store(target, clean)
