"""The store's schema: ONE table of variables (:data:`VARIABLES`: name, dims, dtype, chunks,
fill, meaning) that drives creating and growing a store (:mod:`pipeline.store`) and the
README's schema section (:func:`markdown`, compared by tests/test_schema.py), the group
attributes a store records, and the bookkeeping of its derived arrays. No Zarr here: the store
module reads and writes, this module says what there is.

Slots: images in image-id order (sorted paths), each image's grid chunks row-major, each chunk's
windows row-major. Every window of the paper's grid has a slot, kept or not, so a window's slot
follows from the headers alone (:func:`pipeline.grid.slot_in_image`); batches start on a Zarr
chunk boundary (the slots between them are padding: ``valid`` False, ``image`` -1).

Run ``python -m pipeline.schema`` to print the README section.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pipeline import codes, grid
from pipeline.backbones import BACKBONES, MEAN, STD
from pipeline.version import __version__

# 2: status "removed", consolidated metadata; 3: `acquired` and `item_id` per image (older -> 3:
# `aerial-search migrate`)
SCHEMA_VERSION = 3
STATUSES = ("pending", "done", "empty", "failed", "replaced", "removed")
META_CHUNK_FACTOR = 16  # the small per-tile arrays: chunks of 16 x chunk_tiles (one ~1 MB read serves 16 chunks)
IMG_CHUNK = 4096  # image-table rows per chunk
NAN = float("nan")
NAT = "NaT"  # the fill of datetime variables (Zarr stores NumPy's NaT)


@dataclass(frozen=True)
class Variable:
    """One array of the store.

    ``chunks`` along the first dimension: ``tile`` (``store.chunk_tiles`` rows, the unit one
    ingest task writes and one search task scans), ``meta`` (:data:`META_CHUNK_FACTOR` times
    that), ``img`` (:data:`IMG_CHUNK` rows) or ``whole`` (one chunk); other dimensions are never
    split. ``fill``: the fill value (None: Zarr's default for the dtype). ``role``: ``tile`` and
    ``img`` variables exist in every store; ``fit`` (fitted parameters) and ``derived`` (per-tile
    arrays computed from the fingerprints, rebuilt by ``postprocess``, recorded under
    ``postprocess.<record>``) only once ``postprocess`` made them."""

    name: str
    dims: tuple[str, ...]
    dtype: str  # NumPy dtype name; "str": variable-length strings
    chunks: str
    fill: Any
    role: str
    meaning: str
    record: str = ""  # derived: its entry in attrs["postprocess"]


VARIABLES: tuple[Variable, ...] = (
    Variable("fingerprint", ("tile", "feature"), "float32", "tile", None, "tile",
             "raw model output (float16 with `--dtype float16`); zeros where `valid` is False"),
    Variable("valid", ("tile",), "bool", "tile", False, "tile",
             "False for windows with > 50 % nodata and for padding slots; every reader masks with it"),
    Variable("uid", ("tile",), "uint64", "meta", 0, "tile", "`image_id * 2**40 + (row // 128) * 2**20 + (col // 128)`"),
    Variable("image", ("tile",), "int32", "meta", -1, "tile", "image id (row of the image table); -1 in padding slots"),
    Variable("row", ("tile",), "int32", "meta", 0, "tile", "pixel row of the window's top-left corner"),
    Variable("col", ("tile",), "int32", "meta", 0, "tile", "pixel column of the window's top-left corner"),
    Variable("x", ("tile",), "float64", "meta", NAN, "tile",
             "window centre in the image CRS: the affine applied to (col + 128, row + 128)"),
    Variable("y", ("tile",), "float64", "meta", NAN, "tile", "the same, y"),
    Variable("lon", ("tile",), "float64", "meta", NAN, "tile", "window centre in WGS84; NaN without a CRS"),
    Variable("lat", ("tile",), "float64", "meta", NAN, "tile", "the same, latitude"),
    Variable("image_path", ("img",), "str", "img", None, "img",
             "absolute path (or URI) as given; image ids follow sorted path order"),
    Variable("crs", ("img",), "str", "img", None, "img", '`""` without a CRS'),
    Variable("status", ("img",), "str", "img", None, "img",
             "`pending`, `done`, `empty` (too small for a window), `failed` (see `error`), `replaced` (a newer "
             "version was ingested), `removed` (`aerial-search remove`); searches use `done` images only"),
    Variable("error", ("img",), "str", "img", None, "img", "why a failed image failed"),
    Variable("sha256", ("img",), "str", "img", None, "img", 'content hash (`ingest --hash`), `""` when not computed'),
    Variable("width", ("img",), "int64", "img", 0, "img", "pixels"),
    Variable("height", ("img",), "int64", "img", 0, "img", "pixels"),
    Variable("size", ("img",), "int64", "img", 0, "img", "bytes on disk"),
    Variable("tile_start", ("img",), "int64", "img", 0, "img", "first slot of the image's contiguous range on `tile`"),
    Variable("tile_count", ("img",), "int64", "img", 0, "img", "slots of the image (every window of its grid)"),
    Variable("mtime", ("img",), "float64", "img", NAN, "img", "modification time, seconds since the epoch"),
    Variable("transform", ("img", "affine"), "float64", "img", 0.0, "img", "the image's affine: a, b, c, d, e, f"),
    Variable("acquired", ("img",), "datetime64[s]", "img", NAT, "img",
             "acquisition time, UTC; NaT when unknown. From, in order: the STAC item's datetime, `ingest --dates "
             "FILE`, `--date-pattern REGEX` over the file name (else the path), EXIF `DateTimeOriginal` (drone "
             "frames), else the TIFF `DateTime` tag"),
    Variable("item_id", ("img",), "str", "img", None, "img", 'the STAC item the image came from; `""` otherwise'),
    Variable("post_mean", ("feature",), "float32", "whole", None, "fit",
             "PCA post-processing (`postprocess --method pca`): centre of the fitting set"),
    Variable("post_projection", ("feature", "post_feature"), "float32", "whole", None, "fit",
             "PCA post-processing: projection with whitening"),
    Variable("codes_mean", ("post_feature",), "float32", "whole", None, "fit",
             "binary codes' encoder: centre of the fitting set"),
    Variable("codes_projection", ("post_feature", "code_bit"), "float32", "whole", None, "fit",
             "binary codes' encoder: PCA + ITQ rotation; bit i = sign of `(x - codes_mean) . codes_projection[:, i]`"),
    Variable("codes_centroids", ("code_byte", "centroid", "sub_feature"), "float32", "whole", None, "fit",
             "PQ codes' encoder: 256 k-means centroids per subspace"),
    Variable("fingerprint_dba", ("tile", "post_feature"), "float32", "tile", None, "derived",
             "database-side augmented fingerprints (`postprocess --dba`)", "dba"),
    Variable("codes", ("tile", "code_byte"), "uint8", "tile", None, "derived",
             "binary codes (`postprocess --codes binary`; bits little-endian in each byte) or PQ codes "
             "(`--codes pq`: byte s = the nearest of `codes_centroids[s]`); `postprocess.codes.kind` says which",
             "codes"),
    Variable("knn_uid", ("tile", "neighbour"), "uint64", "tile", None, "derived",
             "the k-NN graph (`postprocess --knn K`): each valid tile's K nearest tiles", "knn"),
    Variable("knn_sim", ("tile", "neighbour"), "float32", "tile", NAN, "derived",
             "their cosine similarity (NaN: no neighbour)", "knn"),
    Variable("knn_cell", ("tile",), "int32", "tile", -1, "derived",
             "the k-NN graph's cell of each tile (-1: none): what growing the graph probes", "knn"),
    Variable("knn_mean", ("post_feature",), "float32", "whole", None, "fit",
             "the k-NN graph's reduced space (`pipeline.knn`): centre of the fitting sample"),
    Variable("knn_basis", ("post_feature", "knn_dim"), "float32", "whole", None, "fit",
             "the reduced space's principal axes"),
    Variable("knn_centroids", ("knn_cell_id", "knn_dim"), "float32", "whole", None, "fit",
             "k-means centroids of the cells in the reduced space"),
)  # fmt: skip

VAR = {v.name: v for v in VARIABLES}
TILE_VARS = tuple(v.name for v in VARIABLES if v.role == "tile")
META_VARS = tuple(v.name for v in VARIABLES if v.role == "tile" and v.chunks == "meta")  # follow from headers alone
IMG_VARS = tuple(v.name for v in VARIABLES if v.role == "img")
IMG_STR_VARS = tuple(v.name for v in VARIABLES if v.role == "img" and v.dtype == "str")
DERIVED_TILE_VARS = tuple(v.name for v in VARIABLES if v.role == "derived")
CODE_VARS = tuple(v.name for v in VARIABLES if v.role == "fit" and v.name.startswith("codes_"))  # the codes' encoder
POST_VARS = tuple(v.name for v in VARIABLES if v.role == "fit" and v.name.startswith("post_"))  # a fitted PCA
KNN_VARS = tuple(v.name for v in VARIABLES if v.role == "fit" and v.name.startswith("knn_"))  # the graph's cells


def chunk_rows(var: Variable, chunk_tiles: int, n: int) -> int:
    """Rows per chunk of ``var`` along its first dimension in a store of ``chunk_tiles``."""
    return {"tile": chunk_tiles, "meta": chunk_tiles * META_CHUNK_FACTOR, "img": IMG_CHUNK}.get(var.chunks, n)


# --------------------------------------------------------------------------------------------
# Group attributes

ATTRIBUTES = (
    ("schema_version", f"{SCHEMA_VERSION} (an older store is refused with the command that upgrades it)"),
    ("software", "`aerial-search VERSION` that created the store"),
    ("created", "ISO 8601 UTC"),
    ("model", "arch, dim, head, weights_id, weights_sha256, pretrained, mode (exact / dense), context_px"),
    ("preprocessing", "tile, stride, crop, mean, std, input_scale, bands, scale, black_level, max_nodata_fraction"),
    ("fingerprint_dtype", "float32 or float16"),
    ("uid", "the uid formula"),
    ("layout", "chunk_tiles, chunk_px"),
    ("config", "every setting of the ingest that made the store"),
    ("last_ingest", "finished, failed files; `last_upkeep`, `compacted`, `migrated` likewise for upkeep"),
    ("postprocess", "method, dims, fitted_on_tiles, created; `dba`, `codes`, `knn`: how each derived array was "
                    "built, and `stale`, why it no longer covers the store, once images are added or removed"),
)  # fmt: skip


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def schema_attrs(cfg: Any, arch: str, dim: int, weights: dict[str, Any]) -> dict[str, Any]:
    """Group attributes that say how every fingerprint in a new store is made.

    ``cfg``: the :class:`~pipeline.config.Config` of the ingest; ``weights``: what
    :func:`pipeline.embed.describe_weights` returns.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "software": f"aerial-search {__version__}",
        "created": now(),
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
            "mean": list(BACKBONES[arch].mean if arch in BACKBONES else MEAN),
            "std": list(BACKBONES[arch].std if arch in BACKBONES else STD),
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


# --------------------------------------------------------------------------------------------
# Derived arrays: current or stale


def derived_meta(attrs: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``postprocess`` record of derived array ``name`` (empty without one)."""
    meta = attrs.get("postprocess") or {}
    return meta.get(VAR[name].record) or {}


def has_derived(ds, name: str) -> bool:
    """Whether an open store has derived array ``name`` or a record of it."""
    return name in ds or bool(derived_meta(ds.attrs, name))


def note_stale(attrs: dict[str, Any], name: str, why: str) -> bool:
    """Mark derived array ``name`` stale in ``attrs`` (a mutable copy of the group attributes);
    True when this changed anything."""
    meta = derived_meta(attrs, name)
    if meta and not meta.get("stale"):
        meta["stale"] = why
        return True
    return False


def stale_reason(ds, name: str) -> str:
    """Why derived array ``name`` of an open store no longer covers it, with the command that
    rebuilds it; ``""`` when it is current (or absent)."""
    meta = derived_meta(ds.attrs, name)
    if not meta.get("stale"):
        return ""
    post_meta = ds.attrs.get("postprocess") or {}
    if name in ("knn_uid", "knn_sim", "knn_cell"):
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
# The README's schema section

README_BEGIN = "<!-- schema: generated by `python -m pipeline.schema` from pipeline/schema.py; tests compare -->"
README_END = "<!-- /schema -->"


def markdown() -> str:
    """The README's table of variables and list of group attributes (between its markers)."""

    def dtype(v: Variable) -> str:
        return "float32 / float16" if v.name == "fingerprint" else v.dtype

    def chunks(v: Variable) -> str:
        return {"tile": "chunk_tiles", "meta": f"{META_CHUNK_FACTOR} x chunk_tiles", "img": str(IMG_CHUNK)}.get(
            v.chunks, "one"
        )

    def fill(v: Variable) -> str:
        return "" if v.fill is None else "NaN" if v.fill != v.fill else str(v.fill)  # NAT is its own string

    lines = [
        "| variable | dims | dtype | chunks | fill | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for role, title in (("tile", ""), ("img", ""), ("fit", " (postprocess)"), ("derived", " (postprocess)")):
        for v in (v for v in VARIABLES if v.role == role):
            extra = f" Stale once images change: `postprocess.{v.record}.stale`." if v.record else ""
            lines.append(f"| `{v.name}`{title} | {', '.join(v.dims)} | {dtype(v)} | {chunks(v)} | {fill(v)} | "
                         f"{v.meaning}{extra} |")  # fmt: skip
    lines += ["", f"Group attributes (schema version {SCHEMA_VERSION}):", ""]
    lines += [f"- `{name}`: {meaning}" for name, meaning in ATTRIBUTES]
    return "\n".join([README_BEGIN, *lines, README_END])


if __name__ == "__main__":
    print(markdown())
