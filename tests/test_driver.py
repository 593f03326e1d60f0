"""The ingest driver at archive scale: grouped small images, concurrent header reads, pipelined
batches, progress lines. Checked against rasterio reads, a sequential ingest and the cluster's
own task stream (no timing assertions: the speed figures live in benchmarks/driver.py)."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import rasterio
from conftest import textured, write_tif

from pipeline import Config, ingest, open_store, raster
from pipeline.ingest import graph, plan
from pipeline.progress import Progress

STANDIN = {"model.arch": "standin", "cluster.progress": False}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A large image (several chunks at chunk_px 384) between small single-chunk ones."""
    root = tmp_path_factory.mktemp("mixed")
    write_tif(root / "a_small.tif", textured(300, 280, seed=1))
    write_tif(root / "b_large.tif", textured(1100, 900, seed=2), tiled=True)
    for k in range(6):
        write_tif(root / f"c_small{k}.tif", textured(256 + 64 * (k % 3), 512, seed=10 + k), crs=None, transform=None)
    write_tif(root / "d_tiny.tif", textured(200, 200, seed=3))  # no window at all
    return root


def _cfg(**extra):
    return Config().override(**{**STANDIN, "read.chunk_px": 384, "store.chunk_tiles": 8, **extra})


READS: list[tuple[str, int]] = []


@dataclasses.dataclass(frozen=True)
class CountingReader(raster.RasterReader):
    """Records each read's file and pixel count (module level: tasks may be pickled)."""

    def read(self, rows, cols):
        out = super().read(rows, cols)
        READS.append((os.path.basename(self.path), out.shape[1] * out.shape[2]))
        return out


def test_units_read_chunk_plus_halo_and_group_small_images(mixed):
    paths = raster.expand_sources([mixed])
    cfg = _cfg()
    infos = [h.info for h in plan.check_sources(paths, **plan.config_kwargs(cfg), threads=4)]
    plans, batches, _ = plan.allocate(infos, 0, 0, 8, 384, 10_000)
    [batch] = batches
    [run] = batch.runs  # the tiny image has no slots; the others are contiguous
    units = graph.units_of(run, cfg)
    assert [u.start for u in units[1:]] == [u.stop for u in units[:-1]]  # contiguous, in slot order
    assert units[0].start == run[0].tile_start and units[-1].stop == run[-1].tile_stop
    large = next(p for p in plans if p.info.path.endswith("b_large.tif"))
    by_image = [u for u in units if any(r.path == large.info.path for r, _, _ in u.members)]
    assert len(by_image) == len(large.spans_y) * len(large.spans_x)  # one unit per grid chunk
    grouped = [u for u in units if len(u.members) > 1]
    assert grouped and sum(len(u.members) for u in grouped) >= 5  # small images share tasks
    with rasterio.open(large.info.path) as src:
        full = src.read()
    spec = plan_spec(cfg)
    for u in by_image:
        READS.clear()
        [(reader, sy, sx)] = u.members
        counting = dataclasses.replace(u, members=((CountingReader(reader.path), sy, sx),))
        out = graph.unit_task(counting, spec, 0, 0.5)
        assert READS == [("b_large.tif", (sy.stop - sy.start) * (sx.stop - sx.start))]  # chunk + halo only
        assert READS[0][1] <= (384 + 128) ** 2
        block = reader.read((sy.start, sy.stop), (sx.start, sx.stop))
        np.testing.assert_array_equal(block[:3], full[:, sy.start : sy.stop, sx.start : sx.stop])
        assert out.shape == (u.count, 513)


def plan_spec(cfg):
    from pipeline.embed import ModelSpec

    return ModelSpec.from_config(cfg.model, torch_threads=1)


def _same_store(a, b, names=("uid", "valid", "image", "row", "col", "x", "y", "lon", "lat", "status")):
    x, y = open_store(a), open_store(b)
    for name in names:
        np.testing.assert_array_equal(x[name].values, y[name].values, err_msg=name)
    np.testing.assert_array_equal(x["fingerprint"].values, y["fingerprint"].values)


def test_pipelined_ingest_of_mixed_images_equals_a_sequential_one(mixed, tmp_path):
    """Several batches in flight (and small images grouped) write the same store as one batch
    at a time; fingerprints match the reference model on windows cut by NumPy."""
    from pipeline.embed import embed_batch

    many = {"store.batch_tiles": 8}  # a batch per few images: several batches
    piped = ingest([mixed], tmp_path / "p.zarr", _cfg(**many, **{"cluster.batches_in_flight": 3}))
    seq = ingest([mixed], tmp_path / "s.zarr", _cfg(**many, **{"cluster.batches_in_flight": 1}))
    assert piped.windows == seq.windows and piped.processed == seq.processed == 8
    _same_store(tmp_path / "p.zarr", tmp_path / "s.zarr")
    ds = open_store(tmp_path / "p.zarr")
    valid = np.flatnonzero(ds["valid"].values)
    picks = valid[np.linspace(0, len(valid) - 1, 9).astype(int)]
    windows = []
    for t in picks:
        with rasterio.open(ds["image_path"].values[ds["image"].values[t]]) as src:
            r, c = int(ds["row"].values[t]), int(ds["col"].values[t])
            windows.append(src.read([1, 2, 3], window=((r, r + 256), (c, c + 256))))
    ref = embed_batch(np.stack(windows), plan_spec(_cfg()))
    np.testing.assert_allclose(ds["fingerprint"].values[picks], ref, atol=1e-6)


