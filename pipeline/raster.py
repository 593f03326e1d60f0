"""Lazy GeoTIFF reading aligned to the window grid.

Headers are read up front in the driver (:func:`read_header`, cheap). Pixels are read inside the
workers by :class:`RasterReader`, a frozen dataclass that pickles as its arguments and opens the
file only when a chunk is read, so a graph never carries an open handle or an image.

A read returns channels ``R, G, B, M``: the three selected bands scaled to uint8 and the file's
validity mask (255 valid, 0 masked by nodata value, mask or alpha band). The dask array of an
image's grid chunks with their halo is built by :func:`pipeline.ingest.graph.lazy_overlapped`;
this module has no dask.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import grid
from pipeline.errors import RasterError

__all__ = ["ImageInfo", "RasterError", "RasterReader", "check_image", "expand_sources", "read_header"]

IMAGE_SUFFIXES = (".tif", ".tiff")
BLOCKED_DRIVERS = ("GTiff", "COG")  # read by block: probing the last pixel costs one block
# Local files that ``read.decoder: auto`` reads with Pillow when they are plain 8-bit RGB: for
# scene-classification sets of small JPEGs, GDAL's open + decode is 2.7x Pillow's (UC Merced,
# bare reads on 2 cores: 744 against 2,039 windows/s, benchmarks/driver.py --floor-only), and
# query images of these formats are decoded by Pillow already. Headers go to GDAL whenever it
# could georeference or mask the file (:func:`_pillow_header`).
PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png")
LIST_SUFFIXES = (".txt", ".lst", ".list")


def is_uri(path: str) -> bool:
    return "://" in path


def expand_sources(sources: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Resolve SOURCE arguments to a sorted, de-duplicated list of image paths.

    A SOURCE is an image file (any format GDAL reads), a folder (searched recursively, see
    :func:`_folder_images`), a text file (``.txt``/``.lst``/``.list``) with one path or URI per
    line (``#`` comments allowed), or a URI (``s3://``, ``gs://``, ``https://``) passed to GDAL;
    a URI ending in ``/`` is a prefix, listed like a folder. Local paths become absolute.
    """
    found: list[str] = []
    for src in sources:
        s = os.fspath(src)
        if is_uri(s):
            found.extend(_expand_uri(s))
            continue
        p = Path(s).expanduser()
        if p.is_dir():
            kinds = IMAGE_SUFFIXES + PILLOW_SUFFIXES
            names = [str(q.resolve()) for q in p.rglob("*") if q.suffix.lower() in kinds and q.is_file()]
            found.extend(_folder_images(names, f"folder {p}"))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            base = p.resolve().parent
            for line in p.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                found.extend(expand_sources([line if is_uri(line) else str(base / line)]))
        elif p.is_file():
            found.append(str(p.resolve()))
        else:
            raise RasterError(f"source {s} does not exist: pass a GeoTIFF, a folder of them, or a .txt list of paths")
    unique = sorted(set(found))
    if len(unique) < len(found):
        warnings.warn(f"{len(found) - len(unique)} duplicate source path(s) ignored", stacklevel=2)
    return unique


def _expand_uri(uri: str) -> list[str]:
    """An object-storage URI: the object itself, or the images under a prefix ending in / (:func:`_folder_images`)."""
    if not uri.endswith("/"):
        return [uri]
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    protocol = uri.split("://", 1)[0]
    return _folder_images([f"{protocol}://{k}" for k in fs.find(root)], uri)


def _folder_images(names: list[str], where: str) -> list[str]:
    """The images of a folder's (or a prefix's) recursive listing ``names``: its GeoTIFFs
    (``*.tif``/``*.tiff``, any case); a folder without any, a scene-classification set say, gives
    its JPEG and PNG images instead. JPEG/PNG files beside GeoTIFFs (previews, quicklooks) are
    left out with a warning: a ``.txt`` list of paths takes them too."""
    tifs = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    pictures = [n for n in names if n.lower().endswith(PILLOW_SUFFIXES)]
    if tifs and pictures:
        warnings.warn(
            f"{where}: {len(pictures)} JPEG/PNG file(s) beside its {len(tifs)} GeoTIFF(s) left out (previews?); "
            f"list them in a .txt source to ingest them as well",
            stacklevel=3,
        )
    if not tifs and not pictures:
        warnings.warn(f"{where} holds no *.tif/*.tiff (or *.jpg/*.jpeg/*.png) images", stacklevel=3)
    return tifs or pictures


