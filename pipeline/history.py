"""The history of a place: ``aerial-search history --lonlat=LON,LAT`` (or ``--uid UID``, the
centre of that tile): the window over the place in every image that covers it, in order of
acquisition, each with how far its fingerprint moved since the previous flight and since the
first one.

**Windows** (:func:`windows_at`, from the image table alone): the place goes through each
distinct CRS once (pyproj) and each image's inverse affine (vectorized over images) into pixel
coordinates; an image covers it when it falls inside the image's cropped extent (the part cut
into windows). Of the (at most 2 x 2) grid windows that contain the place, the valid one whose
centre is nearest wins (ties: the lower slot). Images without a CRS have no place on the ground
and never cover one; images not done are left out, as in every search.

**Distances**: Euclidean, between the fingerprints as search ranks them (after the store's
post-processing, or its current DBA array), in float64. ``distance`` is to the previous window
in time (0 for the first), ``distance_to_first`` to the earliest one. Undated images come
last, in image order, and are compared like the others (the output marks them undated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import grid
from pipeline.dates import DateRange
from pipeline.errors import SearchError
from pipeline.search.results import Result


def windows_at(index: Any, lon: float, lat: float, image_ids: Sequence[int] | None = None) -> tuple[np.ndarray, ...]:
    """``(image, slot, row, col)`` int64 arrays: per image of ``image_ids`` (default: every
    searchable image) that covers ``(lon, lat)``, its valid window over the place (see the module
    docstring), in image order."""
    from pyproj import Transformer

    table, geom = index.image_table, index.geometry
    n = len(index.image_paths)
    ids = np.arange(n) if image_ids is None else np.asarray(sorted(set(int(i) for i in image_ids)), dtype=np.int64)
    if index.usable is not None:
        ids = ids[index.usable[ids]]
    crs = np.asarray([str(c) for c in geom["crs"]], dtype=object)
    t = np.asarray(geom["transform"], dtype=np.float64).reshape(-1, 6)
    px, py = np.full(n, np.nan), np.full(n, np.nan)
    for name in sorted(set(crs[ids].tolist()) - {""}):
        x, y = Transformer.from_crs("EPSG:4326", name, always_xy=True).transform(lon, lat)
        sel = ids[crs[ids] == name]
        a, b, c, d, e, f = (t[sel, k] for k in range(6))
        det = a * e - b * d
        with np.errstate(divide="ignore", invalid="ignore"):
            px[sel] = (e * (x - c) - b * (y - f)) / det
            py[sel] = (-d * (x - c) + a * (y - f)) / det
    width, height = np.asarray(table["width"], np.int64), np.asarray(table["height"], np.int64)
    chunk_px = int(index.provenance["layout"]["chunk_px"])
    with np.errstate(invalid="ignore"):  # NaN (no CRS): never inside
        inside = (px[ids] >= 0) & (py[ids] >= 0) & (px[ids] <= width[ids] // grid.TILE * grid.TILE) & (
            py[ids] <= height[ids] // grid.TILE * grid.TILE)  # fmt: skip
    cand_image, cand_row, cand_col, cand_dist = [], [], [], []
    s, tile = grid.STRIDE, grid.TILE
    for i in ids[inside]:
        x, y = px[i], py[i]
        ny, nx = grid.windows_per_axis(int(height[i])), grid.windows_per_axis(int(width[i]))
        for r in range(max(0, math.floor((y - tile) / s) + 1), min(ny - 1, math.floor(y / s)) + 1):
            for c in range(max(0, math.floor((x - tile) / s) + 1), min(nx - 1, math.floor(x / s)) + 1):
                cand_image.append(i)
                cand_row.append(r * s)
                cand_col.append(c * s)
                cand_dist.append((r * s + tile / 2 - y) ** 2 + (c * s + tile / 2 - x) ** 2)
    if not cand_image:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty
    image, row, col = (np.asarray(v, dtype=np.int64) for v in (cand_image, cand_row, cand_col))
    starts = np.asarray(table["tile_start"], dtype=np.int64)
    slot = starts[image] + grid.slots_in_images(row, col, height[image], width[image], chunk_px)
    (valid,) = index._compute(index.ds["valid"].data[slot])
    keep = np.asarray(valid, dtype=bool)
    image, slot, row, col, dist = image[keep], slot[keep], row[keep], col[keep], np.asarray(cand_dist)[keep]
    order = np.lexsort((slot, dist, image))
    first = order[np.r_[True, image[order][1:] != image[order][:-1]]] if len(order) else order
    return image[first], slot[first], row[first], col[first]


def place_of(index: Any, uid: Any) -> tuple[float, float]:
    """The centre of tile ``uid`` as ``(lon, lat)``; SearchError for a uid that is no tile or
    whose image has no CRS."""
    try:
        uid = int(uid)
    except (TypeError, ValueError):
        raise SearchError(f"uid {uid!r} is not a tile uid (a whole number)") from None
    slot = index.slot_of(uid)
    lon, lat = (float(v) for v in index._compute(index.ds["lon"].data[slot], index.ds["lat"].data[slot]))
    if not (np.isfinite(lon) and np.isfinite(lat)):
        image = int(grid.unpack_uid(np.uint64(uid))[0])
        raise SearchError(f"uid {uid} is in {index.image_paths[image]}, which has no CRS: it has no place on the "
                          f"ground to follow through time")  # fmt: skip
    return lon, lat


def history(index: Any, lon: float, lat: float, date: DateRange | None = None) -> Result:
    """The windows over ``(lon, lat)`` in every image covering it (acquired in ``date`` when
    given), oldest first, as a :class:`~pipeline.search.results.Result`: ``distance`` to the
    previous window in time, ``distance_to_first`` in ``extra``; ``query`` says the place."""
    ids, note = (None, None) if date is None else index.image_ids_acquired(date)
    image, slot, row, col = windows_at(index, lon, lat, ids)
    query: dict[str, Any] = {"type": "history", "lonlat": [lon, lat], "label": f"history of {lon},{lat}",
                             "images": int(len(image))}  # fmt: skip
    if note is not None:
        query["date"] = note
    if not len(image):
        raise SearchError(f"no searchable image covers lon {lon}, lat {lat}" + (f" in {date.text}" if date else "")
                          + "; `aerial-search info --images` lists the images and where they are")  # fmt: skip
    when = index.acquired[image]
    undated = np.isnat(when)
    order = np.lexsort((image, np.where(undated, 0, when.astype(np.int64)), undated))
    image, slot, row, col, when = image[order], slot[order], row[order], col[order], when[order]
    dba = index.uses_dba
    ds = index.ds
    x, uid, tlon, tlat = index._compute(ds["fingerprint_dba" if dba else "fingerprint"].data[slot], ds["uid"].data[slot],
                                        ds["lon"].data[slot], ds["lat"].data[slot])  # fmt: skip
    x = np.asarray(x, dtype=np.float32)
    post = index.postprocess
    if not dba and post.method != "none":
        x = post.apply(x)
    x = np.asarray(x, dtype=np.float64)
    step = np.r_[0.0, np.linalg.norm(np.diff(x, axis=0), axis=1)]
    from_first = np.linalg.norm(x - x[0], axis=1)
    geom = index.geometry
    return Result(
        query=query, uid=np.asarray(uid, dtype=np.uint64), value=step, image_path=[str(index.image_paths[i]) for i in image],
        row=row, col=col, lon=np.asarray(tlon, dtype=np.float64), lat=np.asarray(tlat, dtype=np.float64),
        transform=np.asarray(geom["transform"])[image].reshape(-1, 6), crs=[str(geom["crs"][i]) for i in image],
        extra={"distance_to_first": from_first}, acquired=when,
    )  # fmt: skip


def history_sheet(res: Result, prov: dict[str, Any], out: str | Path, columns: int = 6) -> Path:
    """The windows of a history side by side, oldest first, each labelled with its date and its
    distance to the previous one (PNG)."""
    from pipeline.render import read_tile, sheet

    pre = prov.get("preprocessing", {})
    bands, scale = pre.get("bands", (1, 2, 3)), pre.get("scale")
    recs = res.records()
    tiles = [read_tile(r["image_path"], r["row"], r["col"], bands, scale) for r in recs]
    labels = [f"{(r['acquired'] or 'no date')[:10]}  d {r['distance']:.3f}  {Path(r['image_path']).name}"[:40] for r in recs]
    out = Path(out)
    sheet(tiles, labels, columns, highlight_first=False).save(out)
    return out