def _bad_middle_tile(path):
    """A tiled GeoTIFF whose first tile is garbage: the header and the probed last tile read,
    the whole image does not."""
    data = textured(512, 256, seed=30)
    with rasterio.open(path, "w", driver="GTiff", width=256, height=512, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", crs="EPSG:32617",
                       transform=rasterio.Affine(0.1, 0, 400000, 0, -0.1, 3300000)) as dst:  # fmt: skip
        dst.write(data)
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 400] = os.urandom(400)
    path.write_bytes(bytes(raw))
    return path


def test_a_failing_file_in_a_grouped_task_fails_only_that_image(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for k in range(5):
        write_tif(root / f"ok{k}.tif", textured(256, 512, seed=40 + k))
    bad = _bad_middle_tile(root / "ok2_bad.tif")
    cfg = _cfg()
    units = graph.units_of(
        plan.allocate([raster.read_header(p) for p in raster.expand_sources([root])], 0, 0, 8, 384, 10_000)[1][0].runs[
            0
        ],
        cfg,
    )
    assert any(len(u.members) >= 2 and any(r.path == str(bad) for r, _, _ in u.members) for u in units)
    report = ingest([root], tmp_path / "s.zarr", cfg)
    assert [p for p, _ in report.failed] == [str(bad)] and "ok2_bad.tif: reading rows" in report.failed[0][1]
    ds = open_store(tmp_path / "s.zarr")
    status = dict(zip(ds["image_path"].values.astype(object), ds["status"].values.astype(object)))
    assert status.pop(str(bad)) == "failed" and set(status.values()) == {"done"}
    clean = ingest([p for p in raster.expand_sources([root]) if p != str(bad)], tmp_path / "c.zarr", cfg)
    assert clean.tiles == report.tiles
    c = open_store(tmp_path / "c.zarr")
    key = lambda d: {(str(d["image_path"].values[i]), int(r), int(q)): f for i, r, q, f, v in zip(  # noqa: E731
        d["image"].values, d["row"].values, d["col"].values, d["fingerprint"].values, d["valid"].values) if v}  # fmt: skip
    got, want = key(ds), key(c)
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], want[k])


def test_header_reads_overlap_when_storage_is_slow(tmp_path, monkeypatch):
    """With latency injected into every header read (a slow store), the driver reads up to
    read.header_threads headers at once; results stay in path order."""
    from pipeline.cluster import Runtime
    from pipeline.ingest import driver

    paths = [str(write_tif(tmp_path / "one.tif", textured(256, 256)))]
    for k in range(79):
        os.link(paths[0], tmp_path / f"link{k:02d}.tif")
        paths.append(str(tmp_path / f"link{k:02d}.tif"))
    real, lock, now, peak = plan.check_source, threading.Lock(), [0], [0]

    def counting(*args):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            return real(*args)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(plan, "check_source", counting)
    monkeypatch.setenv(plan.HEADER_LATENCY, "0.05")
    cfg = Config()
    headers = driver._check_sources(paths, cfg, Runtime("threads"), remote=False)
    assert [h.path for h in headers] == paths and all(h.info is not None for h in headers)
    assert peak[0] == cfg.read.header_threads == 32


def test_long_local_header_lists_use_processes_and_fall_back_when_they_cannot_start(tmp_path):
    """Lists that would take over PROCESS_AFTER_S go to a process per core; a main module that
    spawned processes cannot re-import (a script piped to ``python -``) breaks the pool, and
    the headers are then read in the client instead of failing the ingest."""
    paths = [str(write_tif(tmp_path / "one.tif", textured(256, 256)))]
    for k in range(39):
        os.link(paths[0], tmp_path / f"link{k:02d}.tif")
        paths.append(str(tmp_path / f"link{k:02d}.tif"))
    script = f"""
import json
from concurrent.futures import process
from pipeline import Config
from pipeline.cluster import Runtime
from pipeline.ingest import driver
driver.PROCESS_AFTER_S, driver.SLOW_HEADER_S = 0.0, 1e9  # every list goes to the processes
started = []
real = process.ProcessPoolExecutor.__init__
def init(self, *a, **k):
    started.append(1)
    real(self, *a, **k)
process.ProcessPoolExecutor.__init__ = init
headers = driver._check_sources({paths!r}, Config(), Runtime("threads"), remote=False)
print(json.dumps({{"paths": [h.path for h in headers], "ok": all(h.info is not None for h in headers), "pools": len(started)}}))
"""
    res = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"paths": paths, "ok": True, "pools": 1}


