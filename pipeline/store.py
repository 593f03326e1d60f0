"""The fingerprint store: a Zarr v3 group readable with ``xarray.open_zarr``. This module owns the
schema: it is the only code that opens Zarr, creates arrays or writes attributes.

Arrays (dims ``tile``, ``feature``, ``img``, ``affine``, ``post_feature``)::

    fingerprint (tile, feature) float32|float16  raw model output; zeros where valid is False
    valid       (tile,)         bool     False for dropped windows (>50 % nodata) and padding slots
    uid         (tile,)         uint64   image_id * 2**40 + (row // 128) * 2**20 + (col // 128)
    image       (tile,)         int32    image id (index into the img table); -1 in padding slots
    row, col    (tile,)         int32    pixel offset of the window's top-left corner
    x, y        (tile,)         float64  window centre in the image CRS (pixels without a transform)
    lon, lat    (tile,)         float64  window centre in WGS84; NaN without a CRS
    image_path  (img,)          str      absolute path or URI as given
    width, height, size (img,)  int64    pixels, pixels, bytes on disk
    crs         (img,)          str      "" without a CRS
    transform   (img, affine)   float64  affine a, b, c, d, e, f
    mtime       (img,)          float64  modification time, seconds since the epoch
    status      (img,)          str      pending | done | empty (no windows) | failed | replaced | removed
    error       (img,)          str      why a failed image failed
    sha256      (img,)          str      content hash (ingest --hash), "" when not computed
    tile_start, tile_count (img,) int64  the image's contiguous slot range on ``tile``

Derived arrays (``aerial-search postprocess``; rebuilt from the raw fingerprints, never the
only copy of anything)::

    post_mean        (feature,)               float32  PCA: centre of the fitting set
    post_projection  (feature, post_feature)  float32  PCA: projection with whitening
    fingerprint_dba  (tile, post_feature)     float32  database-side augmented fingerprints
    codes            (tile, code_byte)        uint8    binary codes of the search space (ITQ)
    codes_mean       (post_feature,)          float32  codes: centre of the fitting set
    codes_projection (post_feature, code_bit) float32  codes: PCA + ITQ rotation, sign -> bit
    knn_uid          (tile, neighbour)        uint64   each valid tile's K nearest tiles (postprocess --knn)
    knn_sim          (tile, neighbour)        float32  their cosine similarity; NaN where none (and for invalid tiles)

Group attributes: ``schema_version`` (:data:`SCHEMA_VERSION`), ``software``, ``created``,
``model`` (arch, dim, head, weights_id, weights_sha256, pretrained), ``preprocessing`` (tile,
stride, crop, mean, std, input_scale, bands, scale, black_level, max_nodata_fraction),
``fingerprint_dtype``, ``uid`` (the formula), ``layout`` (chunk_tiles, chunk_px), ``config``
(every setting of the ingest that made it), ``last_ingest`` (finished, failed files) and
``postprocess`` (method, dims, fitted_on_tiles, created; ``dba``: depth, alpha, tiles and
``stale``, the reason it no longer covers the store, when it does not; ``codes``: kind, bits,
fitted_on_tiles, on (``fingerprint`` or ``fingerprint_dba``), created and ``stale``; ``knn``: k,
tiles, seconds, created and ``stale``).

Slots: images in image-id order (sorted paths), each image's grid chunks row-major, each chunk's
windows row-major. Every window of the paper's grid has a slot, kept or not, so a window's slot
follows from the headers alone (:func:`pipeline.grid.slot_in_image`). ``fingerprint`` and
``valid`` are chunked by ``store.chunk_tiles`` along ``tile``, the small per-tile arrays by 16
times that (one ~1 MB read serves 16 fingerprint chunks); the ingest graph rechunks to exactly
these chunks, so each Zarr chunk is written by one task.

Writes: a new local store is built in a hidden sibling folder (``.NAME.partial``, where a rerun
resumes) and swapped into place when every image is done; an existing or object-storage store
grows in place, and readers use only images whose ``status`` is ``done``. The group's metadata
(every array's shape, the attributes) is consolidated into the root ``zarr.json`` after every
change of shape or attributes, in one atomic write: a reader opens one consistent snapshot,
without per-array reads, and ``xarray.open_zarr(path)`` opens it without a warning. Derived
tile arrays follow the store's growth (resized) and are marked stale once images are added or
removed, so a store always opens; search ignores a stale ``fingerprint_dba`` and says how to
rebuild it.

Staging (resume inside an image): each ingest unit's fingerprint rows are saved, as soon as they
are computed, in a hidden sibling folder (``.NAME.staging/START-COUNT.npy``), and a long unit's
first windows every few seconds while it runs (``START-COUNT.part-FIRST-N.npy``). A rerun after
a crash loads them instead of recomputing; a batch's files are deleted once it is committed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import codes, grid, post
from pipeline.backbones import MEAN, STD
from pipeline.errors import StoreError
from pipeline.version import __version__

SCHEMA_VERSION = 2  # 2: status "removed", consolidated metadata (1 -> 2: `aerial-search migrate`)
STATUSES = ("pending", "done", "empty", "failed", "replaced", "removed")
META_CHUNK_FACTOR = 16  # uid, image, row, col, x, y, lon, lat: chunks of 16 x chunk_tiles
TILE_VARS = ("fingerprint", "valid", "uid", "image", "row", "col", "x", "y", "lon", "lat")
IMG_STR_VARS = ("image_path", "crs", "status", "error", "sha256")
IMG_INT_VARS = ("width", "height", "size", "tile_start", "tile_count")
IMG_VARS = (*IMG_STR_VARS, *IMG_INT_VARS, "mtime", "transform")
DERIVED_TILE_VARS = ("fingerprint_dba", "codes", "knn_uid", "knn_sim")  # per-tile arrays computed from the others
# their entry in attrs["postprocess"]
_DERIVED_META = {"fingerprint_dba": "dba", "codes": "codes", "knn_uid": "knn", "knn_sim": "knn"}
IMG_CHUNK = 4096

__all__ = ["StoreError", "open_store"]


# --------------------------------------------------------------------------------------------
# Paths


def is_remote(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def _fs(url: str):
    """fsspec filesystem and root for an object-storage URL (s3://, gs://, ...)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise StoreError(f"store {url} needs an fsspec driver: pip install 'aerial-search[cloud]' ({e})") from e


def is_store(path: Path | str) -> bool:
    """Whether ``path`` holds a Zarr group (``zarr.json``)."""
    if is_remote(path):
        fs, root = _fs(str(path))
        return fs.exists(f"{root.rstrip('/')}/zarr.json")
    return (Path(path) / "zarr.json").is_file()


def exists(path: Path | str) -> bool:
    if is_remote(path):
        fs, root = _fs(str(path))
        return fs.exists(root)
    return Path(path).exists()


def partial_path(final: Path | str) -> Path:
    """Where a new local store is built before it is swapped into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def check_writable(path: str | os.PathLike[str]) -> Path | str:
    """Normalize ``path`` and refuse early (before any work) if it cannot hold a store: an
    existing non-store folder, or a local parent that cannot be created or written."""
    if is_remote(path):
        url = str(path).rstrip("/")
        if exists(url) and not is_store(url):
            raise StoreError(f"{url} exists and is not a fingerprint store; choose another --store path")
        return url
    p = Path(path).expanduser().resolve()
    if p.exists() and not is_store(p):
        raise StoreError(f"{p} exists and is not a fingerprint store; choose another --store path")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create the folder {parent} for store {p} ({e}); choose a writable --store path"
        ) from e
    if not os.access(parent, os.W_OK):
        raise StoreError(f"cannot write in {parent} (permission denied); choose a writable --store path")
    return p


def swap_in(tmp: Path | str, final: Path | str) -> None:
    """Move a finished local store into place; an existing store is replaced only after that."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path | str) -> None:
    if is_remote(tmp):
        fs, root = _fs(str(tmp))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    shutil.rmtree(tmp, ignore_errors=True)


def store_bytes(path: str | os.PathLike[str]) -> int:
    if is_remote(path):
        fs, root = _fs(str(path))
        return int(fs.du(root))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _group(path: Path | str, mode: str):
    """The Zarr group with each array's own, live metadata: what writers (and the ingest's own
    reads) need. Readers of the snapshot go through :func:`open_store` instead."""
    import zarr

    return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)


