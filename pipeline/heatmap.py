"""Score maps: one single-band float32 Cloud-Optimized GeoTIFF per image, pixel ``(i, j)`` holding
the score of the window whose top-left corner is at row ``128 i``, col ``128 j``.

Each pixel is centred on its window's centre: the map's transform is the image's transform
x ``translation(64, 64)`` x ``scale(128)`` (map pixel ``(j + 0.5, i + 0.5)`` lands on image pixel
``(128 j + 128, 128 i + 128)``), in the image's CRS. Windows that are not valid (mostly nodata)
are nodata (NaN). Scores are exact (float64), or the device's float32 scores with
``--index-device``; ``--index-dtype float16`` scores the fingerprints as float16 holds them.
Values are what the scorer reports: the Euclidean distance of a single query,
an example set's score, a classifier's probability. Each map comes with a PNG overview and a
colour bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import grid
from pipeline.search.kernels import as_dtype, make_block
from pipeline.search.scorers import Scorer


def image_scores(index: Any, scorer: Scorer, image_id: int) -> np.ndarray:
    """float64 ``(ny, nx)``: the reported value of every window of one image (NaN where not valid)."""
    ds = index.ds
    start, count = int(ds["tile_start"].values[image_id]), int(ds["tile_count"].values[image_id])
    h, w = int(ds["height"].values[image_id]), int(ds["width"].values[image_id])
    ny, nx = grid.windows_per_axis(h), grid.windows_per_axis(w)
    out = np.full((ny, nx), np.nan)
    if not count:
        return out
    sl = slice(start, start + count)
    fp_var = "fingerprint_dba" if index.uses_dba else "fingerprint"
    arrays = [ds[fp_var][sl].values, ds["valid"][sl].values, ds["uid"][sl].values, ds["lon"][sl].values,
              ds["lat"][sl].values]  # fmt: skip
    block = make_block(*arrays, with_norms=False, postprocess=None if index.uses_dba else index.postprocess)
    if index.dtype:
        block = as_dtype(block, index.dtype)
    valid = np.flatnonzero(block["valid"])
    if not len(valid):
        values = np.zeros(0)
    elif index.device:  # the device's float32 scores of every window (the map is of all of them)
        from pipeline.search import device

        on = device.to_device(block, index.device)
        values = scorer.report(device.slice_scores(on, scorer, 0, len(on))[0].double().cpu().numpy()[valid])
    else:
        values = scorer.report(scorer.exact(block, valid, 0))
    _, rows, cols = grid.unpack_uid(block["uid"][valid])
    out[rows // grid.STRIDE, cols // grid.STRIDE] = values
    return out


def map_transform(transform: Sequence[float]) -> tuple[float, ...]:
    """The image's affine x translation(64, 64) x scale(128), as a, b, c, d, e, f."""
    from affine import Affine

    parts = (Affine(*transform), Affine.translation(grid.STRIDE / 2, grid.STRIDE / 2), Affine.scale(grid.STRIDE))
    if hasattr(Affine, "__matmul__"):  # affine >= 2.4: `*` between matrices is deprecated
        t = parts[0] @ parts[1] @ parts[2]
    else:  # pragma: no cover (older affine)
        t = parts[0] * parts[1] * parts[2]
    return (t.a, t.b, t.c, t.d, t.e, t.f)


def write_cog(path: Path, values: np.ndarray, transform: Sequence[float], crs: str) -> None:
    """A float32 single-band COG with NaN as nodata."""
    import rasterio
    from affine import Affine
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy

    profile = {"driver": "GTiff", "height": values.shape[0], "width": values.shape[1], "count": 1,
               "dtype": "float32", "nodata": float("nan"), "transform": Affine(*transform)}  # fmt: skip
    if crs:
        profile["crs"] = crs
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(values.astype(np.float32), 1)
        with mem.open() as src, rasterio.Env():
            copy(src, str(path), driver="COG", compress="deflate", blocksize=256)


def _colours(t: np.ndarray) -> np.ndarray:
    """A perceptual dark-blue -> green -> yellow ramp (viridis-like), for t in [0, 1]."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
    pos = np.clip(t, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).round().astype(np.uint8)


def write_png(path: Path, values: np.ndarray, title: str, name: str) -> None:
    """An overview of the map (nodata grey), scaled up to at least 256 px, with a colour bar."""
    from PIL import Image, ImageDraw

    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    t = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    rgb = _colours(np.nan_to_num(t))
    rgb[~np.isfinite(values)] = 160
    scale = max(1, int(np.ceil(256 / max(values.shape))))
    img = Image.fromarray(rgb).resize((values.shape[1] * scale, values.shape[0] * scale), Image.NEAREST)
    bar_w = 60
    canvas = Image.new("RGB", (img.width + bar_w + 70, max(img.height, 200) + 30), "white")
    canvas.paste(img, (0, 30))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 8), title[:90], fill=(0, 0, 0))
    bar_h = max(img.height, 200)
    ramp = _colours(np.linspace(1, 0, bar_h))[:, None, :].repeat(20, axis=1)
    canvas.paste(Image.fromarray(ramp), (img.width + 20, 30))
    draw.text((img.width + 44, 30), f"{hi:.4g}", fill=(0, 0, 0))
    draw.text((img.width + 44, 30 + bar_h - 12), f"{lo:.4g}", fill=(0, 0, 0))
    draw.text((img.width + 44, 30 + bar_h // 2), name, fill=(0, 0, 0))
    canvas.save(path)


def write_heatmaps(
    index: Any, scorer: Scorer, out: str | Path, title: str = "", image_ids: Sequence[int] | None = None
) -> list[Path]:
    """A COG (and PNG) per searchable image of ``index`` (of ``image_ids``, when given: a date
    filter's); returns the COG paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = index.ds
    ids = np.flatnonzero(index.usable) if index.usable is not None else np.arange(ds.sizes["img"])
    if image_ids is not None:
        ids = ids[np.isin(ids, np.asarray(image_ids, dtype=np.int64))]
    stems = [Path(str(p)).stem for p in index.image_paths]
    written = []
    transforms, crss = ds["transform"].values, ds["crs"].values.astype(object)
    for i in ids:
        values = image_scores(index, scorer, int(i))
        stem = stems[i] if stems.count(stems[i]) == 1 else f"{stems[i]}-{i}"
        path = out / f"{stem}.tif"
        write_cog(path, values, map_transform(transforms[i]), str(crss[i]))
        write_png(path.with_suffix(".png"), values, f"{title}  {stems[i]}", scorer.name)
        written.append(path)
    return written