def test_a_fresh_process_does_not_take_a_local_disk_for_slow_storage(tmp_path):
    """The first header read of a process pays GDAL's start-up; timing it with the probe made
    every CLI ingest of local files read headers with 32 threads in one process (2x slower than
    processes or one thread, as GDAL's opens do not scale with threads)."""
    paths = [str(write_tif(tmp_path / "one.tif", textured(256, 256)))]
    for k in range(39):
        os.link(paths[0], tmp_path / f"link{k:02d}.tif")
        paths.append(str(tmp_path / f"link{k:02d}.tif"))
    script = f"""
import json
from pipeline import Config
from pipeline.cluster import Runtime
from pipeline.ingest import driver, plan
threads = []
real = plan.check_sources
def spy(paths, **kw):
    threads.append(kw["threads"])
    return real(paths, **kw)
plan.check_sources = spy
headers = driver._check_sources({paths!r}, Config(), Runtime("threads"), remote=False)
print(json.dumps({{"n": len(headers), "threads": threads}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] == 40 and set(out["threads"]) == {1}, out


def test_batches_overlap_on_a_local_cluster_with_a_simulated_device(tmp_path):
    """Two workers, each a simulated device: with 2 batches in flight, tasks of different
    batches run at the same time (no barrier); with 1, batches never overlap."""
    from distributed import Client, LocalCluster, get_task_stream

    paths = []
    for k in range(6):
        paths.append(str(write_tif(tmp_path / f"i{k}.tif", textured(1536, 512, seed=60 + k))))
    cfg = Config().override(**{
        **STANDIN, "model.standin_rate": 400.0, "model.batch_size": 16, "read.chunk_px": 512,
        "store.chunk_tiles": 16, "store.batch_tiles": 1,
    })  # fmt: skip
    overlap = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            for in_flight in (1, 2):
                c = cfg.override(**{"cluster.batches_in_flight": in_flight})
                with get_task_stream(client) as ts:
                    report = ingest(paths, tmp_path / f"s{in_flight}.zarr", c, client=client)
                assert report.processed == 6
                spans = [
                    (_key_name(task["key"]).split("-", 1)[1], s["start"], s["stop"])
                    for task in ts.data
                    if _key_name(task["key"]).startswith("fingerprint-")
                    for s in task["startstops"]
                    if s["action"] == "compute"
                ]
                assert len({b for b, _, _ in spans}) == 6  # one token per batch
                overlap[in_flight] = any(
                    a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for i, a in enumerate(spans) for b in spans[i + 1 :]
                )
    assert overlap == {1: False, 2: True}
    _same_store(tmp_path / "s1.zarr", tmp_path / "s2.zarr")


def _key_name(key) -> str:
    """The name part of a task key as the task stream reports it (a tuple or its repr)."""
    import ast

    if isinstance(key, str) and key.startswith("("):
        key = ast.literal_eval(key)
    return str(key[0] if isinstance(key, tuple) else key)


def test_progress_prints_a_line_every_few_seconds_when_not_a_terminal(tmp_path):
    clock = [0.0]
    out = io.StringIO()
    p = Progress(10, 1000, every=5.0, stream=out, clock=lambda: clock[0])
    for _ in range(10):
        clock[0] += 2.0
        p.advance(tiles=100, images=1)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 + 1  # at 6, 12 and 18 s (at least 5 s apart), plus the final line
    assert lines[-1] == "ingest: 10/10 images, 1,000/1,000 tiles (100.0%), 50 tiles/s, ETA 0:00:00"
    assert "ETA 0:00:" in lines[0] and "tiles/s" in lines[0]
    # The CLI with stderr redirected to a file (a batch job's log) writes such lines.
    img = write_tif(tmp_path / "i.tif", textured(512, 512))
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", str(img), "--store",
                              str(tmp_path / "s.zarr"), "--model", "standin"], stderr=err, text=True)  # fmt: skip
    assert res.returncode == 0
    assert "ingest: 1/1 images, 9/9 tiles (100.0%)" in log.read_text()


def test_headers_are_read_on_the_workers_for_long_lists(mixed, tmp_path, monkeypatch, cluster_client):
    from distributed import get_task_stream

    from pipeline.ingest import driver

    monkeypatch.setattr(driver, "CLUSTER_HEADERS_FROM", 2)
    monkeypatch.setattr(driver, "HEADERS_PER_TASK", 3)
    with get_task_stream(cluster_client) as ts:
        report = ingest([mixed], tmp_path / "w.zarr", _cfg(), client=cluster_client)
    header_tasks = [t for t in ts.data if _key_name(t["key"]).startswith("check_sources")]
    assert len(header_tasks) == -(-9 // 3)  # 9 sources in tasks of 3
    assert report.processed == 8
    _same_store(tmp_path / "w.zarr", ingest([mixed], tmp_path / "t.zarr", _cfg()).store)