# --------------------------------------------------------------------------------------------
# Reading


def open_store(path: str | os.PathLike[str]):
    """Open a store (folder or object-storage URL) as a lazy ``xarray.Dataset`` from its
    consolidated metadata, after checking that it is a fingerprint store of this schema version.

    A derived array that does not cover the store's tiles (left by an older release that did not
    grow it) is left out and reported stale rather than making the store unopenable.
    """
    import xarray as xr

    p: Path | str = str(path).rstrip("/") if is_remote(path) else Path(path).expanduser()
    if not exists(p):
        raise StoreError(f"store {p} does not exist; create it with `aerial-search ingest SOURCE --store {p}`")
    if not is_store(p):
        raise StoreError(f"{p} is not a fingerprint store (no zarr.json); pass the --store path given to ingest")
    check_version(p)
    short = []
    try:
        ds = xr.open_zarr(p, consolidated=True, zarr_format=3)
    except ValueError as e:
        if "conflicting sizes" not in str(e):
            raise StoreError(f"{p} cannot be opened as a Zarr v3 store ({e})") from e
        short = _short_derived(p)
        try:
            ds = xr.open_zarr(p, consolidated=True, zarr_format=3, drop_variables=short)
        except Exception as e2:
            raise StoreError(f"{p} cannot be opened as a Zarr v3 store ({e2})") from e2
    except Exception as e:
        raise StoreError(f"{p} cannot be opened as a Zarr v3 store ({e})") from e
    if "fingerprint" not in ds:
        raise StoreError(f"{p} is a Zarr group but not a fingerprint store made by aerial-search")
    for name in short:
        _note_stale(ds.attrs, name, "it covers fewer tiles than the store (images were added after it was built)")
    return ds


