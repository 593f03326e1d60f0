"""Typed, validated settings for every stage.

Every setting lives in a frozen dataclass that validates itself on construction, so a bad value
fails at start-up with a message naming the key, not hours into an ingest. YAML is only read by
:func:`load_config`; the rest of the package receives these objects.

The YAML layout mirrors the classes: top-level sections ``model``, ``tiling``, ``read``,
``store``, ``cluster`` and ``search`` (see ``configs/default.yaml``, which documents every key).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from pipeline import grid
from pipeline.backbones import BACKBONES, MODES
from pipeline.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config"]


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and inference settings (one model per worker process and device)."""

    arch: str = "resnet18"
    weights: str = "imagenet"  # imagenet | random | path to a torchvision state_dict file
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64  # 0 = sized from free GPU memory (64 on the CPU)
    amp: str = "none"  # none | bf16 | fp16 (autocast, CUDA only)
    channels_last: bool = True
    seed: int = 0  # only for weights=random
    torch_threads: int = 0  # 0 = cores // (dask threads per process)
    standin_rate: float = 0.0  # arch standin only: simulated device speed in tiles/s (0 = instant)
    mode: str = "exact"  # exact: every window through the CNN on its own; dense: shared feature maps
    context_px: int = 64  # dense: surroundings read around each chunk of a large image (pixels)

    def __post_init__(self) -> None:
        _require(
            self.arch in BACKBONES,
            "model.arch",
            f"unknown backbone {self.arch!r}; choose one of {sorted(BACKBONES)}",
        )
        _require(bool(self.weights), "model.weights", "must be 'imagenet', 'random' or a file path")
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "model.device",
            f"{self.device!r} is not auto, cpu, cuda or cuda:N",
        )
        _require(
            self.batch_size >= 0, "model.batch_size", f"must be >= 1 (or 0: sized to the device), got {self.batch_size}"
        )
        _require(self.amp in ("none", "bf16", "fp16"), "model.amp", f"{self.amp!r} is not none, bf16 or fp16")
        _require(self.torch_threads >= 0, "model.torch_threads", "must be >= 0 (0 = automatic)")
        _require(self.standin_rate >= 0, "model.standin_rate", "must be >= 0 tiles/s (0 = instant)")
        _require(self.mode in MODES, "model.mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        _require(
            not (self.mode == "dense" and BACKBONES[self.arch].standin),
            "model.mode",
            "dense needs a CNN; the stand-in backbone runs in exact mode only",
        )
        cell = BACKBONES[self.arch].cell_px
        _require(
            self.context_px >= 0 and self.context_px % cell == 0,
            "model.context_px",
            f"must be a multiple of {cell} px (a feature-map cell of {self.arch}) and >= 0, got {self.context_px}",
        )


@dataclass(frozen=True)
class TilingConfig:
    """How pixels become windows, and which windows are kept."""

    black_level: int = 0  # a pixel whose bands are all <= this is nodata (JPEG borders need ~8)
    max_nodata_fraction: float = 0.5  # drop windows with more nodata than this
    bands: tuple[int, ...] = (1, 2, 3)  # 1-based band indexes fed as R, G, B (repeat one for grey)
    scale: tuple[float, float] | None = None  # (min, max) -> 0..255 for non-uint8 imagery

    def __post_init__(self) -> None:
        _require(0 <= self.black_level <= 254, "tiling.black_level", "must be in 0..254")
        _require(
            0.0 <= self.max_nodata_fraction <= 1.0,
            "tiling.max_nodata_fraction",
            "must be in [0, 1]",
        )
        _require(
            len(self.bands) == 3 and all(isinstance(b, int) and b >= 1 for b in self.bands),
            "tiling.bands",
            f"needs three 1-based band indexes (R, G, B), got {list(self.bands)}",
        )
        if self.scale is not None:
            _require(
                len(self.scale) == 2 and float(self.scale[1]) > float(self.scale[0]),
                "tiling.scale",
                f"needs [min, max] with max > min, got {self.scale}",
            )


DECODERS = ("auto", "pillow", "gdal", "device")


