"""The fingerprint store: a Zarr v3 group readable with ``xarray.open_zarr``. The only code that
opens Zarr: it creates, grows, reads and writes the variables that :mod:`pipeline.schema`
describes (one table: name, dims, dtype, chunks, fill), and the group attributes.

Writes: a new local store is built in a hidden sibling folder (``.NAME.partial``, where a rerun
resumes) and swapped into place when every image is done; an existing or object-storage store
grows in place, and readers use only images whose ``status`` is ``done``. The group's metadata
(every array's shape, the attributes) is consolidated into the root ``zarr.json`` after every
change of shape or attributes, in one atomic write: a reader opens one consistent snapshot,
without per-array reads, and ``xarray.open_zarr(path)`` opens it without a warning. Derived
tile arrays follow the store's growth (resized) and are marked stale once images are added or
removed, so a store always opens; search ignores a stale ``fingerprint_dba`` and says how to
rebuild it. ``fingerprint`` and ``valid`` are chunked by ``store.chunk_tiles`` along ``tile``;
the ingest graph rechunks to exactly these chunks, so each Zarr chunk is written by one task.

Users of this module: the ingest driver (and its staging, :mod:`pipeline.ingest.staging`),
upkeep (:mod:`pipeline.upkeep`: compaction and migration call the copies and writes here),
``postprocess`` (:mod:`pipeline.derived`), search and the summary (:mod:`pipeline.summary`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import post, schema
from pipeline.errors import StoreError
from pipeline.locations import exists, is_remote, is_store
from pipeline.schema import VAR

__all__ = ["StoreError", "open_store"]


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
        schema.note_stale(ds.attrs, name, "it covers fewer tiles than the store (images were added after it was built)")
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
    if version < schema.SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {version}; this aerial-search reads version {schema.SCHEMA_VERSION}: "
            f"upgrade it in place with `aerial-search migrate --store {path}`"
        )
    if version > schema.SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {version}, newer than this aerial-search reads ({schema.SCHEMA_VERSION}): "
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
    return [name for name in schema.DERIVED_TILE_VARS if name in g and g[name].shape[0] != n]


def provenance(ds) -> dict[str, Any]:
    """The store's group attributes as a plain dict."""
    return {k: _plain(v) for k, v in ds.attrs.items()}


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def read_table(path: Path | str) -> dict[str, np.ndarray]:
    """The image table as NumPy arrays (strings as object arrays), plus ``n_tiles``."""
    g = _group(path, "r")
    out = {}
    for name in schema.IMG_VARS:
        a = g[name][...]
        out[name] = a.astype(object) if name in schema.IMG_STR_VARS else np.asarray(a)
    out["n_tiles"] = np.array(g["valid"].shape[0])
    return out


def read_valid(path: Path | str) -> np.ndarray:
    """The ``valid`` mask of every slot."""
    return np.asarray(_group(path, "r")["valid"][:], dtype=bool)


def snapshot_id(path: Path | str) -> str:
    """What a reader's snapshot of the store is: a digest of the consolidated metadata (every
    array's shape, the attributes) and of the image statuses (an ingest commits images by
    writing statuses, between consolidations). Equal ids: nothing a search sees has changed."""
    import hashlib

    from pipeline.locations import filesystem

    root = str(path).rstrip("/")
    if is_remote(root):
        fs, key = filesystem(root)
        meta = fs.cat_file(f"{key}/zarr.json")
    else:
        meta = (Path(root) / "zarr.json").read_bytes()
    h = hashlib.sha256(meta)
    status = _group(path, "r")["status"][...]
    h.update("\0".join(str(s) for s in np.asarray(status).ravel()).encode())
    return h.hexdigest()[:16]


def read_attrs(path: Path | str) -> dict[str, Any]:
    """The group attributes, without opening the arrays."""
    return _plain(dict(_group(path, "r").attrs))


