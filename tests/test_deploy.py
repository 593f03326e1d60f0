"""deploy/ manifests and every cluster kind that can be built on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import gpu_worker_cluster, jobqueue_cluster, kubernetes_spec, make_cluster, runtime
from pipeline.config import ClusterConfig, load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_every_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        assert yaml.safe_load(f.read_text()) is not None, f


def _operator_crd_schema() -> dict:
    from importlib.resources import files

    crd = files("dask_kubernetes") / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
    doc = yaml.safe_load(crd.read_text())
    [version] = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def test_kubernetes_manifest_validates_against_the_operator_crd():
    import jsonschema

    spec = kubernetes_spec(ClusterConfig(scheduler="kubernetes", n_workers=5))
    assert spec["apiVersion"] == "kubernetes.dask.org/v1" and spec["kind"] == "DaskCluster"
    jsonschema.validate(spec, _operator_crd_schema())
    # The fields this deployment relies on are where the operator reads them.
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 5  # --workers overrides the manifest
    [container] = worker["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the CRD wants strings
    assert worker["spec"]["nodeSelector"]
    nthreads = container["args"][container["args"].index("--nthreads") + 1]
    assert container["image"] and int(nthreads) == int(container["resources"]["limits"]["cpu"]) >= 2
    ports = {p["name"] for p in spec["spec"]["scheduler"]["service"]["ports"]}
    assert ports == {"tcp-comm", "http-dashboard"}
    bad = yaml.safe_load(yaml.safe_dump(spec))
    bad["spec"]["worker"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _operator_crd_schema())


def test_slurm_config_builds_a_gpu_job_script():
    cfg = load_config(DEPLOY / "slurm" / "aerial-search.yaml")
    assert cfg.cluster.scheduler == "slurm" and cfg.model.device == "cuda"
    with jobqueue_cluster(cfg.cluster) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -p gpu" in script
    assert "--nthreads 8" in script and "#SBATCH --cpus-per-task=8" in script  # an I/O thread per core


def test_jobqueue_yaml_is_dask_config_for_slurm_and_pbs():
    import dask

    conf = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in conf["jobqueue"]["slurm"].items()}):
        with jobqueue_cluster(ClusterConfig(scheduler="slurm")) as cluster:
            script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script and "source $HOME/aerial-search/.venv/bin/activate" in script
    with jobqueue_cluster(
        ClusterConfig(scheduler="pbs", jobqueue={"cores": 4, "memory": "16GiB", "queue": "gpuq"})
    ) as pbs:
        assert "#PBS -q gpuq" in pbs.job_script()


def test_gpu_worker_fallback_gives_each_worker_its_own_gpu():
    """The path used when dask-cuda is absent: one process per GPU id, with its I/O threads."""
    from distributed import Client

    with gpu_worker_cluster(["0", "1"], 3) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        threads = client.nthreads()
        pids = client.run(os.getpid)
    assert sorted(seen.values()) == ["0", "1"]
    assert set(threads.values()) == {3}
    assert os.getpid() not in pids.values()


def test_local_cuda_kind_without_dask_cuda_uses_the_fallback(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # as if not installed
    cluster, dask_threads, torch_threads = make_cluster(ClusterConfig(scheduler="local-cuda", gpus="0,1", io_threads=3))
    with cluster:
        assert len(cluster.workers) == 2 and dask_threads == 3 and torch_threads >= 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="found no GPU"):
        make_cluster(ClusterConfig(scheduler="local-cuda"))


def test_local_runtime_and_missing_optional_packages(monkeypatch):
    import sys

    with runtime(ClusterConfig(scheduler="local", n_workers=1, progress=False)) as rt:
        assert len(rt.client.scheduler_info()["workers"]) == 1 and rt.torch_threads >= 1
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(RuntimeError, match="pip install dask-kubernetes"):
        make_cluster(ClusterConfig(scheduler="kubernetes"))
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(RuntimeError, match="pip install dask-jobqueue"):
        make_cluster(ClusterConfig(scheduler="slurm"))
