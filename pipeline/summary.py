"""A store's summary: counts, sizes, provenance and the state of its derived arrays, as
``aerial-search info`` prints it and ``GET /api/info`` returns it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import grid, locations, schema, store
from pipeline.cluster import local_scheduler
from pipeline.dates import iso, year_counts
from pipeline.search.device import bytes_per_tile


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts, sizes and provenance of a store (what ``aerial-search info`` prints)."""
    with local_scheduler():  # the reads below, without distributed's import
        return _summarize(path, store.open_store(path))


def _summarize(path: str | os.PathLike[str], ds) -> dict[str, Any]:
    status = ds["status"].values.astype(object)
    done = status == "done"
    image = ds["image"].values
    valid = ds["valid"].values & (image >= 0) & done[np.clip(image, 0, None)] if len(status) else ds["valid"].values
    prov = store.provenance(ds)
    return {
        "store": str(path) if locations.is_remote(path) else str(Path(path).resolve()),
        "images": int(ds.sizes["img"]),
        "images_by_status": {s: int((status == s).sum()) for s in sorted(set(status))},
        "tiles": int(valid.sum()),
        "slots": int(ds.sizes["tile"]),
        "dropped": int((~ds["valid"].values & (image >= 0)).sum()),
        "feature_dim": int(ds.sizes["feature"]),
        "fingerprint_dtype": str(ds["fingerprint"].dtype),
        "chunk_tiles": int(ds["fingerprint"].encoding.get("chunks", (ds.sizes["tile"],))[0]),
        "bytes_on_disk": int(locations.store_bytes(path)),
        "model": prov.get("model", {}),
        "preprocessing": prov.get("preprocessing", {}),
        "created": prov.get("created"),
        "postprocess": prov.get("postprocess"),
        "derived": {name: schema.stale_reason(ds, name) or "current" for name in schema.DERIVED_TILE_VARS if schema.has_derived(ds, name)},
        "software": prov.get("software"),
        "lonlat_bounds": _bounds(ds, valid),
        "acquired": _acquired(ds, done),
        "index_device_bytes": device_bytes(ds, prov),
        "failed": [
            [str(p), str(e)] for p, e, st in zip(ds["image_path"].values, ds["error"].values, status) if st == "failed"
        ],
    }


def images(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per image of a store (``aerial-search info --images``): ``id``, ``path``,
    ``status``, ``tiles`` (valid windows), ``acquired``, ``width``, ``height``, and the valid
    tile nearest the image's centre as a query to start from: ``uid``, ``lon``, ``lat`` (None
    where the image has no valid tile; lon/lat None without a CRS)."""
    with local_scheduler():
        ds = store.open_store(path)
        image = ds["image"].values.astype(np.int64)
        valid = ds["valid"].values.astype(bool) & (image >= 0)
        row, col = ds["row"].values.astype(np.float64), ds["col"].values.astype(np.float64)
        n = int(ds.sizes["img"])
        width, height = ds["width"].values.astype(np.int64), ds["height"].values.astype(np.int64)
        uid, lon, lat = ds["uid"].values, ds["lon"].values, ds["lat"].values  # each .values is a read: once
        # the valid tile whose window centre is nearest the cropped image's centre, per image
        at = np.flatnonzero(valid)
        img = image[at]
        cy, cx = (height // grid.TILE * grid.TILE / 2)[img], (width // grid.TILE * grid.TILE / 2)[img]
        d = (row[at] + grid.TILE / 2 - cy) ** 2 + (col[at] + grid.TILE / 2 - cx) ** 2
        order = np.lexsort((uid[at], d, img))
        first = order[np.r_[True, img[order][1:] != img[order][:-1]]] if len(order) else order
        centre = dict(zip(img[first].tolist(), at[first].tolist()))
        counts = np.bincount(img, minlength=n)
        out = []
        for i, (p, st, a) in enumerate(zip(ds["image_path"].values, ds["status"].values, ds["acquired"].values)):
            t = centre.get(i)
            ok = t is not None and np.isfinite(lon[t]) and np.isfinite(lat[t])
            out.append({
                "id": i, "path": str(p), "status": str(st), "tiles": int(counts[i]),
                "acquired": iso(np.datetime64(a, "s")), "width": int(width[i]), "height": int(height[i]),
                "uid": None if t is None else str(int(uid[t])),
                "lon": round(float(lon[t]), 7) if ok else None, "lat": round(float(lat[t]), 7) if ok else None,
            })  # fmt: skip
        return out


def _acquired(ds, done: np.ndarray) -> dict[str, Any]:
    """The acquisition times of the searchable (done) images: first, last, images per year."""
    a = ds["acquired"].values.astype("datetime64[s]")[done]
    dated = a[~np.isnat(a)]
    return {
        "from": iso(dated.min()) if len(dated) else None,
        "to": iso(dated.max()) if len(dated) else None,
        "per_year": year_counts(a),
    }


def _bounds(ds, valid: np.ndarray) -> list[float] | None:
    lon = ds["lon"].values[valid]
    lat = ds["lat"].values[valid]
    ok = np.isfinite(lon) & np.isfinite(lat)
    if not ok.any():
        return None
    return [float(lon[ok].min()), float(lat[ok].min()), float(lon[ok].max()), float(lat[ok].max())]


def device_bytes(ds, prov: dict[str, Any]) -> dict[str, int]:
    """Device bytes a persisted index of this store needs (``search --index-device``,
    :func:`pipeline.search.device.bytes_per_tile`): its search space (post-processed, or the
    current DBA array) held as float32 or float16, with norms and per-tile metadata; with
    the codes beside it when the store has them; and the k-NN graph (uint64 uids and float32
    similarities) when built. Every slot is held, padding included."""
    post = prov.get("postprocess") or {}
    dims = int(ds.sizes["feature"])
    if "fingerprint_dba" in ds and not schema.stale_reason(ds, "fingerprint_dba"):
        dims = int(ds["fingerprint_dba"].shape[1])
    elif post.get("method") == "pca" and post.get("dims"):
        dims = int(post["dims"])
    n = int(ds.sizes["tile"])
    out = {"tiles": n, "dims": dims, "float32": n * bytes_per_tile(dims, "float32"),
           "float16": n * bytes_per_tile(dims, "float16")}  # fmt: skip
    codes = post.get("codes") or {}
    if "codes" in ds and codes:
        code_bytes, pq = int(codes.get("bits", 0)) // 8, codes.get("kind") == "pq"
        out["float32_with_codes"] = n * bytes_per_tile(dims, "float32", code_bytes, pq)
        out["float16_with_codes"] = n * bytes_per_tile(dims, "float16", code_bytes, pq)
    knn = post.get("knn") or {}
    if "knn_uid" in ds and knn:
        out["knn_graph"] = n * int(knn.get("k", 0)) * (8 + 4)
    return out