@dataclass(frozen=True)
class ImageInfo:
    """What the driver knows about an image before any pixel is read."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str  # "" when the file has no CRS
    transform: tuple[float, float, float, float, float, float]  # affine a, b, c, d, e, f
    size: int  # bytes on disk (-1 when unknown, e.g. some URIs)
    mtime: float  # seconds since the epoch (nan when unknown)
    masked: bool  # the file has a nodata value, mask or alpha band
    datetime_tag: str = ""  # the file's own time as written ("" without one; :func:`capture_time`): pipeline.dates reads it

    @property
    def n_windows(self) -> int:
        return grid.windows_per_axis(self.height) * grid.windows_per_axis(self.width)


# GDAL lists a file's whole folder on every open to look for sidecar files (.aux.xml, .msk,
# .ovr): in a folder of 10,000 chips that doubled the cost of each open (1.2 -> 0.6 ms,
# benchmarks/driver.py). TRUE still finds sidecars, by looking them up one by one. A value the
# user set (EMPTY_DIR for object storage, say) is kept.
os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "TRUE")


@functools.cache
def _quiet() -> None:
    """Silence rasterio's NotGeoreferencedWarning, once per process: a missing CRS is reported by
    check_image, once per file (a per-call ``catch_warnings`` is not thread-safe)."""
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


def read_header(path: str, decoder: str = "auto") -> ImageInfo:
    """Open ``path`` and read its header. A tiled or striped format (GeoTIFF, COG) also has its
    last pixel probed, which decodes one block and catches truncated files before any work; a
    format without blocks (JPEG, PNG) would have to be decoded whole for that, so a truncated
    one is caught when its pixels are read (and recorded as failed then).

    With any ``decoder`` but gdal, a local plain-RGB JPEG or PNG that GDAL would see as such (no sidecar
    file that could georeference or mask it, no transparency, nothing after a JPEG's end) has
    its header read by Pillow: the same facts (no CRS, the identity transform, no mask) in about
    half of GDAL's time (0.17 against 0.33 ms on UC Merced)."""
    info = _pillow_header(path) if decoder != "gdal" else None
    if info is None:
        info = _gdal_header(path)
    if not is_uri(path):
        st = os.stat(path)
        info = ImageInfo(**{**info.__dict__, "size": st.st_size, "mtime": st.st_mtime})
    else:
        info = ImageInfo(**{**info.__dict__, **_object_facts(path)})
    return info


# Files next to an image through which GDAL may georeference or mask it: PAM (.aux.xml), old
# .aux, .msk masks, world files (.jgw/.jpgw/.pgw/.pngw/.wld), MapInfo .tab, .prj.
def _sidecars(path: str) -> list[str]:
    stem, ext = os.path.splitext(path)
    e = ext[1:]
    names = [f"{path}.aux.xml", f"{path}.msk", f"{stem}.aux"]
    for suffix in (f"{e[0]}{e[-1]}w", f"{e}w", "wld", "tab", "prj"):
        names += [f"{stem}.{suffix}", f"{stem}.{suffix.upper()}"]
    return names


EXIF_IFD, DATETIME_ORIGINAL, DATETIME = 0x8769, 36867, 306


def capture_time(tags: dict[str, str]) -> str:
    """The time a file says it was taken, as written: EXIF ``DateTimeOriginal`` (the camera's
    capture time: drone frames), else the TIFF ``DateTime`` tag, else EXIF ``DateTime`` (both
    the time the file was last written); ``""`` without any. ``tags``: GDAL's metadata
    (``EXIF_*`` and ``TIFFTAG_*`` keys)."""
    for key in ("EXIF_DateTimeOriginal", "TIFFTAG_DATETIME", "EXIF_DateTime"):
        value = str(tags.get(key, "")).strip().strip("\x00").strip()
        if value:
            return value
    return ""


def _pillow_header(path: str) -> ImageInfo | None:
    """The header of a local plain-RGB JPEG/PNG without sidecars, by Pillow; None otherwise."""
    if not path.lower().endswith(PILLOW_SUFFIXES) or is_uri(path):
        return None
    if any(os.path.exists(p) for p in _sidecars(path)):
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode != "RGB" or im.format not in ("JPEG", "PNG") or "transparency" in im.info:
                return None
            (width, height), fmt = im.size, im.format
            exif = im.getexif()
            when = capture_time({"EXIF_DateTimeOriginal": exif.get_ifd(EXIF_IFD).get(DATETIME_ORIGINAL, ""),
                                 "EXIF_DateTime": exif.get(DATETIME, "")})  # fmt: skip
        if fmt == "JPEG":  # GDAL appends its internal masks after the JPEG's end marker
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                if f.read(2) != b"\xff\xd9":
                    return None
    except Exception:  # noqa: BLE001 (GDAL reads it, and reports any error its own way)
        return None
    return ImageInfo(path, width, height, 3, "uint8", "", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), -1, float("nan"), False,
                     datetime_tag=when)  # fmt: skip