def check_version(path: Path | str) -> int:
    """The store's schema version, refused unless this code reads it (an older one: with the
    command that upgrades it)."""
    try:
        version = _group(path, "r").attrs.get("schema_version")
    except Exception as e:
        raise StoreError(f"{path} cannot be opened as a Zarr v3 store ({e})") from e
    if version is None:
        raise StoreError(f"{path} is a Zarr group but not a fingerprint store made by aerial-search")
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {version}; this aerial-search reads version {SCHEMA_VERSION}: "
            f"upgrade it in place with `aerial-search migrate --store {path}`"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {version}, newer than this aerial-search reads ({SCHEMA_VERSION}): "
            f"install the aerial-search release that wrote it"
        )
    return int(version)


def consolidate(path: Path | str) -> None:
    """Write every array's metadata and the attributes into the root ``zarr.json`` (atomically),
    the snapshot readers open."""
    import warnings

    import zarr

    # zarr notes that v3 consolidation is not in the spec yet: known, and read back here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path), zarr_format=3)


def _short_derived(path: Path | str) -> list[str]:
    g = _group(path, "r")
    n = g["fingerprint"].shape[0]
    return [name for name in DERIVED_TILE_VARS if name in g and g[name].shape[0] != n]


def provenance(ds) -> dict[str, Any]:
    """The store's group attributes as a plain dict."""
    return {k: _plain(v) for k, v in ds.attrs.items()}


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def read_table(path: Path | str) -> dict[str, np.ndarray]:
    """The image table as NumPy arrays (strings as object arrays), plus ``n_tiles``."""
    g = _group(path, "r")
    out = {}
    for name in IMG_VARS:
        a = g[name][...]
        out[name] = a.astype(object) if name in IMG_STR_VARS else np.asarray(a)
    out["n_tiles"] = np.array(g["valid"].shape[0])
    return out


def read_valid(path: Path | str) -> np.ndarray:
    """The ``valid`` mask of every slot."""
    return np.asarray(_group(path, "r")["valid"][:], dtype=bool)


def read_attrs(path: Path | str) -> dict[str, Any]:
    """The group attributes, without opening the arrays."""
    return _plain(dict(_group(path, "r").attrs))


def fingerprint_signature(prov: dict[str, Any]) -> dict[str, Any]:
    """What must match for two fingerprints to be comparable."""
    model, pre = prov.get("model", {}), prov.get("preprocessing", {})
    return {
        "arch": model.get("arch"),
        "dim": model.get("dim"),
        "mode": model.get("mode", "exact"),  # stores before dense mode are exact
        "context_px": model.get("context_px"),
        "weights": model.get("weights_sha256") or model.get("weights_id"),
        "mean": pre.get("mean"),
        "std": pre.get("std"),
        "bands": pre.get("bands"),
        "scale": pre.get("scale"),
    }


def signature_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (a's value, b's value)}`` where two provenances' fingerprints would differ."""
    sa, sb = fingerprint_signature(a), fingerprint_signature(b)
    return {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}


def memory_dataset(x: np.ndarray, chunk: int = 512):
    """An in-memory dataset with the store's search schema, one image per row of ``x`` (n, d):
    what :class:`~pipeline.search.SearchIndex` searches when fingerprints never touched a disk."""
    import dask.array as da
    import xarray as xr

    n = len(x)
    nan = np.full(n, np.nan)
    uid = grid.pack_uid(np.arange(n), 0, 0)
    return xr.Dataset(
        {
            "fingerprint": (("tile", "feature"), da.from_array(np.asarray(x, np.float32), chunks=(chunk, -1))),
            "valid": ("tile", da.ones(n, bool, chunks=chunk)),
            "uid": ("tile", da.from_array(uid, chunks=chunk)),
            "lon": ("tile", da.from_array(nan, chunks=chunk)),
            "lat": ("tile", da.from_array(nan.copy(), chunks=chunk)),
            "image_path": ("img", np.array([str(i) for i in range(n)], dtype=object)),
            "crs": ("img", np.array([""] * n, dtype=object)),
            "transform": (("img", "affine"), np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1))),
        }
    )


# --------------------------------------------------------------------------------------------
# Creating and growing