@dataclass(frozen=True)
class ReadConfig:
    """How images are cut into dask chunks."""

    chunk_px: int = 2048  # chunk side in pixels (window origins per chunk = chunk_px / 128)
    header_threads: int = 32  # headers read at once while planning (per process; hides storage latency)
    # auto: device where the workers have CUDA and sources decode there, else pillow | pillow: Pillow
    # decodes local plain-RGB JPEG/PNG pixels, GDAL the rest | gdal: GDAL decodes every file |
    # device: JPEG GeoTIFF tiles and JPEG files decode on the workers' GPUs (pipeline.decode)
    decoder: str = "auto"

    def __post_init__(self) -> None:
        _require(
            self.chunk_px >= grid.TILE and self.chunk_px % grid.STRIDE == 0,
            "read.chunk_px",
            f"must be a multiple of {grid.STRIDE} and >= {grid.TILE} so chunk edges fall on the "
            f"window grid; got {self.chunk_px} (try {max(grid.TILE, self.chunk_px // grid.STRIDE * grid.STRIDE)})",
        )
        _require(self.header_threads >= 1, "read.header_threads", f"must be >= 1, got {self.header_threads}")
        _require(self.decoder in DECODERS, "read.decoder", f"must be one of {', '.join(DECODERS)}, got {self.decoder!r}")


