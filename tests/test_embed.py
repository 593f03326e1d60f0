"""Backbones and weights: strict loading, headless files, provenance, device handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from pipeline import embed
from pipeline.digest import sha256_file
from pipeline.embed import ModelSpec, WeightsError


def _windows(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 256, 256), dtype=np.uint8)


@pytest.mark.parametrize("arch", ["resnet18", "squeezenet1_1", "mobilenet_v2"])
def test_backbones_give_their_dimension_and_match_torchvision(arch, tmp_path):
    """A state_dict file loads strictly; fingerprints equal torchvision's pooled features."""
    torch.manual_seed(3)
    net = torchvision.models.get_model(arch, weights=None).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), path)
    spec = ModelSpec(arch=arch, weights=str(path), batch_size=2, torch_threads=1)
    got = embed.embed_batch(_windows(), spec)
    assert got.shape == (3, embed.BACKBONES[arch].dim)
    x = (torch.from_numpy(_windows()).float() / 255 - torch.tensor(embed.MEAN).view(1, 3, 1, 1)) / torch.tensor(
        embed.STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = net.features(x) if hasattr(net, "features") else None
        if arch.startswith("resnet"):
            net.fc = torch.nn.Identity()
            ref = net(x)
        else:
            ref = torch.nn.functional.adaptive_avg_pool2d(feats, 1).flatten(1)
    assert np.abs(got - ref.numpy()).max() < 1e-4


def test_headless_file_loads_and_mismatched_file_is_refused(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    headless = tmp_path / "headless.pth"
    torch.save(sd, headless)
    embed.build_model(ModelSpec(weights=str(headless)))  # strict on all but the dropped classifier
    other = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), other)
    with pytest.raises(WeightsError, match="do not fit torchvision's resnet18.*--model"):
        embed.build_model(ModelSpec(weights=str(other)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be loaded"):
        embed.build_model(ModelSpec(weights=str(junk)))


def test_provenance_and_sha_check(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    info = embed.describe_weights("resnet18", str(path))
    assert info["pretrained"] and len(info["weights_sha256"]) == 64 and info["weights_id"].startswith("file:")
    assert "NOT PRETRAINED" in embed.describe_weights("resnet18", "random")["weights_id"]
    with pytest.raises(WeightsError, match="sha256"):
        embed.build_model(ModelSpec(weights=str(path), weights_sha256="0" * 64))
    with pytest.raises(WeightsError, match="does not exist"):
        embed.describe_weights("resnet18", str(tmp_path / "missing.pth"))


def test_random_weights_are_seeded():
    a = embed.embed_batch(_windows(2), ModelSpec(weights="random", seed=1, torch_threads=1))
    b = embed.build_model(ModelSpec(weights="random", seed=1))
    with torch.no_grad():
        x = (torch.from_numpy(_windows(2)).float() / 255 - torch.tensor(embed.MEAN).view(1, 3, 1, 1)) / torch.tensor(
            embed.STD
        ).view(1, 3, 1, 1)
        np.testing.assert_allclose(a, b(x).numpy(), atol=1e-4)
    c = embed.embed_batch(_windows(2), ModelSpec(weights="random", seed=2, torch_threads=1))
    assert np.abs(a - c).max() > 1e-2


def test_windows_cut_on_the_device_equal_host_cut_windows():
    """embed_chunk (upload once, unfold on the device) == embed_batch of windows cut with NumPy."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (3, 640, 512), dtype=np.uint8)
    ij = np.array([[0, 0], [3, 2], [1, 1], [2, 0], [0, 2]])
    host = np.stack([rgb[:, i * 128 : i * 128 + 256, j * 128 : j * 128 + 256] for i, j in ij])
    spec = ModelSpec(weights="random", batch_size=2, torch_threads=1, device="cpu")
    np.testing.assert_allclose(embed.embed_chunk(rgb, ij, spec), embed.embed_batch(host, spec), atol=1e-5)
    assert embed.embed_chunk(rgb, np.zeros((0, 2), int), spec).shape == (0, 512)
    assert embed.auto_batch_size(spec, "cpu") == 64


def test_amp_on_cpu_warns_and_runs_float32():
    spec = ModelSpec(weights="random", torch_threads=1)
    ref = embed.embed_batch(_windows(2), spec)
    with pytest.warns(UserWarning, match="CUDA only"):
        got = embed.embed_batch(_windows(2), ModelSpec(weights="random", torch_threads=1, amp="bf16"))
    np.testing.assert_array_equal(got, ref)


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(WeightsError, match="no CUDA GPU.*--device cpu"):
        embed.resolve_device("cuda")
    assert embed.resolve_device("auto") == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_gpu_fingerprints_match_cpu(amp):
    """Run with -m gpu on a CUDA machine: same windows, CPU float32 vs GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    w = _windows(8)
    cpu = embed.embed_batch(w, ModelSpec(weights="random", device="cpu"))
    gpu = embed.embed_batch(w, ModelSpec(weights="random", device="cuda", amp=amp, batch_size=4))
    tol = 1e-3 if amp == "none" else 0.1
    assert np.abs(cpu - gpu).max() / np.abs(cpu).max() < tol


def test_local_copy_of_torchvision_imagenet_file_is_recognised(tmp_path, monkeypatch):
    """torchvision's file names carry the sha256 prefix (resnet18-f37072fd.pth); a file with
    that prefix is recorded as IMAGENET1K_V1, any other as a plain file."""
    from types import SimpleNamespace

    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    sha = sha256_file(str(path))
    real_url = embed._imagenet_weights("resnet18").url
    assert real_url.endswith("resnet18-f37072fd.pth")
    assert not embed.describe_weights("resnet18", str(path))["weights_id"].startswith("torchvision:")
    monkeypatch.setattr(
        embed, "_imagenet_weights", lambda arch: SimpleNamespace(url=f"https://x/resnet18-{sha[:8]}.pth")
    )
    assert not embed.describe_weights("resnet18", str(path))["weights_id"].startswith("torchvision:")  # w.pth
    named = tmp_path / f"resnet18-{sha[:8]}.pth"
    named.write_bytes(path.read_bytes())
    wid = embed.describe_weights("resnet18", str(named))["weights_id"]
    assert wid.startswith("torchvision:ResNet18_Weights.IMAGENET1K_V1 (file:")


@pytest.mark.parametrize("h,w", [(384, 640), (640, 384), (300, 301), (257, 1000), (200, 500), (999, 333)])
def test_query_images_are_resized_and_cropped_like_torchvision(h, w):
    """The query-image rule is torchvision's Resize(256) + CenterCrop(256), called directly here
    (the longer side truncated, the crop offset rounded)."""
    import torchvision.transforms.functional as F

    rgb = np.random.default_rng(h * w).integers(0, 256, (3, h, w), dtype=np.uint8)
    ref = F.center_crop(F.resize(torch.from_numpy(rgb).float(), 256, antialias=True), 256)
    np.testing.assert_array_equal(embed.fit_to_window(rgb), ref.round().clamp(0, 255).to(torch.uint8).numpy())
