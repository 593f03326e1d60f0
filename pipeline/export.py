"""Results into a GIS: window footprints as GeoJSON or GeoParquet, optionally dissolved.

Each hit is the polygon of its 256 x 256 window: the four corners ``(col, row)``,
``(col + 256, row)``, ``(col + 256, row + 256)``, ``(col, row + 256)`` through its image's affine
transform, reprojected to EPSG:4326 (lon, lat). Properties: ``rank``, ``uid`` (a string: uids
exceed 2**53), ``distance`` or ``score``, ``query`` (its label), ``image_path``, ``row``, ``col``,
``acquired`` (ISO 8601 UTC or null; a timestamp column in GeoParquet), and whatever else a result
records (a change's ``before_*`` fields).
Images without a CRS have no place on the ground: their hits are left out with a warning, or,
with ``pixel_coords``, written in the image's pixel coordinates.

``dissolve`` merges the touching or overlapping polygons of each image into one feature per
connected area, with ``hits`` (how many windows), the best value (lowest distance or score;
highest probability for a classifier) and ``area_m2``, the geodesic area on the WGS84 ellipsoid
(pyproj's ``Geod``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import grid
from pipeline.geo import to_lonlat


def window_ring(transform: Sequence[float], crs: str, row: int, col: int, pixel_coords: bool = False):
    """One window's footprint as a closed ring of 5 (x, y) points: its corners through the image's
    affine, then EPSG:4326; without a CRS, pixel coordinates (``pixel_coords``) or None."""
    t = grid.TILE
    cols = col + np.array([0, t, t, 0, 0], dtype=np.float64)
    rows = row + np.array([0, 0, t, t, 0], dtype=np.float64)
    if not crs:
        return [(float(c), float(r)) for c, r in zip(cols, rows)] if pixel_coords else None
    a, b, c, d, e, f = (float(v) for v in transform)
    lon, lat = to_lonlat(a * cols + b * rows + c, d * cols + e * rows + f, crs)
    return [(float(u), float(v)) for u, v in zip(lon, lat)]


def window_rings(result: Any, pixel_coords: bool = False) -> list[list[tuple[float, float]] | None]:
    """Each result's :func:`window_ring` (None when its image has no CRS and ``pixel_coords`` is off)."""
    if result.transform is None:
        raise ValueError("results carry no georeference: they come from a SearchIndex over a store")
    return [
        window_ring(result.transform[i], result.crs[i], int(result.row[i]), int(result.col[i]), pixel_coords)
        for i in range(len(result))
    ]


def _rows(results: Sequence[Any], pixel_coords: bool) -> tuple[list[dict[str, Any]], list]:
    props, rings = [], []
    skipped: list[str] = []
    for res in results:
        for record, ring in zip(res.records(), window_rings(res, pixel_coords)):
            if ring is None:
                skipped.append(record["image_path"])
                continue
            props.append({
                "rank": record["rank"], "uid": record["uid"], res.value_name: record[res.value_name],
                "query": str(res.query.get("label", "")),
                **{k: v for k, v in record.items() if k not in ("rank", "uid", res.value_name, "lon", "lat")},
            })  # fmt: skip
            rings.append(ring)
    if skipped:
        names = sorted(set(skipped))
        warnings.warn(
            f"{len(skipped)} hit(s) in {len(names)} image(s) without a CRS left out of the export "
            f"(e.g. {names[0]}); --pixel-coords writes them in pixel coordinates",
            stacklevel=3,
        )
    return props, rings


def to_geojson(results: Sequence[Any], pixel_coords: bool = False, dissolved: bool = False) -> dict[str, Any]:
    """A FeatureCollection of the results' window polygons (EPSG:4326)."""
    if dissolved:
        gdf = dissolve(to_geodataframe(results, pixel_coords), _higher_is_better(results))
        return json.loads(gdf.to_json(drop_id=True))
    props, rings = _rows(results, pixel_coords)
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": p,
                "geometry": {"type": "Polygon", "coordinates": [[list(pt) for pt in r]]},
            }
            for p, r in zip(props, rings)
        ],
    }


def to_geodataframe(results: Sequence[Any], pixel_coords: bool = False):
    """A geopandas GeoDataFrame of the results' window polygons (EPSG:4326 unless pixel coordinates)."""
    import geopandas as gpd
    import pandas as pd
    from shapely.geometry import Polygon

    props, rings = _rows(results, pixel_coords)
    crs = None if pixel_coords and any(not c for r in results for c in (r.crs or [])) else "EPSG:4326"
    columns = list(props[0]) if props else ["rank", "uid", results[0].value_name if results else "distance", "query",
                                            "image_path", "row", "col", "acquired"]  # fmt: skip
    gdf = gpd.GeoDataFrame(props, columns=columns, geometry=[Polygon(r) for r in rings], crs=crs)
    for name in (c for c in columns if c.endswith("acquired")):  # timestamps in GeoParquet, not strings
        gdf[name] = pd.to_datetime(gdf[name], utc=True)
    return gdf


def _higher_is_better(results: Sequence[Any]) -> bool:
    return bool(results) and bool(getattr(results[0], "higher_is_better", False))


def dissolve(gdf, higher_is_better: bool = False):
    """One feature per connected area of each image's hits: ``hits``, the best value (the lowest,
    or the highest with ``higher_is_better``: a classifier's probability) and ``area_m2``."""
    import geopandas as gpd
    from pyproj import Geod
    from shapely.ops import unary_union

    value = next(c for c in ("distance", "score") if c in gdf.columns)
    geod = Geod(ellps="WGS84")
    out = []
    for path, group in gdf.groupby("image_path", sort=True):
        merged = unary_union(list(group.geometry))
        parts = list(getattr(merged, "geoms", [merged]))
        for part in parts:
            inside = group[group.geometry.intersects(part)]
            best = inside[value].max() if higher_is_better else inside[value].min()
            area = abs(geod.geometry_area_perimeter(part)[0]) if gdf.crs is not None else None
            out.append({"image_path": path, "hits": len(inside), f"best_{value}": float(best), "area_m2": area,
                        "query": str(inside["query"].iloc[0]), "geometry": part})  # fmt: skip
    return gpd.GeoDataFrame(out, geometry="geometry", crs=gdf.crs)


def write_geojson(
    results: Sequence[Any], path: str | Path, pixel_coords: bool = False, dissolved: bool = False
) -> None:
    Path(path).write_text(json.dumps(to_geojson(results, pixel_coords, dissolved)))


def write_geoparquet(
    results: Sequence[Any], path: str | Path, pixel_coords: bool = False, dissolved: bool = False
) -> None:
    gdf = to_geodataframe(results, pixel_coords)
    (dissolve(gdf, _higher_is_better(results)) if dissolved else gdf).to_parquet(path)
