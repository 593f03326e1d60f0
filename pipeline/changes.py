"""What changed between flights: ``aerial-search changes --before FROM/TO --after FROM/TO``.

**Pairing** (:func:`pair_windows`: planned on the driver from the image table, run as dask
tasks over groups of after images that read only per-tile metadata): every valid window of an
"after" image (done, acquired in the after range, centre in ``bbox`` when given) is paired with
the "before" window over the same ground. Its four corners
go through its image's affine and CRS into each before image's pixel grid (pyproj where the
CRSs differ); the overlap with each candidate before window (the grid windows at multiples of
128 px that its footprint touches) is the area of their intersection, exact for any rotation or
reprojection of the quadrilateral (shapely; a product of two intervals where it stays
axis-aligned, the usual north-up case). A pair needs an overlap of at least 50 % of the smaller
window; the best-overlapping valid before window wins (ties: the later before image, then the
lower uid). Images without a CRS cannot be placed on the ground: they are left out, with a
warning. The result holds the pairs only (:class:`Pairing`), never an array per slot of the
store.

**Ranking**: the partner slots go into the search graph (:func:`pipeline.search.graph.pair_blocks`:
each block that holds after windows gathers its partners' rows), and a
:class:`~pipeline.search.scorers.PairScorer` feeds the same per-chunk top-k and threshold map
and tree reduction as every search: pairs ranked by the Euclidean distance between their
fingerprints after the store's post-processing (DBA where current), the largest first.
``changes`` runs on the NumPy engine (the pair scorer has no device kernel).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import grid
from pipeline.dates import DateRange, iso
from pipeline.errors import SearchError
from pipeline.search import graph
from pipeline.search.kernels import Exclusions, Filters, pair_distances
from pipeline.search.results import Result
from pipeline.search.scorers import PairScorer

MIN_OVERLAP = 0.5  # of the smaller window's area
_AREA = float(grid.TILE * grid.TILE)


# --------------------------------------------------------------------------------------------
# Pairing


@dataclass
class Pairing:
    """The pairs, as many entries as paired after windows (never one per slot of the store):
    ``slots`` (ascending) the after windows' slots, ``partner`` their before windows' slots,
    ``overlap`` the fraction of the smaller window they share; and what the pairing saw."""

    slots: np.ndarray
    partner: np.ndarray
    overlap: np.ndarray
    after_ids: tuple[int, ...]
    before_ids: tuple[int, ...]
    without_crs: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return len(self.slots)

    def partner_of(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(partner slot, overlap)`` of each of ``slots`` (-1 and 0 where it has none)."""
        slots = np.asarray(slots, dtype=np.int64)
        if not len(self.slots):
            return np.full(len(slots), -1, np.int64), np.zeros(len(slots))
        at = np.minimum(np.searchsorted(self.slots, slots), len(self.slots) - 1)
        hit = self.slots[at] == slots
        return np.where(hit, self.partner[at], -1), np.where(hit, self.overlap[at], 0.0)


def _corners(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 4)`` pixel x and y of the windows' corners, clockwise from the top-left."""
    t = grid.TILE
    x = cols[:, None] + np.array([0, t, t, 0], dtype=np.float64)
    y = rows[:, None] + np.array([0, 0, t, t], dtype=np.float64)
    return x, y


def _to_pixels(x: np.ndarray, y: np.ndarray, t_from: Sequence[float], crs_from: str, t_to: Sequence[float],
               crs_to: str) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Pixel coordinates of one image into another's pixel grid, through both CRSs."""
    from affine import Affine

    a = Affine(*t_from)
    gx = a.a * x + a.b * y + a.c
    gy = a.d * x + a.e * y + a.f
    if crs_from != crs_to:
        from pyproj import Transformer

        gx, gy = Transformer.from_crs(crs_from, crs_to, always_xy=True).transform(gx, gy)
        gx, gy = np.asarray(gx), np.asarray(gy)
    inv = ~Affine(*t_to)
    return inv.a * gx + inv.b * gy + inv.c, inv.d * gx + inv.e * gy + inv.f