def read_array_names(path: Path | str) -> list[str]:
    """The arrays a store holds (its derived and fitted ones vary)."""
    return list(_group(path, "r").array_keys())


def array_layout(path: Path | str) -> tuple[int, int, str, int]:
    """``(chunk_tiles, feature dim, fingerprint dtype, slots)`` of a store."""
    fp = _group(path, "r")["fingerprint"]
    return int(fp.chunks[0]), int(fp.shape[1]), str(fp.dtype), int(fp.shape[0])


def read_codes_encoder(ds) -> dict[str, np.ndarray]:
    """The arrays of a store's codes encoder (:data:`~pipeline.schema.CODE_VARS` it has), float32."""
    return {name: ds[name].values.astype(np.float32) for name in schema.CODE_VARS if name in ds}


def read_postprocess(ds) -> post.PostProcess:
    """The post-processing fitted into a store (``none`` if there is none)."""
    meta = ds.attrs.get("postprocess")
    if not meta:
        return post.PostProcess()
    if meta["method"] != "pca":
        return post.PostProcess(meta["method"])
    mean = ds["post_mean"].values.astype(np.float32)
    return post.PostProcess("pca", mean, ds["post_projection"].values.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Creating and growing


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


def _create(g, name: str, shape: tuple[int, ...], chunk_tiles: int = 0, **override: Any):
    """Array ``name`` of group ``g`` as the schema describes it (dims, dtype, chunks, fill)."""
    var = VAR[name]
    kw: dict[str, Any] = {"dtype": str if var.dtype == "str" else var.dtype, "dimension_names": var.dims}
    if var.chunks != "whole":
        kw["chunks"] = (schema.chunk_rows(var, chunk_tiles, shape[0]), *shape[1:])
    if var.fill is not None:
        kw["fill_value"] = np.datetime64(var.fill, "s") if var.dtype.startswith("datetime64") else var.fill
    return g.create_array(name, shape=shape, **{**kw, **override})


def create_store(
    path: Path | str, attrs: dict[str, Any], dim: int, dtype: str, chunk_tiles: int, compressor: str
) -> None:
    """An empty store: every variable of every store with zero tiles and zero images."""
    import zarr

    g = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes=attrs)
    sizes = {"tile": 0, "img": 0, "feature": dim, "affine": 6}
    for var in schema.VARIABLES:
        if var.role not in ("tile", "img"):
            continue
        extra = {"dtype": dtype, "compressors": fingerprint_compressors(compressor)} if var.name == "fingerprint" else {}
        _create(g, var.name, tuple(sizes[d] for d in var.dims), chunk_tiles, **extra)
    consolidate(path)


def empty_table() -> dict[str, np.ndarray]:
    """The image table of a store that does not exist yet."""
    out: dict[str, np.ndarray] = {}
    for name in schema.IMG_VARS:
        var = VAR[name]
        out[name] = np.zeros((0, 6) if len(var.dims) == 2 else 0, dtype=object if var.dtype == "str" else var.dtype)
    out["n_tiles"] = np.array(0)
    return out


def add_missing_image_vars(path: Path | str) -> list[str]:
    """Create the image-table variables a store of an older schema lacks, filled with their fill
    value (``acquired`` NaT, ``item_id`` empty) for every image; returns their names."""
    g = _group(path, "r+")
    n = g["image_path"].shape[0]
    added = []
    for name in schema.IMG_VARS:
        if name not in g:
            var = VAR[name]
            _create(g, name, (n, 6) if len(var.dims) == 2 else (n,))
            added.append(name)
    consolidate(path)
    return added


def grow(path: Path | str, n_tiles: int, n_images: int) -> None:
    """Resize the tile arrays (derived ones included) to ``n_tiles`` slots and the image table to
    ``n_images`` rows. New slots of a derived array hold its fill value until it is rebuilt."""
    g = _group(path, "r+")
    for name in (*schema.TILE_VARS, *(d for d in schema.DERIVED_TILE_VARS if d in g)):
        a = g[name]
        if a.shape[0] != n_tiles:
            a.resize((n_tiles, *a.shape[1:]))
    for name in schema.IMG_VARS:
        a = g[name]
        a.resize((n_images, *a.shape[1:]))
    consolidate(path)