def schema_attrs(cfg: Any, arch: str, dim: int, weights: dict[str, Any]) -> dict[str, Any]:
    """Group attributes that say how every fingerprint in a new store is made.

    ``cfg``: the :class:`~pipeline.config.Config` of the ingest; ``weights``: what
    :func:`pipeline.embed.describe_weights` returns.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "software": f"aerial-search {__version__}",
        "created": _now(),
        "model": {
            "arch": arch,
            "dim": dim,
            "head": "classifier removed; global average pool",
            **weights,
            "mode": cfg.model.mode,
            **({"context_px": cfg.model.context_px} if cfg.model.mode == "dense" else {}),
        },
        "preprocessing": {
            "tile": grid.TILE,
            "stride": grid.STRIDE,
            "crop": "top-left, to a multiple of 256 per axis",
            "mean": list(MEAN),
            "std": list(STD),
            "input_scale": "uint8 / 255",
            "bands": list(cfg.tiling.bands),
            "scale": list(cfg.tiling.scale) if cfg.tiling.scale else None,
            "black_level": cfg.tiling.black_level,
            "max_nodata_fraction": cfg.tiling.max_nodata_fraction,
        },
        "fingerprint_dtype": cfg.store.dtype,
        "uid": "image_id * 2**40 + (row // 128) * 2**20 + (col // 128)",
        "layout": {"chunk_tiles": cfg.store.chunk_tiles, "chunk_px": cfg.read.chunk_px},
        "config": cfg.to_dict(),
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint_compressors(name: str) -> tuple:
    """Zarr v3 compressors for the fingerprint array.

    Measured on real SqueezeNet fingerprints (one core): blosc-lz4 with byte shuffle decodes at
    ~4.6 GB/s (ratio 1.14), zstd at ~1.2 GB/s (ratio 1.38). Search from the store is bound by
    decoding, so lz4 is the default; zstd suits cold archives.
    """
    from zarr.codecs import BloscCodec, ZstdCodec

    return {
        "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
        "zstd": (ZstdCodec(level=3),),
        "none": (),
    }[name]


def create_store(
    path: Path | str, attrs: dict[str, Any], dim: int, dtype: str, chunk_tiles: int, compressor: str
) -> None:
    """An empty store: every variable with zero tiles and zero images, ready to grow."""
    import zarr

    g = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes=attrs)
    meta = chunk_tiles * META_CHUNK_FACTOR
    g.create_array("fingerprint", shape=(0, dim), chunks=(chunk_tiles, dim), dtype=dtype,
                   compressors=fingerprint_compressors(compressor), dimension_names=("tile", "feature"))  # fmt: skip
    g.create_array("valid", shape=(0,), chunks=(chunk_tiles,), dtype=bool, fill_value=False, dimension_names=("tile",))
    for name, dt_, fill in (("uid", "uint64", 0), ("image", "int32", -1), ("row", "int32", 0), ("col", "int32", 0)):
        g.create_array(name, shape=(0,), chunks=(meta,), dtype=dt_, fill_value=fill, dimension_names=("tile",))
    for name in ("x", "y", "lon", "lat"):
        g.create_array(
            name, shape=(0,), chunks=(meta,), dtype="float64", fill_value=float("nan"), dimension_names=("tile",)
        )
    for name in IMG_STR_VARS:
        g.create_array(name, shape=(0,), chunks=(IMG_CHUNK,), dtype=str, dimension_names=("img",))
    for name in IMG_INT_VARS:
        g.create_array(name, shape=(0,), chunks=(IMG_CHUNK,), dtype="int64", fill_value=0, dimension_names=("img",))
    g.create_array(
        "mtime", shape=(0,), chunks=(IMG_CHUNK,), dtype="float64", fill_value=float("nan"), dimension_names=("img",)
    )
    g.create_array(
        "transform",
        shape=(0, 6),
        chunks=(IMG_CHUNK, 6),
        dtype="float64",
        fill_value=0.0,
        dimension_names=("img", "affine"),
    )
    consolidate(path)


def empty_table() -> dict[str, np.ndarray]:
    """The image table of a store that does not exist yet."""
    out: dict[str, np.ndarray] = {name: np.zeros(0, dtype=object) for name in IMG_STR_VARS}
    out.update({name: np.zeros(0, dtype=np.int64) for name in IMG_INT_VARS})
    out["mtime"] = np.zeros(0)
    out["transform"] = np.zeros((0, 6))
    out["n_tiles"] = np.array(0)
    return out


def grow(path: Path | str, n_tiles: int, n_images: int) -> None:
    """Resize the tile arrays (derived ones included) to ``n_tiles`` slots and the image table to
    ``n_images`` rows. New slots of a derived array hold its fill value until it is rebuilt."""
    g = _group(path, "r+")
    for name in (*TILE_VARS, *(d for d in DERIVED_TILE_VARS if d in g)):
        a = g[name]
        if a.shape[0] != n_tiles:
            a.resize((n_tiles, *a.shape[1:]))
    for name in IMG_VARS:
        a = g[name]
        a.resize((n_images, *a.shape[1:]))
    consolidate(path)


META_VARS = ("uid", "image", "row", "col", "x", "y", "lon", "lat")  # follow from headers alone


def write_tile_meta(path: Path | str, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write the per-tile metadata (:data:`META_VARS`) of the slots ``[start, start + n)``. Only
    the ingest driver calls it, one batch at a time, so partial chunks are never raced."""
    g = _group(path, "r+")
    for name in META_VARS:
        v = arrays[name]
        g[name][start : start + len(v)] = v


