"""The GPU worker layout, shown on a CPU with a simulated device: the device's own thread runs
inference one batch at a time while other threads read and decode. Structural checks from the
tasks' own timelines; the speed figures live in benchmarks/overlap.py and benchmarks/feed.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import textured, write_tif

from pipeline import Config, embed, ingest, open_store
from pipeline.cluster import io_threads
from pipeline.config import ClusterConfig
from pipeline.ingest import graph


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_tif(tmp_path_factory.mktemp("gpu") / "i.tif", textured(1536, 1024, seed=5), tiled=True)


def timeline(monkeypatch):
    """Record when reads run and when the (simulated) device computes, by thread."""
    spans: dict[str, list[tuple[float, float, int]]] = {"read": [], "device": []}
    lock = threading.Lock()
    real_read, real_forward = graph.read_task, embed.Runner._forward

    def read(unit):
        t0 = time.perf_counter()
        out = real_read(unit)
        with lock:
            spans["read"].append((t0, time.perf_counter(), threading.get_ident()))
        return out

    def forward(self, x):
        t0 = time.perf_counter()
        out = real_forward(self, x)
        with lock:
            spans["device"].append((t0, time.perf_counter(), threading.get_ident()))
        return out

    monkeypatch.setattr(graph, "read_task", read)
    monkeypatch.setattr(embed.Runner, "_forward", forward)
    return spans


def overlapping(a, b) -> bool:
    return any(x0 < y1 and y0 < x1 for x0, x1, _ in a for y0, y1, _ in b)


@pytest.mark.parametrize("threads", [1, 2])
def test_reads_overlap_the_simulated_device_only_with_several_threads(image, tmp_path, monkeypatch, threads):
    spans = timeline(monkeypatch)
    cfg = Config().override(**{
        "model.arch": "standin", "model.standin_rate": 400.0, "model.batch_size": 16, "read.chunk_px": 512,
        "cluster.threads": threads, "cluster.progress": False,
    })  # fmt: skip
    report = ingest([image], tmp_path / "s.zarr", cfg)
    assert report.processed == 1 and len(spans["read"]) == 3 * 2  # 6 grid chunks
    device = sorted(spans["device"])
    assert all(b[0] >= a[1] for a, b in zip(device, device[1:]))  # the device takes one batch at a time
    assert overlapping(spans["read"], spans["device"]) == (threads > 1)
    # one thread runs the device, whichever thread read the chunk: torch keeps cuDNN's handles and
    # caches per thread, so threads taking turns on a GPU each paid for their own
    device_threads = {t for _, _, t in spans["device"]}
    assert len(device_threads) == 1 and not device_threads & {t for _, _, t in spans["read"]}


def test_the_same_fingerprints_whatever_the_layout(image, tmp_path):
    base = {"model.arch": "standin", "read.chunk_px": 512, "cluster.progress": False}
    ingest([image], tmp_path / "a.zarr", Config().override(**{**base, "cluster.threads": 1}))
    ingest(
        [image], tmp_path / "b.zarr", Config().override(**{**base, "cluster.threads": 2, "model.standin_rate": 5000.0})
    )
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    assert (a["fingerprint"].values == b["fingerprint"].values).all() and (a["uid"].values == b["uid"].values).all()


def test_io_threads_default_to_the_cores_per_gpu():
    assert io_threads(ClusterConfig(io_threads=6), 4, cores=64) == 6
    assert io_threads(ClusterConfig(), 4, cores=64) == 16
    assert io_threads(ClusterConfig(), 8, cores=8) == 2  # at least 2: one reads while one computes


def test_the_device_thread_returns_errors_to_the_caller_and_keeps_serving(monkeypatch):
    """A batch that fails on the device thread raises in the thread that handed it over (the
    fingerprint task fails as it would have before), and the next batch is computed as usual,
    equal to the same stand-in computed inline on the CPU."""
    windows = textured(256, 256 * 4, seed=2).reshape(3, 256, 4, 256).transpose(2, 0, 1, 3).copy()
    want = embed.embed_batch(windows, embed.ModelSpec(arch="standin", device="cpu", batch_size=2))
    spec = embed.ModelSpec(arch="standin", device="cpu", batch_size=2, standin_rate=100000.0)
    real = embed.Runner._forward
    calls: list[str] = []

    def failing_once(self, x):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, x)

    monkeypatch.setattr(embed.Runner, "_forward", failing_once)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        embed.embed_batch(windows, spec)
    got = embed.embed_batch(windows, spec)
    np.testing.assert_array_equal(got, want)
    assert len(set(calls)) == 1 and calls[0] != threading.current_thread().name


def test_a_forward_called_on_the_device_thread_runs_in_place():
    """Code already on the device thread (a model hook, a nested call) computes in place: handing
    the batch to the same one-thread queue would wait on itself forever."""
    windows = textured(256, 512, seed=4).reshape(3, 256, 2, 256).transpose(2, 0, 1, 3).copy()
    want = embed.embed_batch(windows, embed.ModelSpec(arch="standin", device="cpu"))
    run = embed.Runner(embed.ModelSpec(arch="standin", device="cpu", standin_rate=100000.0))

    def nested():
        return run.forward(run.upload(windows)), threading.current_thread().name

    got, name = run.device_thread.submit(nested).result(timeout=30)
    np.testing.assert_array_equal(got, want)
    assert name.startswith("aerial-search-cpu")