def _footprint_lonlat(transform: Sequence[float], crs: str, width: int, height: int) -> tuple[float, ...]:
    from pipeline.geo import to_lonlat

    c, r = grid.cropped_size(width), grid.cropped_size(height)
    x, y = _corners(np.array([0.0]), np.array([0.0]))
    x, y = (x * (c / grid.TILE)).ravel(), (y * (r / grid.TILE)).ravel()
    a = [float(v) for v in transform]
    lon, lat = to_lonlat(a[0] * x + a[1] * y + a[2], a[3] * x + a[4] * y + a[5], crs)
    return float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())


def _overlap(qx: np.ndarray, qy: np.ndarray, c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Area of each quadrilateral (``(n, 4)`` corners) inside the window at column ``c``, row ``r``."""
    t = grid.TILE
    aligned = (np.abs(qx[:, 0] - qx[:, 3]) < 1e-6) & (np.abs(qx[:, 1] - qx[:, 2]) < 1e-6) & (
        np.abs(qy[:, 0] - qy[:, 1]) < 1e-6) & (np.abs(qy[:, 2] - qy[:, 3]) < 1e-6)  # fmt: skip
    out = np.empty(len(qx))
    lo_x, hi_x = qx.min(1), qx.max(1)
    lo_y, hi_y = qy.min(1), qy.max(1)
    wx = np.clip(np.minimum(hi_x, c + t) - np.maximum(lo_x, c), 0, None)
    wy = np.clip(np.minimum(hi_y, r + t) - np.maximum(lo_y, r), 0, None)
    out[aligned] = (wx * wy)[aligned]
    bent = np.flatnonzero(~aligned)
    if len(bent):
        import shapely

        quads = shapely.polygons(np.stack([qx[bent], qy[bent]], axis=-1))
        boxes = shapely.box(c[bent], r[bent], c[bent] + t, r[bent] + t)
        out[bent] = shapely.area(shapely.intersection(quads, boxes))
    return out


def _quad_area(qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Shoelace area of each quadrilateral."""
    return 0.5 * np.abs((qx * np.roll(qy, -1, 1) - np.roll(qx, -1, 1) * qy).sum(1))


GROUP_TILES = 1 << 16  # after windows per pairing task (about 1 MB of metadata read)
GROUP_IMAGES = 64  # after images per pairing task at most


def pair_windows(index: Any, after_ids: Sequence[int], before_ids: Sequence[int],
                 bbox: tuple[float, float, float, float] | None = None, whole_images: bool = False) -> Pairing:  # fmt: skip
    """Partner slots of the valid windows of images ``after_ids`` among those of ``before_ids``
    (see the module docstring).

    Planned on the driver from the image table alone: footprints, an STRtree of the before
    images, and (with ``bbox``) only the after images whose footprint meets it. The pairing
    itself is a dask graph of tasks over groups of after images (:data:`GROUP_TILES` windows,
    :data:`GROUP_IMAGES` images), each reading its images' per-tile metadata (row, col, valid;
    lon/lat with ``bbox``) and its before neighbours' validity: it runs on the cluster's workers,
    and the driver keeps only the pairs. ``whole_images``: every window of the after images that
    meet ``bbox``, not only those centred inside it (``--score robust`` takes each image pair's
    statistics from all its windows)."""
    import dask

    ds = index.ds
    table = index.image_table
    geom = index.geometry
    paths = index.image_paths
    chunk_px = int(index.provenance["layout"]["chunk_px"])
    crs = [str(c) for c in geom["crs"]]
    without = sorted({str(paths[i]) for i in (*after_ids, *before_ids) if not crs[i]})
    if without:
        warnings.warn(f"{len(without)} image(s) without a CRS cannot be paired with another flight and are left out "
                      f"(e.g. {without[0]})", stacklevel=3)  # fmt: skip
    after = [int(i) for i in after_ids if crs[int(i)]]
    before = [int(i) for i in before_ids if crs[int(i)]]
    width, height = table["width"], table["height"]
    feet = {i: _footprint_lonlat(geom["transform"][i], crs[i], int(width[i]), int(height[i])) for i in {*after, *before}}
    import shapely

    if bbox is not None:  # the after images in view: a map page's "changes in this view" reads no others
        view = shapely.box(*bbox)
        after = [a for a in after if shapely.intersects(shapely.box(*feet[a]), view)]
    tree = shapely.STRtree([shapely.box(*feet[b]) for b in before])
    near = {a: [b for b in (before[j] for j in sorted(tree.query(shapely.box(*feet[a])))) if b != a] for a in after}
    counts = ds["tile_count"].values  # once: each .values of a lazy variable is a read
    starts = np.asarray(table["tile_start"], dtype=np.int64)
    acquired = index.acquired

    def meta(i: int) -> dict[str, Any]:
        return {"transform": tuple(float(v) for v in geom["transform"][i]), "crs": crs[i], "width": int(width[i]),
                "height": int(height[i]), "start": int(starts[i]), "acquired": acquired[i]}  # fmt: skip

    def read(name: str, i: int) -> Any:
        return ds[name].data[int(starts[i]) : int(starts[i]) + int(counts[i])]

    groups: list[list[int]] = [[]]
    size = 0
    for a in (a for a in after if near[a]):
        if groups[-1] and (size + int(counts[a]) > GROUP_TILES or len(groups[-1]) >= GROUP_IMAGES):
            groups.append([])
            size = 0
        groups[-1].append(a)
        size += int(counts[a])
    task = dask.delayed(_pair_group, pure=True)
    window_box = None if whole_images else bbox
    names = ("row", "col", "valid", "lon", "lat") if window_box is not None else ("row", "col", "valid")
    tasks = []
    for g in groups:
        if not g:
            continue
        bs = sorted({b for a in g for b in near[a]})
        tasks.append(task(
            {a: meta(a) for a in g}, {a: near[a] for a in g}, {b: meta(b) for b in bs},
            {a: [read(n, a) for n in names] for a in g}, {b: read("valid", b) for b in bs}, window_box, chunk_px,
        ))  # fmt: skip
    parts = index._compute(*tasks) if tasks else []
    slots = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(slots, kind="stable")
    cat = (lambda k, dt: np.concatenate([p[k] for p in parts])[order] if parts else np.zeros(0, dt))  # noqa: E731
    return Pairing(slots[order], cat(1, np.int64), cat(2, np.float64), tuple(after), tuple(before), without)


def _pair_group(after: dict[int, dict], near: dict[int, list[int]], before: dict[int, dict],
                arrays: dict[int, list[np.ndarray]], before_valid: dict[int, np.ndarray],
                bbox: tuple[float, float, float, float] | None, chunk_px: int) -> tuple[np.ndarray, ...]:  # fmt: skip
    """One pairing task: ``(slots, partner, overlap)`` of the paired windows of the after images
    ``after`` (their metadata, and per image its windows' ``row``, ``col``, ``valid`` [, ``lon``,
    ``lat``] in ``arrays``) among their ``near`` before images (``before``: metadata,
    ``before_valid``: validity per slot)."""
    out_slots, out_partner, out_overlap = [], [], []
    s = grid.STRIDE
    for a, ma in after.items():
        rows, cols, valid, *lonlat = (np.asarray(v) for v in arrays[a])
        keep = valid.astype(bool)
        if bbox is not None:
            lon, lat = lonlat
            with np.errstate(invalid="ignore"):
                keep &= (lon >= bbox[0]) & (lon <= bbox[2]) & (lat >= bbox[1]) & (lat <= bbox[3])
        idx = np.flatnonzero(keep)
        if not len(idx):
            continue
        ax, ay = _corners(rows[idx].astype(np.float64), cols[idx].astype(np.float64))
        best = np.zeros(len(idx))
        best_slot = np.full(len(idx), -1, dtype=np.int64)
        best_when = np.full(len(idx), np.datetime64("NaT", "s"))
        for b in near[a]:
            mb = before[b]
            qx, qy = _to_pixels(ax, ay, ma["transform"], ma["crs"], mb["transform"], mb["crs"])
            qx, qy = qx.reshape(ax.shape), qy.reshape(ay.shape)
            area = np.minimum(_quad_area(qx, qy), _AREA)
            ny, nx = grid.windows_per_axis(mb["height"]), grid.windows_per_axis(mb["width"])
            if not (ny and nx):
                continue
            j0 = np.floor((qx.min(1) - grid.TILE) / s).astype(np.int64) + 1
            j1 = np.floor(qx.max(1) / s).astype(np.int64)
            i0 = np.floor((qy.min(1) - grid.TILE) / s).astype(np.int64) + 1
            i1 = np.floor(qy.max(1) / s).astype(np.int64)
            span_i, span_j = int(max(0, (i1 - i0).max() + 1)), int(max(0, (j1 - j0).max() + 1))
            if not (span_i and span_j):
                continue
            # every (after window, candidate before window) at once: the grid windows its footprint touches
            w = np.repeat(np.arange(len(idx)), span_i * span_j)
            i = i0[w] + np.tile(np.repeat(np.arange(span_i), span_j), len(idx))
            j = j0[w] + np.tile(np.tile(np.arange(span_j), span_i), len(idx))
            ok = (i <= i1[w]) & (j <= j1[w]) & (i >= 0) & (i < ny) & (j >= 0) & (j < nx)
            w, r, c = w[ok], i[ok] * s, j[ok] * s
            off = grid.slots_in_images(r, c, np.full(len(w), mb["height"]), np.full(len(w), mb["width"]), chunk_px)
            good = np.asarray(before_valid[b]).astype(bool)[off]
            w, r, c, off = w[good], r[good], c[good], off[good]
            if not len(w):
                continue
            frac = _overlap(qx[w], qy[w], c.astype(np.float64), r.astype(np.float64)) / area[w]
            slot_b = mb["start"] + off
            # this before image's best window per after window: the largest overlap, ties (1e-9) the lower slot
            top = np.full(len(idx), -np.inf)
            np.maximum.at(top, w, frac)
            near_top = frac >= top[w] - 1e-9
            w, frac, slot_b = w[near_top], frac[near_top], slot_b[near_top]
            order = np.lexsort((slot_b, w))
            first = order[np.r_[True, w[order][1:] != w[order][:-1]]]
            w, frac, slot_b = w[first], frac[first], slot_b[first]
            # against the best of the before images so far: larger overlap; ties the later image, then the lower slot
            better = frac > best[w] + 1e-9
            tie = (np.abs(frac - best[w]) <= 1e-9) & (best_slot[w] >= 0)
            when_b = mb["acquired"]
            if not np.isnat(when_b):
                later = np.isnat(best_when[w]) | (best_when[w] < when_b)
                same = best_when[w] == when_b
            else:
                later, same = np.zeros(len(w), bool), np.isnat(best_when[w])
            better |= tie & (later | (same & (slot_b < best_slot[w])))
            upd = w[better]
            best[upd], best_slot[upd], best_when[upd] = frac[better], slot_b[better], when_b
        paired = best >= MIN_OVERLAP - 1e-9
        out_slots.append(ma["start"] + idx[paired])
        out_partner.append(best_slot[paired])
        out_overlap.append(best[paired])
    if not out_slots:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_slots).astype(np.int64), np.concatenate(out_partner), np.concatenate(out_overlap)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class ChangeResult(Result):
    """Ranked pairs: each result is an after window (``uid``, ``image_path``, ``row``, ``col``,
    ``acquired``) with its before window (``before_*``) and ``distance``, the largest first."""

    before: dict[str, Any] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        out = super().records()
        for i, rec in enumerate(out):
            rec["before_uid"] = str(int(self.before["uid"][i]))
            rec["before_image_path"] = str(self.before["image_path"][i])
            rec["before_row"] = int(self.before["row"][i])
            rec["before_col"] = int(self.before["col"][i])
            rec["before_acquired"] = iso(self.before["acquired"][i])
            rec["overlap"] = round(float(self.before["overlap"][i]), 4)
        return out

    def table(self) -> str:
        robust = bool(self.extra and "robust" in self.extra)
        lines = [f"changes: {self.query.get('label', '')}" + (
            f"  ({self.total} pairs passed; showing {len(self)})" if self.total is not None and self.total > len(self)
            else ""),  # fmt: skip
            f"{'rank':>4}  {'distance':>9}  " + (f"{'robust':>8}  " if robust else "") + f"{'uid':>15}  {'row':>5}  "
            f"{'col':>5}  {'acquired':<10}  {'before uid':>15}  {'row':>5}  {'col':>5}  {'acquired':<10}  "
            f"image / before image"]  # fmt: skip
        for r in self.records():
            lines.append(
                f"{r['rank']:>4}  {r['distance']:>9.4f}  " + (f"{r['robust']:>8.2f}  " if robust else "") +
                f"{r['uid']:>15}  {r['row']:>5}  {r['col']:>5}  "
                f"{(r['acquired'] or '-')[:10]:<10}  {r['before_uid']:>15}  {r['before_row']:>5}  {r['before_col']:>5}  "
                f"{(r['before_acquired'] or '-')[:10]:<10}  {Path(r['image_path']).name} / {Path(r['before_image_path']).name}"
            )
        return "\n".join(lines)