def write_fingerprints(path: Path | str, start: int, fingerprints: np.ndarray, valid: np.ndarray) -> None:
    """Write ``fingerprint`` and ``valid`` for the slots ``[start, start + n)``, which lie in one
    Zarr chunk (the ingest graph gives every chunk exactly one writer)."""
    g = _group(path, "r+")
    g["fingerprint"][start : start + len(fingerprints)] = fingerprints
    g["valid"][start : start + len(valid)] = valid


def write_rows(path: Path | str, ids: np.ndarray, values: dict[str, Any]) -> None:
    """Write image-table rows ``ids`` (one small write per variable)."""
    g = _group(path, "r+")
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return
    lo, hi = int(ids.min()), int(ids.max()) + 1
    contiguous = hi - lo == len(ids) and bool(np.all(np.diff(ids) == 1))
    for name, v in values.items():
        a = g[name]
        if contiguous:
            a[lo:hi] = v
        else:  # one read-modify-write of the covering range, not one small write per row
            block = a[lo:hi]
            block = block.astype(object) if name in IMG_STR_VARS else np.asarray(block)
            block[ids - lo] = np.asarray(v, dtype=block.dtype)
            a[lo:hi] = block


def set_status(path: Path | str, ids: Any, status: str, errors: Any = None) -> None:
    """Set the status of images ``ids`` (and their ``error`` text). Images becoming ``done`` or
    ``replaced`` change what is searchable: derived tile arrays are marked stale."""
    ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
    if not len(ids):
        return
    order = np.argsort(ids)
    values: dict[str, Any] = {"status": np.array([status] * len(ids), dtype=object)}
    if errors is not None:
        values["error"] = np.asarray([str(e)[:2000] for e in np.atleast_1d(errors)], dtype=object)[order]
    write_rows(path, ids[order], values)
    if status in ("done", "replaced", "removed"):
        attrs = read_attrs(path)
        why = f"images were {'removed' if status == 'removed' else 'added or replaced'} after it was built"
        if any([_note_stale(attrs, name, why) for name in DERIVED_TILE_VARS]):  # every one, no short cut
            set_attrs(path, postprocess=attrs["postprocess"])


def set_attrs(path: Path | str, **attrs: Any) -> None:
    _group(path, "r+").attrs.update(attrs)
    consolidate(path)


# --------------------------------------------------------------------------------------------
# Post-processing and derived arrays


def read_postprocess(ds) -> post.PostProcess:
    """The post-processing fitted into a store (``none`` if there is none)."""
    meta = ds.attrs.get("postprocess")
    if not meta:
        return post.PostProcess()
    if meta["method"] != "pca":
        return post.PostProcess(meta["method"])
    mean = ds["post_mean"].values.astype(np.float32)
    return post.PostProcess("pca", mean, ds["post_projection"].values.astype(np.float32))


def save_postprocess(path: str | Path, t: post.PostProcess, fitted_on: int) -> None:
    """Write a fitted post-processing into a store (arrays + attributes); the raw fingerprints
    stay. Derived arrays are dropped: they were made under the old post-processing."""
    g = _group(path, "r+")
    for name in ("post_mean", "post_projection", *DERIVED_TILE_VARS, *CODE_VARS):
        if name in g:
            del g[name]
    if t.method == "pca":
        m = g.create_array("post_mean", shape=t.mean.shape, dtype="float32", dimension_names=("feature",))
        m[:] = t.mean
        p = g.create_array(
            "post_projection", shape=t.projection.shape, dtype="float32", dimension_names=("feature", "post_feature")
        )
        p[:] = t.projection
    g.attrs["postprocess"] = {"method": t.method, "dims": t.dims, "fitted_on_tiles": int(fitted_on), "created": _now()}
    consolidate(path)


