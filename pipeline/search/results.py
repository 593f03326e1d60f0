"""Search results and their formats: a text table and JSON (result sheets live in
:mod:`pipeline.render`). Apart from the engine: nothing here searches.

JSON shape (``search --json``)::

    {"query": {...}, "results": [{"rank", "uid", "distance", "image_path", "row", "col", "lon", "lat", "acquired"}]}

uids are strings (they exceed 2**53); NaN and an unknown ``acquired`` are ``null`` (else ISO
8601 UTC, ``2019-11-09T00:00:00Z``); ``distance`` is the Euclidean distance.
The field is named after what the results are ranked by (:attr:`Result.value_name`): ``score``
for example sets and classifiers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import grid
from pipeline.dates import iso


@dataclass
class Result:
    """Results for one query, best first.

    ``value`` holds what each result is ranked by, as the scorer reports it; the query names
    its meaning (``value_name``, the key in the outputs): the Euclidean distance (``distance``)
    for single queries, ``score`` for example sets (lower is better) and for classifiers (the
    probability, higher is better: ``higher_is_better``). ``total``: in threshold mode, how many
    tiles passed (more than the results when ``--limit`` cut them). ``transform``/``crs``: each
    result's image georeference, for footprints (:mod:`pipeline.export`).
    """

    query: dict[str, Any]
    uid: np.ndarray
    value: np.ndarray
    image_path: list[str]
    row: np.ndarray
    col: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    value_name: str = "distance"
    higher_is_better: bool = False  # of ``value`` (a classifier's probability)
    total: int | None = None
    transform: np.ndarray | None = None  # (n, 6) affine a, b, c, d, e, f of each result's image
    crs: list[str] | None = None
    extra: dict[str, np.ndarray] | None = None  # more per-result values (diffusion: "distance" beside "score")
    acquired: np.ndarray | None = None  # datetime64[s] per result: its image's acquisition time (NaT: unknown)

    @classmethod
    def from_topk(
        cls,
        res: np.ndarray,
        query: dict[str, Any],
        values: np.ndarray,
        image_paths: Sequence[str],
        value_name: str = "distance",
        total: int | None = None,
        geometry: dict[str, np.ndarray] | None = None,
        higher_is_better: bool = False,
    ) -> Result:
        """From a sorted RESULT_DTYPE array; ``values``: what the scorer reports per row;
        ``geometry``: the image table's ``transform`` and ``crs``."""
        image, row, col = grid.unpack_uid(res["uid"])
        return cls(
            query=query,
            uid=res["uid"],
            value=np.asarray(values, dtype=np.float64),
            image_path=[str(image_paths[i]) for i in image],
            row=row,
            col=col,
            lon=res["lon"],
            lat=res["lat"],
            value_name=value_name,
            higher_is_better=higher_is_better,
            total=total,
            transform=None if geometry is None else np.asarray(geometry["transform"])[image].reshape(-1, 6),
            crs=None if geometry is None else [str(geometry["crs"][i]) for i in image],
            acquired=None if geometry is None or "acquired" not in geometry
            else np.asarray(geometry["acquired"], dtype="datetime64[s]")[image],
        )

    def __len__(self) -> int:
        return len(self.uid)

    def records(self) -> list[dict[str, Any]]:
        def num(v: float) -> float | None:
            return None if not np.isfinite(v) else float(v)

        return [
            {
                "rank": i + 1,
                "uid": str(int(self.uid[i])),
                self.value_name: float(self.value[i]),
                **{name: float(v[i]) for name, v in (self.extra or {}).items()},
                "image_path": self.image_path[i],
                "row": int(self.row[i]),
                "col": int(self.col[i]),
                "lon": num(self.lon[i]),
                "lat": num(self.lat[i]),
                "acquired": None if self.acquired is None else iso(self.acquired[i]),
            }
            for i in range(len(self))
        ]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"query": self.query, "results": self.records()}
        if self.total is not None:
            doc["total_passed"] = self.total  # threshold mode: all that passed, capped by --limit
        return doc

    def to_geojson(self, pixel_coords: bool = False) -> dict[str, Any]:
        """The results as a GeoJSON FeatureCollection of window polygons (EPSG:4326)."""
        from pipeline import export

        return export.to_geojson([self], pixel_coords=pixel_coords)

    def to_geodataframe(self, pixel_coords: bool = False):
        """The results as a geopandas GeoDataFrame of window polygons (EPSG:4326)."""
        from pipeline import export

        return export.to_geodataframe([self], pixel_coords=pixel_coords)

    def table(self) -> str:
        """A text table, best first; an ``acquired`` column (the date) once any result has one."""
        name = self.value_name
        dated = self.acquired is not None and bool((~np.isnat(self.acquired)).any())
        lines = [
            f"query: {self.query.get('label', '')}"
            + (
                f"  ({self.total} passed; showing {len(self)})"
                if self.total is not None and self.total > len(self)
                else ""
            ),
            f"{'rank':>4}  {'uid':>20}  {name:>10}  {'row':>6}  {'col':>6}  {'lon':>11}  {'lat':>10}  "
            + ("acquired    " if dated else "") + "image",
        ]
        for r in self.records():
            lon = f"{r['lon']:.6f}" if r["lon"] is not None else "nan"
            lat = f"{r['lat']:.6f}" if r["lat"] is not None else "nan"
            when = f"{(r['acquired'] or '-')[:10]:<10}  " if dated else ""
            lines.append(
                f"{r['rank']:>4}  {r['uid']:>20}  {r[name]:>10.4f}  {r['row']:>6}  {r['col']:>6}  {lon:>11}  {lat:>10}  "
                f"{when}{r['image_path']}"
            )
        return "\n".join(lines)


def write_json(results: Sequence[Result], path: str | Path) -> None:
    """One query: its document; several: a list of them."""
    docs = [r.to_json() for r in results]
    Path(path).write_text(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, allow_nan=False))