def _gdal_header(path: str) -> ImageInfo:
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    try:
        _quiet()
        with rasterio.open(path) as ds:
            if ds.driver in BLOCKED_DRIVERS:
                ds.read(1, window=Window(ds.width - 1, ds.height - 1, 1, 1))
            masked = any(flags != [MaskFlags.all_valid] for flags in ds.mask_flag_enums)
            crs = ds.crs.to_string() if ds.crs else ""
            t = ds.transform
            info = ImageInfo(
                path=path,
                width=ds.width,
                height=ds.height,
                count=ds.count,
                dtype=ds.dtypes[0],
                crs=crs,
                transform=(t.a, t.b, t.c, t.d, t.e, t.f),
                size=-1,
                mtime=float("nan"),
                masked=masked,
                datetime_tag=capture_time({**ds.tags(ns="EXIF"), **ds.tags()}),
            )
    except RasterioError as e:
        raise RasterError(
            f"{path}: cannot be read as a raster ({e}); check that the file is a complete GeoTIFF "
            f"(re-copy or re-download it) or remove it from the sources"
        ) from e
    return info


def _object_facts(uri: str) -> dict:
    """Size and modification time of an object, where fsspec can tell (else -1 / nan)."""
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
        meta = fs.info(root)
    except Exception:  # no fsspec driver or no listing rights: the facts are optional
        return {}
    mtime = meta.get("LastModified") or meta.get("mtime") or meta.get("updated")
    return {
        "size": int(meta.get("size", -1)),
        "mtime": float(mtime.timestamp()) if hasattr(mtime, "timestamp") else float("nan"),
    }


def check_image(info: ImageInfo, bands: Sequence[int], scale: Sequence[float] | None) -> list[tuple[str, str]]:
    """Refuse images the tiler cannot use (RasterError naming the file and the setting to
    change); return notes on usable ones as ``(kind, message)``: ``nocrs`` (lon/lat will be NaN)
    and ``small`` (no window fits). The caller decides how to report many of them."""
    missing = [b for b in bands if b > info.count]
    if missing:
        hint = (
            "set tiling.bands: [1, 1, 1] (--bands 1,1,1) to use a single grey band as RGB"
            if info.count < 3
            else f"choose three of bands 1..{info.count} with tiling.bands (--bands)"
        )
        raise RasterError(f"{info.path}: has {info.count} band(s) but tiling.bands asks for {list(bands)}; {hint}")
    if info.dtype != "uint8" and scale is None:
        raise RasterError(
            f"{info.path}: pixels are {info.dtype}, not uint8; set tiling.scale: [min, max] (--scale MIN,MAX) "
            f"to map that value range to 0..255, e.g. --scale 0,4095 for 12-bit imagery"
        )
    notes = []
    if not info.crs:
        notes.append(
            ("nocrs", f"{info.path}: no CRS; its tiles are kept but lon/lat are NaN (x/y are pixel coordinates)")
        )
    if info.width < grid.TILE or info.height < grid.TILE:
        notes.append(
            (
                "small",
                f"{info.path}: {info.width} x {info.height} px is smaller than one {grid.TILE} px window; it yields no tiles",
            )
        )
    return notes


