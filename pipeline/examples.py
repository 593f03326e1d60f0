"""Example sets: positives and negatives given as uids, places or image files, resolved against a
store into the raw fingerprints (and locations) that :class:`~pipeline.search.kernels.ExampleSet`
holds.

A reference (``--positive REF``, ``--negative REF``) is a tile uid of the store, ``lonlat:LON,LAT``
(the tile centred nearest that point, which must lie inside it) or an image file (fingerprinted
with the store's model, :mod:`pipeline.query`). ``--examples FILE`` reads many:

- CSV with a ``label`` column (``positive`` / ``negative``) and either a ``uid`` column or
  ``lon`` and ``lat`` columns (a ``image`` column of file paths works too);
- GeoJSON: a FeatureCollection of Point features (EPSG:4326 lon, lat) with a ``label``
  property (``positive`` / ``negative``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SearchError
from pipeline.search.kernels import ExampleSet, Queries

LABELS = ("positive", "negative")


@dataclass(frozen=True)
class Ref:
    """One example: ``kind`` uid | lonlat | image, and its value."""

    kind: str
    value: Any

    def label(self) -> str:
        if self.kind == "lonlat":
            return f"lonlat:{self.value[0]},{self.value[1]}"
        return str(self.value)


def parse_ref(text: str, files: bool = True) -> Ref:
    """``UID``, ``lonlat:LON,LAT`` or (``files``) an image file path. Without ``files`` (a
    reference from a web request) nothing is ever looked up on disk."""
    text = str(text).strip()
    if text.lower().startswith("lonlat:"):
        try:
            lon, lat = (float(v) for v in text[7:].split(","))
        except ValueError:
            raise SearchError(f"example {text!r}: write places as lonlat:LON,LAT, e.g. lonlat:-82.03,29.82") from None
        return Ref("lonlat", (lon, lat))
    if text.isascii() and text.isdigit():
        return Ref("uid", int(text))
    if not files:
        raise SearchError(f"example {text[:80]!r} is neither a tile uid nor lonlat:LON,LAT")
    if Path(text).expanduser().is_file():
        return Ref("image", str(Path(text).expanduser().resolve()))
    raise SearchError(f"example {text!r} is neither a tile uid, lonlat:LON,LAT nor an existing image file")


def read_examples(path: str | Path) -> list[tuple[Ref, str]]:
    """``(ref, label)`` pairs from a CSV or GeoJSON file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"--examples {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SearchError(f"--examples {path} cannot be read ({e}); pass a CSV or GeoJSON file") from None
    if path.suffix.lower() in (".geojson", ".json") or text.lstrip().startswith("{"):
        return _geojson(path, text)
    return _csv(path, text)


def _label(value: Any, where: str) -> str:
    label = str(value or "").strip().lower()
    if label not in LABELS:
        raise SearchError(f"{where}: label {value!r} is not 'positive' or 'negative'")
    return label


def _geojson(path: Path, text: str) -> list[tuple[Ref, str]]:
    try:
        doc = json.loads(text)
        features = doc["features"] if doc.get("type") == "FeatureCollection" else [doc]
    except (ValueError, KeyError, AttributeError) as e:
        raise SearchError(f"--examples {path} is not a GeoJSON FeatureCollection ({e})") from None
    out = []
    for n, feat in enumerate(features):
        geom = (feat or {}).get("geometry") or {}
        if geom.get("type") != "Point":
            raise SearchError(f"--examples {path}: feature {n} is a {geom.get('type')}, not a Point")
        lon, lat = (float(v) for v in geom["coordinates"][:2])
        out.append(
            (Ref("lonlat", (lon, lat)), _label((feat.get("properties") or {}).get("label"), f"{path} feature {n}"))
        )
    return out


