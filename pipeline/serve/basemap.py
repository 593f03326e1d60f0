"""Pixels for the page, read from the archive itself (no internet, no tile server elsewhere):

- :class:`Basemap`: XYZ tiles (Web Mercator, 256 px) cut from the source GeoTIFFs by rio-tiler,
  several images mosaicked (the most recently acquired wins where they overlap, then undated
  images by id; transparent where none), optionally only the images of a date range;
- image footprints in EPSG:4326 (each image's outline, edges densified through its CRS);
- previews of whole images (decimated reads), for images without a CRS, which have no place
  on the map and are searched from the gallery view.

Sources are the store's own image paths, looked up by image id: no request names a file.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.geo import to_lonlat

# Tiles of images without overviews read more pixels, which is what a folder of drone images is:
# rio-tiler's note about it would repeat on every tile.
warnings.filterwarnings("ignore", message=".*has no Overviews.*")

EDGE_POINTS = 16  # points per footprint edge: outlines follow the projection, not just the corners
MAX_ZOOM = 26
MIN_PIXELS = 4  # an image narrower than this on a tile is left to its footprint outline
CACHE_TILES = 512  # rendered tiles kept (PNG bytes, ~10-200 kB each)


def footprint_ring(transform: Sequence[float], crs: str, width: int, height: int) -> list[list[float]] | None:
    """An image's outline as a closed lon/lat ring, or None without a CRS."""
    if not crs:
        return None
    t = np.linspace(0.0, 1.0, EDGE_POINTS, endpoint=False)
    cols = np.concatenate([t * width, np.full_like(t, width), (1 - t) * width, np.zeros_like(t), [0.0]])
    rows = np.concatenate([np.zeros_like(t), t * height, np.full_like(t, height), (1 - t) * height, [0.0]])
    a, b, c, d, e, f = (float(v) for v in transform)
    lon, lat = to_lonlat(a * cols + b * rows + c, d * cols + e * rows + f, crs)
    if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
        return None
    return [[round(float(x), 9), round(float(y), 9)] for x, y in zip(lon, lat)]


