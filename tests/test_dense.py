"""Dense mode (`ingest --mode dense`): windows pooled from a shared feature map, checked against
torchvision called directly on the same pixels and cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from pipeline import embed, grid
from pipeline.cli import main
from pipeline.config import Config
from pipeline.embed import BACKBONES, ModelSpec, embed_batch, embed_dense
from pipeline.errors import ConfigError
from pipeline.ingest import ingest
from pipeline.store import open_store
from tests.conftest import textured, write_tif


def _direct_body(arch: str, seed: int = 0):
    """The model with random weights as ``get_model`` builds them (torchvision's, or the
    efficientnet_lite_pytorch package's), cut before the pool."""
    torch.manual_seed(seed)
    if arch.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        m = EfficientNet.from_name(arch.replace("_", "-"), image_size=None).eval()
        return m.extract_features
    m = torchvision.models.get_model(arch, weights=None).eval()
    return torch.nn.Sequential(*list(m.children())[:-2]) if arch.startswith("resnet") else m.features


def _normalize(rgb: np.ndarray, arch: str = "resnet18") -> torch.Tensor:
    bb = BACKBONES[arch]
    x = torch.from_numpy(rgb).float()[None] / 255.0
    return (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("arch", ["resnet18", "squeezenet1_1", "efficientnet_lite0"])
def test_dense_fingerprints_equal_the_mean_of_their_cells_of_a_direct_torchvision_map(arch):
    bb = BACKBONES[arch]
    top, left = 2 * bb.cell_px, 4 * bb.cell_px  # surroundings above and to the left, none below/right
    rgb = textured(top + 640, left + 512, seed=3)  # a chunk of 4 x 3 windows plus its surroundings
    ij = np.array([[0, 0], [3, 2], [1, 1], [2, 0]])
    got = embed_dense([(rgb, top, left, ij)], ModelSpec(arch=arch, weights="random", device="cpu", mode="dense"))[0]
    with torch.no_grad():
        fmap = _direct_body(arch)(_normalize(rgb, arch))[0]
    c, k, e = bb.cell_px, bb.window_cells, bb.edge_cells
    h, w = rgb.shape[1:]
    want = []
    for i, j in ij:  # a window's cells, less `edge_cells` along each side that has pixels beyond it
        y, x = top + 128 * i, left + 128 * j
        cells = fmap[:, y // c : y // c + k, x // c : x // c + k]
        cells = cells[:, e * (y > 0) : k - e * (y + 256 < h), e * (x > 0) : k - e * (x + 256 < w)]
        want.append(cells.mean(dim=(1, 2)).numpy())
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_gpu_dense_fingerprints_match_cpu(amp):
    """Run with -m gpu on a CUDA machine: the same blocks (two of one shape, batched together,
    and one of another) in dense mode on the CPU in float32 and on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bb = BACKBONES["resnet18"]
    blocks = [(textured(640, 512, seed=s), 0, 0, np.array([[0, 0], [3, 2], [1, 1]])) for s in (1, 2)] + [
        (textured(2 * bb.cell_px + 512, 512, seed=3), 2 * bb.cell_px, 0, np.array([[2, 2], [0, 1]]))
    ]
    cpu = embed_dense(blocks, ModelSpec(weights="random", device="cpu", mode="dense"))
    gpu = embed_dense(blocks, ModelSpec(weights="random", device="cuda", amp=amp, batch_size=8, mode="dense"))
    tol = 1e-3 if amp == "none" else 0.1
    for c, g in zip(cpu, gpu, strict=True):
        assert g.shape == c.shape and g.dtype == np.float32
        assert np.abs(c - g).max() / np.abs(c).max() < tol


@pytest.mark.parametrize("arch", ["resnet18", "squeezenet1_1", "efficientnet_lite0"])
def test_a_window_without_surroundings_is_its_exact_fingerprint(arch):
    """The cell mapping of the docstring: a 256 px window alone gives window_cells^2 cells, whose
    mean is the exact-mode (global average pool) fingerprint."""
    rgb = textured(256, 256, seed=5)
    spec = ModelSpec(arch=arch, weights="random", device="cpu")
    exact = embed_batch(rgb[None], spec)
    dense = embed_dense([(rgb, 0, 0, np.zeros((1, 2), np.int64))], ModelSpec(**{**spec.__dict__, "mode": "dense"}))[0]
    with torch.no_grad():
        assert _direct_body(arch)(_normalize(rgb, arch)).shape[-2:] == (BACKBONES[arch].window_cells,) * 2
    np.testing.assert_allclose(dense, exact, rtol=1e-4, atol=1e-5)


def test_equal_small_images_share_one_forward_and_resume_skips_done_groups(monkeypatch):
    spec = ModelSpec(arch="resnet18", weights="random", device="cpu", mode="dense", batch_size=4)
    blocks = [(textured(256, 256, seed=s), 0, 0, np.zeros((1, 2), np.int64)) for s in range(6)]
    calls, seen = [], []
    real = embed.Runner.features
    monkeypatch.setattr(embed.Runner, "features", lambda self, body, x: calls.append(len(x)) or real(self, body, x))
    full = np.concatenate(embed_dense(blocks, spec, on_batch=lambda first, rows: seen.append((first, len(rows)))))
    assert calls == [4, 2] and seen == [(0, 4), (4, 2)]  # batch_size windows' worth of pixels per forward
    calls.clear()
    again = embed_dense(blocks, spec, skip=4)  # the first group was staged by an earlier run
    assert calls == [2]
    np.testing.assert_allclose(np.concatenate(again[4:]), full[4:], rtol=1e-5, atol=1e-6)


def test_dense_ingest_through_the_cli_records_the_mode_and_matches_a_direct_computation(tmp_path, capsys):
    img = write_tif(tmp_path / "a.tif", textured(896, 768, seed=7))  # 5 x 5 windows: 2 x 2 chunks of 384 px
    store = tmp_path / "d.zarr"
    args = ["ingest", str(img), "--store", str(store), "--weights", "random", "--chunk-px", "384", "--no-progress"]
    assert main([*args, "--mode", "dense", "--context-px", "96"]) == 0
    ds = open_store(store)
    assert ds.attrs["model"]["mode"] == "dense" and ds.attrs["model"]["context_px"] == 96
    assert ds.sizes["tile"] == 25 and ds["valid"].values.all()
    # the oracle: one feature map over the whole image, each window the mean of its 8 x 8 cells
    # (the chunks' 96 px of context stand in for the whole image only approximately: a cosine)
    import rasterio

    with rasterio.open(img) as src:
        rgb = src.read()
    with torch.no_grad():
        fmap = _direct_body("resnet18")(_normalize(rgb))[0].numpy()
    _, rows, cols = grid.unpack_uid(ds["uid"].values)
    want = np.stack(
        [fmap[:, r // 32 : r // 32 + 8, c // 32 : c // 32 + 8].mean(axis=(1, 2)) for r, c in zip(rows, cols)]
    )
    got = ds["fingerprint"].values
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99, cos.min()
    # windows whose cells' receptive fields stay inside their chunk's read equal the oracle exactly
    interior = (rows == 0) & (cols == 0)
    np.testing.assert_allclose(got[interior], want[interior], rtol=1e-3, atol=1e-4)

    # exact and dense never mix in one store: the error names the flags to pass
    img2 = write_tif(tmp_path / "b.tif", textured(512, 512, seed=8))
    assert main(["ingest", str(img2), "--store", str(store), "--weights", "random", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--mode dense --context-px 96" in err and "never mix" in err
    assert int(open_store(store)["valid"].sum()) == 25  # nothing written
    assert main([*args[:1], str(img2), *args[2:], "--mode", "dense", "--context-px", "96"]) == 0
    assert int(open_store(store)["valid"].sum()) == 25 + 9


def test_windows_at_chunk_edges_are_computed_like_interior_ones(tmp_path):
    """Chunking must not show in dense fingerprints: the same image ingested with 384 px and
    768 px chunks gives (nearly) the same fingerprints with the default context, and visibly
    different ones without it."""
    img = write_tif(tmp_path / "a.tif", textured(1152, 1152, seed=9))
    base = {"model.weights": "random", "model.mode": "dense", "cluster.progress": False}

    def fps(chunk_px: int, context_px: int) -> np.ndarray:
        store = tmp_path / f"s{chunk_px}-{context_px}.zarr"
        ingest([img], store, Config().override(**base, **{"read.chunk_px": chunk_px, "model.context_px": context_px}))
        ds = open_store(store)
        return ds["fingerprint"].values[np.argsort(ds["uid"].values)]

    def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())

    reference = fps(768, 64)
    assert worst_cosine(fps(384, 64), reference) > 0.995
    assert worst_cosine(fps(384, 0), reference) < worst_cosine(fps(384, 64), reference)


def test_dense_mode_settings_are_checked():
    with pytest.raises(ConfigError, match="model.mode"):
        Config().override(**{"model.mode": "sparse"})
    with pytest.raises(ConfigError, match="stand-in"):
        Config().override(**{"model.arch": "standin", "model.mode": "dense"})
    with pytest.raises(ConfigError, match="multiple of 16"):
        Config().override(**{"model.arch": "squeezenet1_1", "model.mode": "dense", "model.context_px": 40})