def changes(
    index: Any,
    before: DateRange,
    after: DateRange,
    bbox: tuple[float, float, float, float] | None = None,
    k: int | None = 100,
    min_distance: float | None = None,
    limit: int = 10_000,
    score: str = "distance",
) -> tuple[ChangeResult, Pairing]:
    """The pairs of after and before windows (see the module docstring), the ``k`` most changed
    or every pair at least ``min_distance`` apart (the largest ``limit``). ``score``: ``distance``
    ranks by the distance itself; ``robust`` by how far it stands out among its image pair's
    (:func:`robust_scores`), each result's ``robust`` beside its ``distance``."""
    if score not in SCORES:
        raise SearchError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if (k is None) == (min_distance is None):
        raise SearchError("choose one: -k for the k most changed windows, or --min-distance D for every pair past D")
    if k is not None and k <= 0:
        raise SearchError(f"k must be a positive number of results, got {k}")
    after_ids, after_note = index.image_ids_acquired(after, flag="--after")
    before_ids, before_note = index.image_ids_acquired(before, flag="--before")
    both = sorted(set(after_ids) & set(before_ids))
    if both:
        warnings.warn(f"--before {before.text} and --after {after.text} share {len(both)} image(s) (e.g. "
                      f"{index.image_paths[both[0]]}): an image is never paired with itself, but such images are "
                      f"both 'before' and 'after' for their neighbours; give ranges that do not overlap", stacklevel=2)  # fmt: skip
    pairing = pair_windows(index, after_ids, before_ids, bbox, whole_images=score == "robust")
    robust = None
    if score == "robust":
        raw, total, robust, pairing = _ranked_robust(index, pairing, bbox, k, min_distance, limit)
    query = {"type": "changes", "label": f"after {after.text} against before {before.text}",
             "before": before_note, "after": after_note, "bbox": list(bbox) if bbox else None,
             "pairs": pairing.pairs, "score": score}  # fmt: skip
    if not pairing.pairs:
        warnings.warn(f"no window of the {len(pairing.after_ids)} after image(s) overlaps a window of the "
                      f"{len(pairing.before_ids)} before image(s) by {MIN_OVERLAP:.0%}: nothing to compare", stacklevel=2)  # fmt: skip
    scorer = PairScorer()
    filters = Filters(include_overlapping=True, bbox=bbox, image_ids=tuple(pairing.after_ids) or (-1,))
    if robust is None and pairing.pairs:
        total = None
        blocks = pair_blocks(index, pairing)
        if min_distance is None:
            g = graph.topk_graph(list(blocks.values()), scorer, k, filters, Exclusions.none(), index.half_m,
                                 index.split_every, index.usable)  # fmt: skip
            [raw] = index._compute(g)[0]
        else:
            g = graph.threshold_graph(list(blocks.values()), scorer, scorer.internal(min_distance), limit, filters,
                                      Exclusions.none(), index.half_m, index.split_every, index.usable)  # fmt: skip
            ([raw], counts) = index._compute(g)[0]
            total = int(counts[0])
    elif robust is None:
        from pipeline.search.topk import RESULT_DTYPE

        raw = np.zeros(0, dtype=RESULT_DTYPE)
        total = 0 if min_distance is not None else None
    res = Result.from_topk(raw, query, scorer.report(raw["score"]), index.image_paths, scorer.name, total,
                           index.geometry, higher_is_better=True)  # fmt: skip
    if robust is not None:
        res.extra = {"robust": robust}
    bslots, overlap = pairing.partner_of(index.slots_of(res.uid))
    buid = np.asarray(index._compute(index.ds["uid"].data[bslots])[0], np.uint64) if len(bslots) else np.zeros(0, np.uint64)
    bimage, brow, bcol = grid.unpack_uid(buid)
    before_fields = {
        "uid": buid, "image_path": [str(index.image_paths[i]) for i in bimage], "row": brow, "col": bcol,
        "acquired": index.acquired[bimage], "overlap": overlap,
    }  # fmt: skip
    out = ChangeResult(**{f: getattr(res, f) for f in Result.__dataclass_fields__}, before=before_fields)
    return out, pairing