def encode_png(rgb: np.ndarray, size: int | None = None) -> bytes:
    """uint8 ``(3, h, w)`` (or ``(4, h, w)`` with alpha) as PNG bytes, optionally resized so
    its longer side is ``size``."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(np.moveaxis(rgb, 0, -1)))
    if size and max(im.size) != size:
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)  # level 3: most of the size for a fraction of the time
    return buf.getvalue()


class Basemap:
    """XYZ tiles of the images that have a CRS.

    ``paths``, ``rings``: per image id (ring None: not on the map); ``bands``, ``scale``: the
    store's preprocessing (non-uint8 pixels are mapped to uint8 with ``scale`` as ingest does);
    ``acquired``: per image id (``datetime64``, NaT unknown), which orders the mosaic: where
    flights overlap, the map shows the latest one, as a map of "now" should.
    """

    def __init__(self, paths: Sequence[str], rings: Sequence[list | None], bands: Sequence[int], scale: Any,
                 acquired: np.ndarray | None = None):  # fmt: skip
        # rio-tiler's modules import each other: a first import from several request threads at
        # once can see one half-initialized, so they are imported here, before any request.
        import morecantile  # noqa: F401
        import rio_tiler.io  # noqa: F401
        import rio_tiler.mosaic  # noqa: F401

        self.paths = [str(p) for p in paths]
        self.bands = tuple(int(b) for b in bands)
        self.scale = tuple(scale) if scale else None
        boxes = np.full((len(paths), 4), np.nan)
        for i, ring in enumerate(rings):
            if ring is not None:
                xy = np.asarray(ring)
                boxes[i] = xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()
        self.boxes = boxes
        when = np.asarray(acquired if acquired is not None else np.full(len(paths), "NaT"), "datetime64[s]")
        undated = np.isnat(when)
        newest = np.where(undated, 0, -when.astype(np.int64))
        # undated last, newest first, ties by id (np.lexsort: the last key is the primary one)
        self.order = np.lexsort((np.arange(len(paths)), newest, undated))
        self._empty: bytes | None = None
        self._cache: OrderedDict[tuple[int, int, int, Any], bytes] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def empty(self) -> bytes:
        """A transparent 256 x 256 PNG (where no image covers a tile)."""
        if self._empty is None:
            self._empty = encode_png(np.zeros((4, 256, 256), np.uint8))
        return self._empty

    def images_in(self, z: int, x: int, y: int, keep: np.ndarray | None = None) -> list[int]:
        """Ids of the images whose lon/lat box meets tile ``z/x/y`` and spans at least
        :data:`MIN_PIXELS` of it (zoomed out, the footprints show where images are; reading
        whole images to draw a few pixels each would make every world-view tile slow), in mosaic
        order (latest acquired first); ``keep``: a boolean per image id, only those."""
        import morecantile

        w, s, e, n = morecantile.tms.get("WebMercatorQuad").bounds(morecantile.Tile(x, y, z))
        b = self.boxes
        with np.errstate(invalid="ignore"):
            hit = (b[:, 0] <= e) & (b[:, 2] >= w) & (b[:, 1] <= n) & (b[:, 3] >= s)
            big = np.maximum((b[:, 2] - b[:, 0]) / (e - w), (b[:, 3] - b[:, 1]) / (n - s)) * 256 >= MIN_PIXELS
        use = hit & big if keep is None else hit & big & keep
        return [int(i) for i in self.order if use[i]]

    def tile(self, z: int, x: int, y: int, keep: np.ndarray | None = None, key: Any = None) -> bytes:
        """PNG bytes of tile ``z/x/y`` (the transparent tile where no image covers it) of the
        images ``keep`` marks (all when None; ``key`` names that selection in the cache, e.g. a
        date range); the latest :data:`CACHE_TILES` are kept."""
        key = (z, x, y, key)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        png = self._render(z, x, y, keep)
        with self._lock:
            self._cache[key] = png
            while len(self._cache) > CACHE_TILES:
                self._cache.popitem(last=False)
        return png

    def _render(self, z: int, x: int, y: int, keep: np.ndarray | None) -> bytes:
        from rasterio.enums import MaskFlags
        from rasterio.errors import RasterioIOError
        from rio_tiler.errors import TileOutsideBounds
        from rio_tiler.io import Reader
        from rio_tiler.mosaic import mosaic_reader

        if not (0 <= z <= MAX_ZOOM and 0 <= x < 1 << z and 0 <= y < 1 << z):
            raise ValueError(f"tile {z}/{x}/{y} does not exist (zoom 0..{MAX_ZOOM}, x and y 0..2**zoom - 1)")
        ids = self.images_in(z, x, y, keep)
        if not ids:
            return self.empty

        def read(path: str, *args: Any, **kwargs: Any):
            with Reader(path) as src:
                if src.dataset.nodata is None and MaskFlags.all_valid in src.dataset.mask_flag_enums[0]:
                    kwargs["nodata"] = 0  # no nodata, mask or alpha: black borders are nodata, as for ingest
                return src.tile(*args, **kwargs)

        try:
            img, _ = mosaic_reader(
                [self.paths[i] for i in ids], read, x, y, z, threads=0, tilesize=256, indexes=self.bands,
                allowed_exceptions=(TileOutsideBounds, RasterioIOError),  # a moved file: not drawn
            )  # fmt: skip
        except Exception as e:  # every image missed the tile (rio-tiler: EmptyMosaicError)
            if type(e).__name__ == "EmptyMosaicError":
                return self.empty
            raise
        if img.data.dtype != np.uint8:
            lo, hi = self.scale if self.scale else (float(np.nanmin(img.array)), float(np.nanmax(img.array)) or 1.0)
            img = img.rescale(in_range=((lo, hi),) * img.count)
        return img.render(img_format="PNG")


def preview(path: str, bands: Sequence[int], scale: Any, max_size: int = 1024) -> tuple[bytes, float]:
    """A whole image, decimated so its longer side is at most ``max_size``, as PNG bytes, and the
    factor from preview pixels to image pixels."""
    import rasterio
    from rasterio.enums import Resampling

    from pipeline.raster import to_uint8

    with rasterio.open(path) as src:
        factor = max(1.0, max(src.width, src.height) / max_size)
        shape = (len(bands), max(1, round(src.height / factor)), max(1, round(src.width / factor)))
        data = src.read(list(bands), out_shape=shape, resampling=Resampling.average)
    rgb = to_uint8(data, tuple(scale) if scale else None, path)[:3]
    return encode_png(rgb), factor
