"""Result sheets: the query tile and its k results in a grid (the paper's Fig. 4).

Tiles are read back from the source images by window; the store keeps no pixels.
Never imported by the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import grid

LABEL_H = 22
GAP = 6


def read_tile(path: str, row: int, col: int, bands: Sequence[int] = (1, 2, 3), scale: Any = None) -> np.ndarray:
    """One 256 x 256 window of a source image as uint8 ``(3, 256, 256)``."""
    from pipeline.raster import RasterReader

    return RasterReader(path, tuple(bands), tuple(scale) if scale else None).read(
        (row, row + grid.TILE), (col, col + grid.TILE)
    )[:3]


def sheet(tiles: Sequence[np.ndarray], labels: Sequence[str], columns: int = 6, highlight_first: bool = True):
    """A PIL image: ``tiles`` (uint8 ``(3, 256, 256)``) in a grid, each with its label above."""
    from PIL import Image, ImageDraw

    n = len(tiles)
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    cell_w, cell_h = grid.TILE + GAP, grid.TILE + LABEL_H + GAP
    img = Image.new("RGB", (cols * cell_w + GAP, rows * cell_h + GAP), "white")
    draw = ImageDraw.Draw(img)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = GAP + (i % cols) * cell_w
        y = GAP + (i // cols) * cell_h
        draw.text((x + 2, y + 4), label, fill=(200, 0, 0) if (i == 0 and highlight_first) else (0, 0, 0))
        img.paste(Image.fromarray(np.ascontiguousarray(tile.transpose(1, 2, 0))), (x, y + LABEL_H))
        if i == 0 and highlight_first:
            draw.rectangle(
                [x - 3, y + LABEL_H - 3, x + grid.TILE + 2, y + LABEL_H + grid.TILE + 2], outline=(220, 0, 0), width=3
            )
    return img


def result_sheet(result, query_tile: np.ndarray, prov: dict[str, Any], out_path: str, columns: int = 6) -> str:
    """Write the sheet of one :class:`~pipeline.search.results.Result` as PNG; returns the path."""
    pre = prov.get("preprocessing", {})
    bands, scale = pre.get("bands", (1, 2, 3)), pre.get("scale")
    tiles = [query_tile]
    labels = [f"query  {result.query.get('label', '')}"[:40]]
    # d: distance, s: score, p: a classifier's probability (a sheet of example-set results had no
    # 'distance' to show and failed)
    short = "p" if result.higher_is_better else {"distance": "d"}.get(result.value_name, "s")
    for r in result.records():
        tiles.append(read_tile(r["image_path"], r["row"], r["col"], bands, scale))
        labels.append(f"#{r['rank']}  {short}={r[result.value_name]:.3f}")
    sheet(tiles, labels, columns).save(out_path)
    return out_path


def write_sheets(
    results: Sequence[Any], pixels: Sequence[np.ndarray], prov: dict[str, Any], out: str | Path
) -> list[Path]:
    """One sheet per result: ``out`` for a single query, ``NAME-1.png``, ``NAME-2.png``, ... for
    several. ``pixels``: each query's 256 x 256 tile. Returns the paths written."""
    out = Path(out)
    paths = []
    for i, (res, px) in enumerate(zip(results, pixels)):
        path = out if len(results) == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix or '.png'}")
        result_sheet(res, px, prov, str(path))
        paths.append(path)
    return paths


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], out_path: str, unit: str = "") -> str:
    """A horizontal bar chart as PNG (no plotting dependency): one bar per label, value printed."""
    from PIL import Image, ImageDraw

    width, bar_h, left, span = 760, 22, 230, 440
    img = Image.new("RGB", (width, 44 + bar_h * len(labels)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill=(0, 0, 0))
    top = max(max(values, default=0.0), 1e-12)
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 36 + i * bar_h
        draw.text((10, y + 4), str(label)[:34], fill=(0, 0, 0))
        draw.rectangle([left, y + 3, left + int(span * v / top), y + bar_h - 3], fill=(70, 110, 180))
        draw.text((left + 6 + int(span * v / top), y + 4), f"{v:.3g}{unit}", fill=(0, 0, 0))
    img.save(out_path)
    return out_path
