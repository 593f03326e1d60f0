"""STAC sources: ``ingest`` takes a STAC ItemCollection (what ``pystac-client``'s
``item_collection().save_object()`` writes, or any search's FeatureCollection), a static
catalogue or collection (followed recursively), or a single item, as a local, ``s3://``,
``gs://`` or ``https://`` JSON file. pystac reads it; each item becomes one image: the asset
``--asset KEY`` names, or by default the item's first RGB GeoTIFF/COG asset (key ``visual``,
role ``visual``, or red/green/blue bands). The item's ``datetime`` (else ``start_datetime``)
becomes the image's ``acquired`` and its id the image's ``item_id``.

A STAC API search is out of scope (no network where this is tested): save its results with
pystac-client and pass the file.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dates import DateSources
from pipeline.errors import RasterError

STAC_SUFFIXES = (".json", ".geojson")
TIFF_TYPES = ("image/tiff", "image/geotiff", "image/vnd.stac.geotiff")
RGB = {"red", "green", "blue"}


def is_stac(source: str | os.PathLike[str]) -> bool:
    return str(source).lower().endswith(STAC_SUFFIXES)


def expand(sources: Iterable[str | os.PathLike[str]], dates: DateSources,
           asset: str | None = None) -> tuple[list[str], DateSources]:  # fmt: skip
    """``sources`` with every STAC file replaced by its items' asset paths, and ``dates`` with
    those items' times and ids added (a STAC time wins over every other source of dates)."""
    out: list[str] = []
    for src in sources:
        s = os.fspath(src)
        if not is_stac(s):
            out.append(s)
            continue
        for path, when, item_id in read_items(s, asset):
            out.append(path)
            if not np.isnat(when):
                dates.stac[path] = when
            dates.items[path] = item_id
    if asset is not None and not any(is_stac(s) for s in map(os.fspath, sources)):
        raise RasterError("--asset picks an asset of STAC items: give a STAC ItemCollection or catalogue as SOURCE")
    return out, dates


def _io():
    """A pystac StacIO that reads object storage through fsspec (local files and https as pystac does)."""
    from pystac.stac_io import DefaultStacIO

    class FsspecIO(DefaultStacIO):
        def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
            href = str(source)
            if "://" in href and not href.startswith(("http://", "https://", "file://")):
                import fsspec

                with fsspec.open(href, "rt") as f:
                    return f.read()
            return super().read_text(source, *args, **kwargs)

    return FsspecIO()


def read_items(href: str, asset: str | None = None) -> list[tuple[str, np.datetime64, str]]:
    """``(image path, acquired, item id)`` of every item of a STAC file."""
    import pystac

    io = _io()
    where = href if "://" in href else str(Path(href).expanduser().resolve())
    if "://" not in href and not Path(where).is_file():
        raise RasterError(f"source {href} does not exist: pass a STAC ItemCollection or catalogue JSON file")
    try:
        doc = io.read_json(where)
    except Exception as e:  # noqa: BLE001 (JSON, network, storage: all say the same to the user)
        raise RasterError(f"{href}: cannot be read as JSON ({e}); pass a STAC ItemCollection or catalogue") from e
    kind = doc.get("type") if isinstance(doc, dict) else None
    try:
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(doc, preserve_dict=False).items)
            base = where
        elif kind == "Feature":
            items, base = [pystac.Item.from_dict(doc, href=where, preserve_dict=False)], where
        elif kind in ("Catalog", "Collection"):
            cat = pystac.read_dict(doc, href=where, stac_io=io)
            items, base = list(cat.get_items(recursive=True)), ""
        else:
            raise RasterError(
                f"{href}: a .json source must be a STAC ItemCollection, Catalog, Collection or Item (its type is "
                f"{kind!r})"
            )
    except RasterError:
        raise
    except Exception as e:  # noqa: BLE001
        raise RasterError(f"{href}: not a valid STAC document ({e})") from e
    if not items:
        raise RasterError(f"{href}: the STAC document holds no items")
    out = []
    for item in items:
        key = choose_asset(item, asset, href)
        out.append((_absolute(item, item.assets[key].href, base), _when(item), str(item.id)))
    return out


def choose_asset(item: Any, asset: str | None, where: str) -> str:
    """The key of the asset to ingest: ``asset`` when given, else the item's first RGB GeoTIFF."""
    keys = list(item.assets)
    if asset is not None:
        if asset not in item.assets:
            raise RasterError(f"{where}: STAC item {item.id} has no asset {asset!r}; its assets: {', '.join(keys)} "
                              f"(pass one with --asset)")  # fmt: skip
        return asset
    for key in keys:
        if _rgb_geotiff(key, item.assets[key]):
            return key
    raise RasterError(f"{where}: STAC item {item.id} has no RGB GeoTIFF asset to choose by default; its assets: "
                      f"{', '.join(keys)} (pass one with --asset)")  # fmt: skip


def _rgb_geotiff(key: str, asset: Any) -> bool:
    media = (asset.media_type or "").lower()
    tiff = any(t in media for t in TIFF_TYPES) or (not media and asset.href.lower().endswith((".tif", ".tiff")))
    if not tiff:
        return False
    roles = set(asset.roles or ())
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    names = {str(b.get("common_name") or b.get("eo:common_name") or b.get("name", "")).lower() for b in bands
             if isinstance(b, dict)}  # fmt: skip
    return key.lower() in ("visual", "rgb") or "visual" in roles or RGB <= names


def _absolute(item: Any, href: str, base: str) -> str:
    """An asset's href as an absolute local path or URI (relative hrefs: against the item's own
    location, else the file it came in)."""
    if href.startswith("file://"):
        href = href[len("file://") :]
    if "://" in href or os.path.isabs(href):
        return href if "://" in href else str(Path(href).resolve())
    own = item.get_self_href() or base
    if "://" in own:  # urljoin knows http(s) only: s3://, gs:// are joined as paths
        scheme, rest = own.split("://", 1)
        host, _, key = rest.partition("/")
        return f"{scheme}://{host}/{posixpath.normpath(posixpath.join(posixpath.dirname(key), href))}"
    return str((Path(own).parent / href).resolve())


def _when(item: Any) -> np.datetime64:
    t = item.datetime or item.common_metadata.start_datetime
    if t is None:
        return np.datetime64("NaT", "s")
    if t.tzinfo is not None:
        import datetime as dt

        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return np.datetime64(t.replace(microsecond=0), "s")