def write_dba(path: str | Path, values: np.ndarray, depth: int, alpha: float, tiles: int) -> None:
    """Write ``fingerprint_dba`` (tile, post_feature), chunked like ``fingerprint``, and record
    how it was built (``postprocess.dba``), replacing an earlier one."""
    g = _group(path, "r+")
    if "fingerprint_dba" in g:
        del g["fingerprint_dba"]
    chunks = (g["fingerprint"].chunks[0], values.shape[1])
    arr = g.create_array(
        "fingerprint_dba", shape=values.shape, chunks=chunks, dtype="float32", dimension_names=("tile", "post_feature")
    )
    arr[:] = values
    meta = dict(g.attrs.get("postprocess") or {"method": "none", "dims": None})
    meta["dba"] = {"depth": depth, "alpha": alpha, "tiles": int(tiles)}
    if meta.get("codes") and meta["codes"].get("on") != "fingerprint_dba" and not meta["codes"].get("stale"):
        meta["codes"] = {**meta["codes"], "stale": "DBA was built after the codes, which encode the space search uses"}
    g.attrs["postprocess"] = meta
    consolidate(path)


CODE_VARS = ("codes_mean", "codes_projection", "codes_centroids")  # the fitted encoder of ``codes``


def write_codes(
    path: str | Path, n_tiles: int, nbytes: int, encoder: dict[str, tuple[np.ndarray, tuple[str, ...]]], info: dict,
    rows: Any,
) -> None:  # fmt: skip
    """Write ``codes`` (tile, code_byte) uint8 of ``nbytes`` bytes per tile, chunked like
    ``fingerprint``, from ``rows`` (an iterable of ``(start, uint8 codes)``, one Zarr chunk
    each), its encoder (``encoder``: array name -> (array, dimension names), e.g. binary codes'
    ``codes_mean`` and ``codes_projection``, PQ codes' ``codes_centroids``) and, last,
    ``postprocess.codes`` (``info`` + created), replacing earlier codes. Until that last write
    the store has no usable codes: an interrupted run leaves them absent, never half-written."""
    g = _group(path, "r+")
    meta = dict(g.attrs.get("postprocess") or {"method": "none", "dims": None})
    if meta.pop("codes", None) is not None:
        g.attrs["postprocess"] = meta
    for name in ("codes", *CODE_VARS):
        if name in g:
            del g[name]
    arr = g.create_array("codes", shape=(n_tiles, nbytes), chunks=(g["fingerprint"].chunks[0], nbytes),
                         dtype="uint8", dimension_names=("tile", "code_byte"))  # fmt: skip
    for start, block in rows:
        arr[start : start + len(block)] = block
    for name, (values, dims) in encoder.items():
        a = g.create_array(name, shape=values.shape, dtype="float32", dimension_names=dims)
        a[:] = values
    meta["codes"] = {**info, "created": _now()}
    g.attrs["postprocess"] = meta
    consolidate(path)


def write_knn(path: str | Path, n_tiles: int, k: int, info: dict, rows: Any) -> None:
    """Write the k-NN graph ``knn_uid`` (tile, neighbour) uint64 and ``knn_sim`` float32 (NaN:
    no neighbour), chunked like ``fingerprint``, from ``rows`` (an iterable of ``(start, uids,
    sims)``), then ``postprocess.knn`` (``info`` + created) last, replacing an earlier graph:
    an interrupted build leaves no graph, never half of one."""
    g = _group(path, "r+")
    meta = dict(g.attrs.get("postprocess") or {"method": "none", "dims": None})
    if meta.pop("knn", None) is not None:
        g.attrs["postprocess"] = meta
    for name in ("knn_uid", "knn_sim"):
        if name in g:
            del g[name]
    chunks = (g["fingerprint"].chunks[0], k)
    dims = ("tile", "neighbour")
    u = g.create_array("knn_uid", shape=(n_tiles, k), chunks=chunks, dtype="uint64", dimension_names=dims)
    sim = g.create_array("knn_sim", shape=(n_tiles, k), chunks=chunks, dtype="float32", dimension_names=dims,
                         fill_value=np.nan)  # fmt: skip
    for start, uids, sims in rows:
        u[start : start + len(uids)] = uids
        sim[start : start + len(sims)] = sims
    meta["knn"] = {**info, "created": _now()}
    g.attrs["postprocess"] = meta
    consolidate(path)


def read_codes_encoder(ds) -> dict[str, np.ndarray]:
    """The arrays of a store's codes encoder (:data:`CODE_VARS` that it has), float32."""
    return {name: ds[name].values.astype(np.float32) for name in CODE_VARS if name in ds}


def has_derived(ds, name: str) -> bool:
    """Whether the store has derived array ``name`` or a record of it."""
    return name in ds or bool(_derived_meta(ds.attrs, name))


def _derived_meta(attrs: dict[str, Any], name: str) -> dict[str, Any]:
    meta = attrs.get("postprocess") or {}
    return meta.get(_DERIVED_META[name]) or {}


def _note_stale(attrs: dict[str, Any], name: str, why: str) -> bool:
    """Mark derived array ``name`` stale in ``attrs`` (a mutable copy of the group attributes);
    True when this changed anything."""
    meta = _derived_meta(attrs, name)
    if meta and not meta.get("stale"):
        meta["stale"] = why
        return True
    return False