@dataclass(frozen=True)
class StoreConfig:
    """Zarr layout of the fingerprint store."""

    dtype: str = "float32"  # float32 | float16
    chunk_tiles: int = 8192  # tiles per Zarr chunk (the unit of search tasks)
    compressor: str = "lz4"  # lz4 | zstd | none, for fingerprints (lz4: ~4 GB/s decode per core)
    batch_tiles: int = 0  # tiles per committed batch of images (0 = 8 x chunk_tiles): the unit of resume
    content_hash: bool = False  # recognise unchanged images by sha256 of the file, not size + mtime
    commit_seconds: float = 10.0  # make finished images searchable at least this often within a batch
    stage_seconds: float = 2.0  # while a unit runs, stage its finished windows this often (what a crash can lose)

    def __post_init__(self) -> None:
        _require(self.dtype in ("float32", "float16"), "store.dtype", f"{self.dtype!r} is not float32 or float16")
        _require(
            self.compressor in ("lz4", "zstd", "none"),
            "store.compressor",
            f"{self.compressor!r} is not lz4, zstd or none",
        )
        _require(self.chunk_tiles >= 1, "store.chunk_tiles", "must be >= 1")
        _require(self.batch_tiles >= 0, "store.batch_tiles", "must be >= 0 (0 = 8 x chunk_tiles)")
        _require(self.commit_seconds >= 0, "store.commit_seconds", "must be >= 0 seconds")
        _require(self.stage_seconds >= 0, "store.stage_seconds", "must be >= 0 seconds")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the dask graph runs. Only :mod:`pipeline.cluster` acts on this."""

    # threads | sync | local | local-cuda | kubernetes | slurm | pbs | a scheduler address (tcp://host:8786)
    scheduler: str = "threads"
    n_workers: int = 0  # local: processes (0 = min(2, cores)); kubernetes: workers; slurm/pbs: jobs (0 = 1)
    threads: int = 0  # threads: dask threads; local: threads per worker (0 = automatic)
    gpus: str = ""  # local-cuda: comma-separated GPU ids, "" = every visible GPU
    kubernetes_spec: str = ""  # kubernetes: DaskCluster manifest ("" = pipeline/cluster/daskcluster.yaml, shipped)
    jobqueue: dict[str, Any] = field(default_factory=dict)  # slurm/pbs: keyword arguments of SLURMCluster/PBSCluster
    progress: bool = True
    batches_in_flight: int = 2  # ingest: batches computed at once (the next starts before one ends)
    io_threads: int = 0  # local-cuda: threads per GPU worker reading while the GPU computes (0 = cores per GPU, >= 2)

    def __post_init__(self) -> None:
        _require(
            self.scheduler in SCHEDULERS or "://" in self.scheduler,
            "cluster.scheduler",
            f"{self.scheduler!r} is not one of {', '.join(SCHEDULERS)} or a scheduler address like tcp://host:8786",
        )
        _require(self.n_workers >= 0, "cluster.n_workers", "must be >= 0")
        _require(self.threads >= 0, "cluster.threads", "must be >= 0")
        _require(self.batches_in_flight >= 1, "cluster.batches_in_flight", "must be >= 1")
        _require(self.io_threads >= 0, "cluster.io_threads", "must be >= 0 (0 = cores per GPU)")
        _require(
            all(g.strip().isdigit() for g in self.gpus.split(",")) if self.gpus else True,
            "cluster.gpus",
            f"must be comma-separated GPU ids like 0,1, got {self.gpus!r}",
        )


SCHEDULERS = ("threads", "sync", "local", "local-cuda", "kubernetes", "slurm", "pbs")


@dataclass(frozen=True)
class SearchConfig:
    """Where searches run (:mod:`pipeline.search.device`): ``search``, ``classify``, ``heatmap``,
    ``serve``, ``postprocess`` and ``evaluate`` read this."""

    device: str = "auto"  # auto (a CUDA GPU when one is visible, else the NumPy engine) | cpu (torch) | cuda | cuda:N
    dtype: str = ""  # the search space's dtype in memory: "" = the store's | float32 | float16

    def __post_init__(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda", "numpy") or self.device.startswith("cuda:"),
            "search.device",
            f"{self.device!r} is not auto, cpu, cuda, cuda:N or numpy",
        )
        _require(self.dtype in ("", "float32", "float16"), "search.dtype", f"{self.dtype!r} is not float32 or float16")


@dataclass(frozen=True)
class Config:
    """All settings. Build with ``Config()`` for the defaults or :func:`load_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, **dotted: Any) -> Config:
        """Return a copy with ``section.key`` values replaced; ``None`` values are ignored.

        >>> Config().override(**{"model.batch_size": 8}).model.batch_size
        8
        """
        sections: dict[str, dict[str, Any]] = {}
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        cfg = self
        for section, values in sections.items():
            sub = getattr(cfg, section, None)
            _require(sub is not None, section, "unknown section")
            known = {f.name for f in fields(sub)}
            for name in values:
                _require(name in known, f"{section}.{name}", f"unknown key; known keys: {sorted(known)}")
            cfg = dataclasses.replace(
                cfg, **{section: _build(type(sub), {**dataclasses.asdict(sub), **values}, section)}
            )
        return cfg


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type (lists -> tuples, ints -> floats)."""
    origin = get_origin(hint)
    args = get_args(hint)
    if value is None:
        _require(type(None) in args, key, "may not be null")
        return None
    if origin is tuple or (args and any(get_origin(a) is tuple for a in args)):
        tup = hint if origin is tuple else next(a for a in args if get_origin(a) is tuple)
        _require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        inner = get_args(tup)[0]
        return tuple(_coerce(v, inner, key) for v in value)
    if origin is dict:
        _require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}"
        )
        return float(value)
    if hint is str:
        _require(isinstance(value, (str, os.PathLike)), key, f"must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    _require(
        not unknown, f"{section}.{unknown[0]}" if unknown else section, f"unknown key; known keys: {sorted(known)}"
    )
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build a :class:`Config` from nested dicts; unknown sections or keys are errors."""
    data = data or {}
    _require(isinstance(data, dict), "<root>", "the config file must be a mapping of sections")
    hints = get_type_hints(Config)
    unknown = sorted(set(data) - set(hints))
    _require(not unknown, unknown[0] if unknown else "", f"unknown section; known sections: {sorted(hints)}")
    parts = {}
    for name, cls in hints.items():
        section = data.get(name) or {}
        _require(isinstance(section, dict), name, "must be a mapping of keys")
        parts[name] = _build(cls, section, name)
    return Config(**parts)


DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read a YAML config file (``None``: the defaults, identical to ``configs/default.yaml``)."""
    if path is None:
        return Config()
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass --config with a YAML file like configs/default.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
