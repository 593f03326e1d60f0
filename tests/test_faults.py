"""Faults survived: a worker SIGKILLed mid-ingest, a client killed mid-run, a full or read-only
disk. Each run must end with a store equal to a clean run's, without losing finished work."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline import faults, ingest, open_store
from pipeline.store import StoreError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("faultsrc")
    for k, (h, w) in enumerate([(512, 640), (384, 512), (640, 384), (512, 512)]):
        write_tif(root / f"img{k}.tif", textured(h, w, seed=20 + k))
    return root


@pytest.fixture(scope="module")
def clean(images, tmp_path_factory):
    from pipeline.config import Config

    cfg = Config().override(**{
        "model.arch": "probe", "model.weights": "random", "read.chunk_px": 256, "store.chunk_tiles": 4, "store.batch_tiles": 8,
        "cluster.progress": False,
    })  # fmt: skip
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    ingest([images], path, cfg)
    return path, cfg


def assert_same_store(a, b):
    x, y = open_store(a), open_store(b)
    for name in ("uid", "valid", "image", "row", "col", "status"):
        np.testing.assert_array_equal(x[name].values, y[name].values)
    np.testing.assert_allclose(x["fingerprint"].values, y["fingerprint"].values, atol=1e-5)


def test_worker_killed_mid_ingest_is_retried(images, clean, tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    ref, cfg = clean
    marker = tmp_path / "killed"
    monkeypatch.setenv(faults.KILL_WORKER, str(marker))  # inherited by the worker processes
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            pids_before = set(client.run(os.getpid).values())
            ingest([images], tmp_path / "k.zarr", cfg, client=client)
            pids_after = set(client.run(os.getpid).values())
    assert marker.exists() and int(marker.read_text()) in pids_before  # a real worker process died...
    assert int(marker.read_text()) not in pids_after  # ...and was replaced by the nanny
    assert_same_store(tmp_path / "k.zarr", ref)


def test_client_killed_mid_run_resumes_without_recomputing(images, clean, tmp_path):
    ref, cfg = clean
    target = tmp_path / "c.zarr"
    script = textwrap.dedent(f"""
        from pipeline import Config, ingest
        cfg = Config().override(**{{"model.arch": "probe", "model.weights": "random", "read.chunk_px": 256, "store.chunk_tiles": 4,
                                    "store.batch_tiles": 8, "cluster.progress": False}})
        ingest([{str(images)!r}], {str(target)!r}, cfg)
    """)
    env = {**os.environ, faults.EXIT_AFTER_BATCHES: "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 17, res.stderr  # died right after its first batch commit
    partial = tmp_path / ".c.zarr.partial"
    status = open_store(partial)["status"].values.astype(object)
    done_before = int((status == "done").sum())
    assert 0 < done_before < len(status)
    report = ingest([images], target, cfg)  # the rerun: redoes only what was not done
    assert report.processed == len(status) - done_before and report.skipped == done_before
    assert_same_store(target, ref)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_read_only_is_a_clear_error_and_keeps_finished_work(images, clean, tmp_path, monkeypatch, err):
    """A store wrapper that fails writes (tests run as root, so permissions cannot be used)."""
    import zarr.storage

    ref, cfg = clean
    target = tmp_path / "d.zarr"
    ingest([images / "img0.tif"], target, cfg)
    before = open_store(target)
    searchable = before["fingerprint"].values[before["image"].values == 0].copy()
    real_set = zarr.storage.LocalStore.set

    async def failing_set(self, key, value):
        if "fingerprint/c" in key:
            raise OSError(err, os.strerror(err), key)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    with pytest.raises(StoreError, match=rf"d.zarr.*{os.strerror(err)}.*(free space|permissions)"):
        ingest([images], target, cfg)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    after = open_store(target)
    assert after["status"].values.astype(object)[0] == "done"  # finished work kept, still searchable
    np.testing.assert_array_equal(after["fingerprint"].values[after["image"].values == 0], searchable)
    assert set(after["status"].values.astype(object)[1:]) == {"pending"}  # the rest: invisible to search
    assert ingest([images], target, cfg).processed == 3  # once the disk is fixed, the rest goes in