def _csv(path: Path, text: str) -> list[tuple[Ref, str]]:
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise SearchError(f"--examples {path} has no rows; give a header (uid,label or lon,lat,label) and rows")
    cols = {c.strip().lower() for c in rows[0]}
    if "label" not in cols or not ({"uid"} <= cols or {"lon", "lat"} <= cols or {"image"} <= cols):
        raise SearchError(f"--examples {path} needs a 'label' column and 'uid', 'lon' and 'lat', or 'image' columns")
    out = []
    for n, row in enumerate(rows, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        where = f"{path} line {n}"
        if row.get("uid"):
            if not row["uid"].isdigit():
                raise SearchError(f"{where}: uid {row['uid']!r} is not a tile uid")
            ref = Ref("uid", int(row["uid"]))
        elif row.get("lon") and row.get("lat"):
            try:
                ref = Ref("lonlat", (float(row["lon"]), float(row["lat"])))
            except ValueError:
                raise SearchError(f"{where}: lon/lat {row['lon']!r}, {row['lat']!r} are not numbers") from None
        elif row.get("image"):
            ref = parse_ref(row["image"])
        else:
            raise SearchError(f"{where}: no uid, lon/lat or image")
        out.append((ref, _label(row.get("label"), where)))
    return out


def resolve(
    index: Any, refs: list[Ref], weights: str | None = None, device: str = "auto"
) -> tuple[Queries, list[dict]]:
    """Raw fingerprints and locations of ``refs`` in ``index``'s store, and a label for each."""
    from pipeline.search.kernels import Queries

    parts, labels = [], []
    uids = []
    for ref in refs:
        if ref.kind == "uid":
            uids.append(ref.value)
        elif ref.kind == "lonlat":
            uids.append(index.uid_at(*ref.value)[0])
    if uids:
        q, labs = index.queries_from_uids(uids)
        parts.append(q)
        labels += labs
    images = [ref.value for ref in refs if ref.kind == "image"]
    if images:
        from pipeline.query import fingerprint_images

        fps, _ = fingerprint_images(images, index.provenance, weights, device)
        parts.append(Queries.from_fingerprints(fps))
        labels += [{"type": "image", "image": p, "label": Path(p).name} for p in images]
    if not parts:
        return Queries.from_fingerprints(np.zeros((0, index.ds.sizes["feature"]), np.float32)), []
    return Queries.concat(parts), labels


def example_set(
    index: Any,
    positives: list[Ref],
    negatives: list[Ref],
    score: str = "centroid",
    negative_weight: float | None = None,
    weights: str | None = None,
    device: str = "auto",
) -> tuple[ExampleSet, dict]:
    """An :class:`ExampleSet` resolved in ``index``'s store, and the query's description."""
    if not positives:
        raise SearchError("an example set needs at least one positive example (--positive, or label 'positive')")
    pos, _ = resolve(index, positives, weights, device)
    neg, _ = resolve(index, negatives, weights, device)
    es = ExampleSet(pos, neg, score, negative_weight)
    query = {
        "type": "examples",
        "positives": [r.label() for r in positives],
        "negatives": [r.label() for r in negatives],
        "score": score,
        "negative_weight": es.weight,
        "label": f"{len(positives)} positive(s), {len(negatives)} negative(s), {score}",
    }
    return es, query


def answer(
    index: Any,
    es: ExampleSet,
    query: dict,
    k: int | None = 10,
    threshold: float | None = None,
    limit: int = 10_000,
    filters: Any = None,
    diverse: bool = False,
    model: Any = None,
) -> list:
    """The results of one example set: tiles ranked by the set's own score, or, with ``model`` (a
    fitted :class:`~pipeline.classify.Classifier`), by the model's probability. The examples and
    the tiles overlapping them are left out. ``threshold``: a distance or score (or, for a
    model, a minimum probability) instead of ``k``."""
    scorer, exclude = index.example_scorer([es])
    if model is not None:
        scorer = model.scorer()
    max_score = None if threshold is None else scorer.internal(threshold)
    return index.run(scorer, exclude, k, max_score, limit, filters, diverse, [query])