def stale_reason(ds, name: str) -> str:
    """Why derived array ``name`` of an open store no longer covers it, with the command that
    rebuilds it; ``""`` when it is current (or absent)."""
    meta = _derived_meta(ds.attrs, name)
    if not meta.get("stale"):
        return ""
    post_meta = ds.attrs.get("postprocess") or {}
    if name in ("knn_uid", "knn_sim"):
        return (
            f"the k-NN graph is stale ({meta['stale']}); rebuild it with `aerial-search postprocess --store STORE "
            f"--knn {meta.get('k')}`"
        )
    if name == "codes":
        return (
            f"codes are stale ({meta['stale']}); rebuild them with `aerial-search postprocess --store STORE "
            f"{codes.rebuild_args(meta)}`"
        )
    method = post_meta.get("method", "l2")
    dims = f" --dims {post_meta['dims']}" if method == "pca" and post_meta.get("dims") else ""
    return (
        f"{name} is stale ({meta['stale']}); rebuild it with `aerial-search postprocess --store STORE "
        f"--method {method}{dims} --dba {meta.get('depth')} --alpha {meta.get('alpha')}`"
    )


# --------------------------------------------------------------------------------------------
# Compaction and migration (aerial-search compact / migrate; pipeline.upkeep takes the lock)


def copy_compacted(src: Path | str, dst: Path | str, live: Sequence[str], block: int = 0) -> dict[str, int]:
    """Write a copy of store ``src`` at ``dst`` that keeps only the slots of images whose status
    is in ``live``, packed from slot 0 in image-id order (one batch: it starts on a chunk
    boundary), with ``tile_start``/``tile_count`` rewritten. Every image row stays, so image ids
    and uids do not change; images dropped keep their row with ``tile_count`` 0. Tile arrays are
    copied ``block`` slots at a time (default 16 Zarr chunks), so memory stays bounded.
    """
    g = _group(src, "r")
    table = read_table(src)
    attrs = read_attrs(src)
    status = table["status"].astype(str)
    keep = np.isin(status, list(live))
    count = np.where(keep, table["tile_count"], 0).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    total = int(count.sum())
    z, dim = g["fingerprint"].chunks[0], g["fingerprint"].shape[1]
    compressor = (attrs.get("config", {}).get("store", {}) or {}).get("compressor", "lz4")
    attrs = {**attrs, "schema_version": SCHEMA_VERSION, "compacted": {"from_slots": int(g["valid"].shape[0]),
                                                                     "to_slots": total, "finished": _now()}}  # fmt: skip
    create_store(dst, attrs, dim, str(g["fingerprint"].dtype), z, compressor)
    grow(dst, total, len(status))
    rows = {name: table[name] for name in IMG_VARS}
    rows["tile_start"], rows["tile_count"] = start, count
    write_rows(dst, np.arange(len(status)), rows)
    d = _group(dst, "r+")
    derived = [n for n in DERIVED_TILE_VARS if n in g and not _derived_meta(attrs, n).get("stale")]
    small = ("post_mean", "post_projection", *(CODE_VARS if "codes" in derived else ()))
    for name in (*small, *derived):
        if name in g:
            a = g[name]
            d.create_array(name, shape=a.shape, chunks=a.chunks, dtype=a.dtype,
                           dimension_names=a.metadata.dimension_names)  # fmt: skip
    dropped = [n for n in DERIVED_TILE_VARS if n in g and n not in derived]
    if dropped:  # a stale derived array is not carried over: rerun postprocess
        meta = dict(attrs.get("postprocess") or {})
        for name in dropped:
            meta.pop(_DERIVED_META[name], None)
        d.attrs["postprocess"] = meta
    for name in small:
        if name in g:
            d[name][...] = g[name][...]
    kept = np.flatnonzero(count > 0)
    block = block or z * META_CHUNK_FACTOR
    for a in range(0, total, block):
        b = min(total, a + block)
        slots = np.arange(a, b)
        owner = kept[np.searchsorted(start[kept], slots, side="right") - 1]
        old = table["tile_start"][owner] + (slots - start[owner])
        for name in (*TILE_VARS, *derived):
            d[name][a:b] = g[name].get_orthogonal_selection((old,) + (slice(None),) * (g[name].ndim - 1))
    consolidate(dst)
    return {"slots_before": int(g["valid"].shape[0]), "slots_after": total, "images": len(status),
            "images_dropped": int((~keep & (table["tile_count"] > 0)).sum())}  # fmt: skip