@dataclass(frozen=True)
class RasterReader:
    """A picklable recipe for windowed reads of one image: opened in the worker, per read."""

    path: str
    bands: tuple[int, ...] = (1, 2, 3)
    scale: tuple[float, float] | None = None
    masked: bool = False
    decoder: str = "auto"  # gdal: GDAL always | any other: Pillow for local plain-RGB JPEG/PNG files, GDAL otherwise
    on_device: bool = False  # decoded on the worker's device (pipeline.decode; the graph's read task batches them)

    def read(self, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """Read pixels ``rows x cols`` as uint8 ``(4, h, w)``: R, G, B and the validity mask M (on
        the device, a tensor, when :attr:`on_device`: :func:`pipeline.decode.read_regions`)."""
        if self.on_device:
            from pipeline import decode

            return decode.read_regions([decode.Request(self.path, rows, cols)])[0]
        if self.uses_pillow:
            out = self._read_pillow(rows, cols)
            if out is not None:
                return out
        return self._read_gdal(rows, cols)

    @property
    def uses_pillow(self) -> bool:
        """Whether :meth:`read` tries Pillow first: ``decoder`` not gdal, a local JPEG or PNG, bands
        1, 2, 3 of 8-bit pixels without a mask (anything else needs GDAL's band and mask model)."""
        return (
            self.decoder != "gdal"
            and self.path.lower().endswith(PILLOW_SUFFIXES)
            and not is_uri(self.path)
            and tuple(self.bands) == (1, 2, 3)
            and self.scale is None
            and not self.masked
        )

    def _read_pillow(self, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray | None:
        """Pillow's decode of an RGB file (None for any other mode: GDAL reads it)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.path) as im:
                if im.mode != "RGB":
                    return None
                px = np.asarray(im.crop((cols[0], rows[0], cols[1], rows[1])))
        except FileNotFoundError as e:
            raise self._missing() from e
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise self._corrupt(rows, cols, e) from e
        out = np.empty((4, rows[1] - rows[0], cols[1] - cols[0]), dtype=np.uint8)
        out[:3] = px.transpose(2, 0, 1)
        out[3] = 255
        return out

    def _missing(self) -> RasterError:
        return RasterError(
            f"{self.path}: does not exist (moved, deleted or offline); if the archive moved, "
            f"`aerial-search relocate --store STORE OLD_PREFIX NEW_PREFIX` points the store at it"
        )

    def _corrupt(self, rows: tuple[int, int], cols: tuple[int, int], e: Exception) -> RasterError:
        return RasterError(
            f"{self.path}: reading rows {rows[0]}:{rows[1]}, cols {cols[0]}:{cols[1]} failed ({e}); "
            f"the file may be truncated or corrupt: re-copy it or remove it from the sources"
        )

    def _read_gdal(self, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        import rasterio
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        window = Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0])
        out = np.empty((4, rows[1] - rows[0], cols[1] - cols[0]), dtype=np.uint8)
        try:
            _quiet()
            with rasterio.open(self.path) as ds:
                data = ds.read(list(self.bands), window=window)
                if self.masked:
                    out[3] = ds.dataset_mask(window=window)
                else:
                    out[3] = 255
        except RasterioError as e:
            if not is_uri(self.path) and not os.path.exists(self.path):
                raise self._missing() from e
            raise self._corrupt(rows, cols, e) from e
        out[:3] = to_uint8(data, self.scale, self.path)
        if data.dtype.kind == "f":
            out[3][~np.isfinite(data).all(axis=0)] = 0
        return out


def to_uint8(data: np.ndarray, scale: Sequence[float] | None, path: str = "<array>") -> np.ndarray:
    """Map pixel values to uint8: identity for uint8, linear ``[min, max] -> [0, 255]`` otherwise."""
    if data.dtype == np.uint8:
        return data
    if scale is None:
        raise RasterError(f"{path}: pixels are {data.dtype}; set tiling.scale: [min, max] (--scale MIN,MAX)")
    lo, hi = float(scale[0]), float(scale[1])
    scaled = (data.astype(np.float32) - lo) * np.float32(255.0 / (hi - lo))
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8)