SCORES = ("distance", "robust")
MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation per median absolute deviation


def pair_distances_of(index: Any, pairing: Pairing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uid, slot, distance)`` of every pair, in slot order, through the same paired blocks as
    the ranking (exact, float64)."""
    import dask

    if not pairing.pairs:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0)
    blocks = pair_blocks(index, pairing)
    parts = index._compute(*[dask.delayed(pair_distances)(b) for b in blocks.values()])
    uid = np.concatenate([p[0] for p in parts]).astype(np.uint64)
    dist = np.concatenate([p[1] for p in parts])
    slots = index.slots_of(uid)
    order = np.argsort(slots, kind="stable")
    return uid[order], slots[order], dist[order]


def robust_scores(dist: np.ndarray, group: np.ndarray) -> np.ndarray:
    """How far each distance stands out among those of its ``group`` (an after image and the
    before image its partner lies in): ``(d - median) / (1.4826 * MAD)``, the median and the
    median absolute deviation of the group's distances. Two flights differ everywhere by light,
    season and sensor; a group whose every window moved by as much as a real change elsewhere
    then ranks below that change. It assumes most of a group's windows did not change. The
    scale has a floor, 1e-3 of the group's largest distance, for groups whose windows are
    nearly all identical (the same pixels flown twice): their changes then score about 1,000."""
    dist = np.asarray(dist, dtype=np.float64)
    out = np.zeros(len(dist))
    keys, inv = np.unique(group, return_inverse=True)
    for g in range(len(keys)):
        members = np.flatnonzero(inv == g)
        d = dist[members]
        med = float(np.median(d))
        scale = max(MAD_TO_SIGMA * float(np.median(np.abs(d - med))), 1e-3 * float(d.max()), 1e-12)
        out[members] = (d - med) / scale
    return out


def _ranked_robust(index: Any, pairing: Pairing, bbox: tuple[float, float, float, float] | None, k: int | None,
                   min_distance: float | None, limit: int) -> tuple[np.ndarray, int | None, np.ndarray, Pairing]:  # fmt: skip
    """``--score robust``: every pair's distance (``pairing`` holds every window of the after
    images in view), each image pair's statistics, then the windows centred in ``bbox`` (and at
    least ``min_distance`` apart) ranked by robust score, ties by uid. Returns the ranked
    RESULT_DTYPE rows, the count that passed (threshold mode), their robust scores and the
    pairing of the windows in view."""
    from pipeline.search.topk import RESULT_DTYPE

    uid, slots, dist = pair_distances_of(index, pairing)
    partner, _ = pairing.partner_of(slots)
    starts = np.asarray(index.image_table["tile_start"], dtype=np.int64)
    by_start = np.argsort(starts, kind="stable")
    before_image = by_start[np.searchsorted(starts[by_start], partner, side="right") - 1]
    lon, lat = (np.asarray(v, np.float64) for v in index._compute(index.ds["lon"].data[slots], index.ds["lat"].data[slots]))
    after_image = grid.unpack_uid(uid)[0].astype(np.int64)
    z = robust_scores(dist, after_image * len(starts) + before_image)
    view = np.ones(len(slots), bool)
    if bbox is not None:
        with np.errstate(invalid="ignore"):
            view = (lon >= bbox[0]) & (lon <= bbox[2]) & (lat >= bbox[1]) & (lat <= bbox[3])
    keep = view & (dist >= min_distance) if min_distance is not None else view
    order = np.flatnonzero(keep)[np.lexsort((uid[keep], -z[keep]))]
    take = order[: (k if min_distance is None else limit)]
    raw = np.zeros(len(take), dtype=RESULT_DTYPE)
    raw["uid"], raw["score"], raw["lon"], raw["lat"] = uid[take], -dist[take] ** 2, lon[take], lat[take]
    inside = np.isin(pairing.slots, slots[view])
    shown = Pairing(pairing.slots[inside], pairing.partner[inside], pairing.overlap[inside], pairing.after_ids,
                    pairing.before_ids, pairing.without_crs)  # fmt: skip
    return raw, (int(keep.sum()) if min_distance is not None else None), z[take], shown


def pair_blocks(index: Any, pairing: Pairing) -> dict[int, Any]:
    """The store's blocks that hold paired after windows, each with its partners' rows."""
    dba = index.uses_dba
    post = None if dba else index.postprocess
    blocks = graph.store_blocks(index.ds, postprocess=post, use_dba=dba)
    rows = int(index.ds["fingerprint"].data.chunksize[0])
    return graph.pair_blocks(index.ds, blocks, rows, pairing.slots, pairing.partner, "fingerprint_dba" if dba else "fingerprint",
                             post)  # fmt: skip


def change_maps(index: Any, pairing: Pairing, out: str | Path) -> list[Path]:
    """A change map per after image (``--heatmap DIR``): a float32 COG (and PNG) whose pixel is
    the distance of the window at row ``128 i``, col ``128 j`` to its before window (NaN where it
    has none), laid out as ``heatmap``'s score maps. Computed through the same paired blocks."""
    from pipeline.heatmap import map_transform, write_cog, write_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    uid, _, dist = pair_distances_of(index, pairing)
    image, row, col = grid.unpack_uid(uid)
    table, geom = index.image_table, index.geometry
    stems = [Path(str(p)).stem for p in index.image_paths]
    written = []
    for a in pairing.after_ids:
        ny, nx = grid.windows_per_axis(int(table["height"][a])), grid.windows_per_axis(int(table["width"][a]))
        values = np.full((ny, nx), np.nan)
        mine = image == a
        values[row[mine] // grid.STRIDE, col[mine] // grid.STRIDE] = dist[mine]
        stem = stems[a] if stems.count(stems[a]) == 1 else f"{stems[a]}-{a}"
        path = out / f"{stem}.tif"
        write_cog(path, values, map_transform(geom["transform"][a]), str(geom["crs"][a]))
        write_png(path.with_suffix(".png"), values, f"change since before, {stems[a]}", "distance")
        written.append(path)
    return written