def migrate(path: Path | str) -> tuple[int, int]:
    """Upgrade a store in place to :data:`SCHEMA_VERSION`; returns ``(old, new)`` versions.

    1 -> 2: version 2 adds the status ``removed`` (nothing to rewrite) and reads the group's
    consolidated metadata, which is written here.
    """
    old = int(_group(path, "r").attrs.get("schema_version", 0))
    if old == SCHEMA_VERSION:
        return old, old
    if old != 1:
        raise StoreError(f"{path} has schema version {old}; this aerial-search migrates version 1 to {SCHEMA_VERSION}")
    _group(path, "r+").attrs.update(schema_version=SCHEMA_VERSION, migrated={"from": old, "finished": _now()})
    consolidate(path)
    return old, SCHEMA_VERSION


# --------------------------------------------------------------------------------------------
# Staging: computed units kept until their batch is committed


def staging_path(path: Path | str) -> Path | str:
    """The sibling folder (or prefix) where an ingest stages its computed units."""
    if is_remote(path):
        return f"{str(path).rstrip('/')}.staging"
    path = Path(path)
    return path.with_name(f".{path.name}.staging")


def _staging_fs(path: Path | str):
    import fsspec

    root = staging_path(path)
    if is_remote(root):
        return _fs(str(root))
    return fsspec.filesystem("file"), str(root)


def stage_rows(path: Path | str, start: int, rows: np.ndarray) -> None:
    """Keep a unit's computed rows (slots ``[start, start + len(rows))``) until its batch commits;
    written under a temporary name and renamed, so a staged file is always complete. The unit's
    partial files (:func:`stage_part`) are then deleted."""
    _save_npy(path, f"{start}-{len(rows)}.npy", rows)
    prefix = f"{start}-{len(rows)}.part-"
    fs, root = _staging_fs(path)
    for base in _staged_names(path):
        if base.startswith(prefix):
            fs.rm_file(f"{root}/{base}")


def _staged_names(path: Path | str) -> list[str]:
    fs, root = _staging_fs(path)
    try:
        return [str(n).rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def staged(path: Path | str) -> set[tuple[int, int]]:
    """``(start, count)`` of every completely staged unit."""
    out = set()
    for base in _staged_names(path):
        if base.endswith(".npy") and base.count("-") == 1:
            a, b = base[:-4].split("-")
            if a.isdigit() and b.isdigit():
                out.add((int(a), int(b)))
    return out


def stage_part(path: Path | str, start: int, count: int, first: int, rows: np.ndarray) -> None:
    """Keep the fingerprints of kept windows ``first .. first + len(rows) - 1`` of a unit still
    being computed (``START-COUNT.part-FIRST-N.npy``), so a crash inside a large unit loses at
    most the last few seconds of it."""
    _save_npy(path, f"{start}-{count}.part-{first}-{len(rows)}.npy", rows)


def load_partial(path: Path | str, start: int, count: int) -> np.ndarray | None:
    """The fingerprints of the first kept windows of a unit staged by :func:`stage_part`
    (the contiguous run from window 0), or None."""
    import io

    prefix = f"{start}-{count}.part-"
    parts = []
    for base in _staged_names(path):
        if base.startswith(prefix) and base.endswith(".npy"):
            first, n = (int(v) for v in base[len(prefix) : -4].split("-"))
            parts.append((first, n, base))
    fs, root = _staging_fs(path)
    rows, at = [], 0
    for first, n, base in sorted(parts):
        if first != at:
            break
        rows.append(np.load(io.BytesIO(fs.cat_file(f"{root}/{base}")), allow_pickle=False))
        at += n
    return np.concatenate(rows) if rows else None


def _save_npy(path: Path | str, base: str, rows: np.ndarray) -> None:
    import io

    fs, root = _staging_fs(path)
    fs.makedirs(root, exist_ok=True)
    name = f"{root}/{base}"
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    if is_remote(path):
        fs.pipe_file(name, buf.getvalue())  # one PUT: atomic on object storage
        return
    tmp = f"{name}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
    os.replace(tmp, name)


def load_staged(path: Path | str, start: int, count: int) -> np.ndarray:
    """The rows :func:`stage_rows` kept for slots ``[start, start + count)``."""
    import io

    fs, root = _staging_fs(path)
    rows = np.load(io.BytesIO(fs.cat_file(f"{root}/{start}-{count}.npy")), allow_pickle=False)
    if len(rows) != count:
        raise StoreError(f"staged unit {start}-{count} of {path} holds {len(rows)} rows; delete {root} and rerun")
    return rows


def drop_staged(path: Path | str, lo: int, hi: int) -> None:
    """Delete the staged units (and partial units) that start in slots ``[lo, hi)``: their batch
    is committed."""
    fs, root = _staging_fs(path)
    for base in _staged_names(path):
        head = base.split("-", 1)[0]
        if head.isdigit() and lo <= int(head) < hi:
            fs.rm_file(f"{root}/{base}")


def clear_staging(path: Path | str) -> None:
    """Remove the staging folder once nothing is staged in it."""
    fs, root = _staging_fs(path)
    if fs.exists(root) and not _staged_names(path):
        fs.rm(root, recursive=True)