# --------------------------------------------------------------------------------------------
# Writing


def write_tile_meta(path: Path | str, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write the per-tile metadata (:data:`~pipeline.schema.META_VARS`) of the slots ``[start,
    start + n)``. Only the ingest driver calls it, one batch at a time, so partial chunks are
    never raced."""
    g = _group(path, "r+")
    for name in schema.META_VARS:
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
            block = block.astype(object) if name in schema.IMG_STR_VARS else np.asarray(block)
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
        if any([schema.note_stale(attrs, name, why) for name in schema.DERIVED_TILE_VARS]):  # every one, no short cut
            set_attrs(path, postprocess=attrs["postprocess"])


def set_attrs(path: Path | str, **attrs: Any) -> None:
    _group(path, "r+").attrs.update(attrs)
    consolidate(path)


# --------------------------------------------------------------------------------------------
# Post-processing and derived arrays (aerial-search postprocess)


def _postprocess_meta(g) -> dict[str, Any]:
    return dict(g.attrs.get("postprocess") or {"method": "none", "dims": None})


def _replace(g, names: Iterable[str], record: str) -> dict[str, Any]:
    """Delete arrays ``names`` and their record ``postprocess.<record>`` first, so that an
    interrupted rebuild leaves them absent, never half-written; the record without it."""
    meta = _postprocess_meta(g)
    if meta.pop(record, None) is not None:
        g.attrs["postprocess"] = meta
    for name in names:
        if name in g:
            del g[name]
    return meta


def save_postprocess(path: str | Path, t: post.PostProcess, fitted_on: int) -> None:
    """Write a fitted post-processing into a store (arrays + attributes); the raw fingerprints
    stay. Derived arrays are dropped: they were made under the old post-processing."""
    g = _group(path, "r+")
    for name in (*schema.POST_VARS, *schema.DERIVED_TILE_VARS, *schema.CODE_VARS, *schema.KNN_VARS):
        if name in g:
            del g[name]
    if t.method == "pca":
        _create(g, "post_mean", t.mean.shape)[:] = t.mean
        _create(g, "post_projection", t.projection.shape)[:] = t.projection
    g.attrs["postprocess"] = {"method": t.method, "dims": t.dims, "fitted_on_tiles": int(fitted_on),
                              "created": schema.now()}  # fmt: skip
    consolidate(path)


def write_dba(path: str | Path, values: np.ndarray, depth: int, alpha: float, tiles: int) -> None:
    """Write ``fingerprint_dba`` (tile, post_feature), chunked like ``fingerprint``, and record
    how it was built (``postprocess.dba``), replacing an earlier one."""
    g = _group(path, "r+")
    if "fingerprint_dba" in g:
        del g["fingerprint_dba"]
    _create(g, "fingerprint_dba", values.shape, g["fingerprint"].chunks[0])[:] = values
    meta = _postprocess_meta(g)
    meta["dba"] = {"depth": depth, "alpha": alpha, "tiles": int(tiles)}
    if meta.get("codes") and meta["codes"].get("on") != "fingerprint_dba" and not meta["codes"].get("stale"):
        meta["codes"] = {**meta["codes"], "stale": "DBA was built after the codes, which encode the space search uses"}
    g.attrs["postprocess"] = meta
    consolidate(path)


def write_codes(path: str | Path, n_tiles: int, nbytes: int, encoder: dict[str, np.ndarray], info: dict,
                rows: Iterable[tuple[int, np.ndarray]]) -> None:  # fmt: skip
    """Write ``codes`` (tile, code_byte) uint8 of ``nbytes`` bytes per tile, chunked like
    ``fingerprint``, from ``rows`` (``(start, uint8 codes)``, one Zarr chunk each), its encoder
    (``encoder``: the arrays of :data:`~pipeline.schema.CODE_VARS` it has) and, last,
    ``postprocess.codes`` (``info`` + created), replacing earlier codes. Until that last write
    the store has no usable codes: an interrupted run leaves them absent, never half-written."""
    g = _group(path, "r+")
    meta = _replace(g, ("codes", *schema.CODE_VARS), "codes")
    arr = _create(g, "codes", (n_tiles, nbytes), g["fingerprint"].chunks[0])
    for start, block in rows:
        arr[start : start + len(block)] = block
    for name, values in encoder.items():
        _create(g, name, values.shape)[:] = values
    meta["codes"] = {**info, "created": schema.now()}
    g.attrs["postprocess"] = meta
    consolidate(path)


def write_knn(path: str | Path, n_tiles: int, k: int, info: dict,
              rows: Iterable[tuple[int, np.ndarray, np.ndarray]], cells: dict[str, np.ndarray] | None = None,
              cell: np.ndarray | None = None) -> None:  # fmt: skip
    """Write the k-NN graph ``knn_uid`` (tile, neighbour) uint64 and ``knn_sim`` float32 (NaN:
    no neighbour), chunked like ``fingerprint``, from ``rows`` (``(start, uids, sims)``), with
    its cells (``cells``: ``knn_mean``, ``knn_basis``, ``knn_centroids``; ``cell`` per tile), then
    ``postprocess.knn`` (``info`` + created) last, replacing an earlier graph: an interrupted
    build leaves no graph, never half of one."""
    g = _group(path, "r+")
    meta = _replace(g, ("knn_uid", "knn_sim", "knn_cell", *schema.KNN_VARS), "knn")
    z = g["fingerprint"].chunks[0]
    u, sim = _create(g, "knn_uid", (n_tiles, k), z), _create(g, "knn_sim", (n_tiles, k), z)
    for start, uids, sims in rows:
        u[start : start + len(uids)] = uids
        sim[start : start + len(sims)] = sims
    if cells is not None and cell is not None:
        for name, a in cells.items():
            _create(g, name, a.shape)[...] = a
        _create(g, "knn_cell", (n_tiles,), z)[...] = cell
    meta["knn"] = {**info, "created": schema.now()}
    g.attrs["postprocess"] = meta
    consolidate(path)


# --------------------------------------------------------------------------------------------
# Copies (aerial-search compact: :mod:`pipeline.upkeep` decides what to keep)


def create_like(src: Path | str, dst: Path | str, names: Sequence[str], n_tiles: int | None = None) -> None:
    """Empty arrays ``names`` in store ``dst`` shaped, chunked and typed like ``src``'s (tile
    arrays with ``n_tiles`` rows when given)."""
    s, d = _group(src, "r"), _group(dst, "r+")
    for name in names:
        a = s[name]
        shape = (n_tiles, *a.shape[1:]) if n_tiles is not None and VAR[name].dims[0] == "tile" else a.shape
        d.create_array(name, shape=shape, chunks=a.chunks, dtype=a.dtype, dimension_names=a.metadata.dimension_names)


def copy_whole(src: Path | str, dst: Path | str, names: Sequence[str]) -> None:
    """Copy arrays ``names`` (created by :func:`create_like`) whole."""
    s, d = _group(src, "r"), _group(dst, "r+")
    for name in names:
        d[name][...] = s[name][...]


def copy_slots(src: Path | str, dst: Path | str, names: Sequence[str], start: int, slots: np.ndarray) -> None:
    """Write rows ``slots`` of ``src``'s tile arrays ``names`` to rows ``[start, start + n)`` of
    ``dst``'s (one bounded block at a time: the caller sizes ``slots``)."""
    s, d = _group(src, "r"), _group(dst, "r+")
    for name in names:
        a = s[name]
        d[name][start : start + len(slots)] = a.get_orthogonal_selection((slots,) + (slice(None),) * (a.ndim - 1))
