"""Queries from outside the store: image files fingerprinted with the store's own model.

Image size rule (documented in README): a 256 x 256 image is used as is; any other size is
resized (bilinear, antialiased) so that its shorter side is 256 px, then centre-cropped to
256 x 256. GeoTIFFs use the store's band selection and scaling.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from pipeline.backbones import PROBE, STANDIN, ModelSpec
from pipeline.digest import sha256_file
from pipeline.embed import embed_batch, fit_to_window, imagenet_cache_path
from pipeline.errors import SearchError, WeightsError


def spec_from_provenance(prov: dict[str, Any], weights: str | None = None, device: str = "auto") -> ModelSpec:
    """The ModelSpec that made a store's fingerprints, refusing anything that would differ.

    ``weights``: a local copy of the store's weights file (checked by sha256), for stores made
    on another machine.
    """
    model = prov.get("model", {})
    arch, wid, sha = model.get("arch"), str(model.get("weights_id", "")), model.get("weights_sha256", "")
    if arch == STANDIN:
        return ModelSpec(arch=arch, weights="random", device=device)
    if wid.startswith(("random(", f"{PROBE}(")):
        seed = int(re.search(r"seed=(\d+)", wid).group(1))  # type: ignore[union-attr]
        return ModelSpec(arch=arch, weights="random", seed=seed, device=device)
    if wid.startswith("torchvision:") and weights is None:
        cached = imagenet_cache_path(arch)
        if os.path.isfile(cached) and sha and sha256_file(cached) != sha:
            raise WeightsError(f"the torch cache holds {cached} with another sha256 than the store's weights ({sha})")
        return ModelSpec(arch=arch, weights="imagenet", weights_sha256="", device=device)
    path = weights or (wid[len("file:") :] if wid.startswith("file:") else "")
    if not path or not os.path.isfile(path):
        raise WeightsError(
            f"the store's fingerprints were made by {arch} with weights {wid} (sha256 {sha or 'unknown'}), "
            f"which are not available here; pass --weights PATH with a copy of that file"
        )
    actual = sha256_file(path)
    if sha and actual != sha:
        raise WeightsError(
            f"weights file {path} has sha256 {actual}, but the store was made with {sha}; "
            f"queries must be fingerprinted by the same model as the store"
        )
    return ModelSpec(arch=arch, weights=path, weights_sha256=actual, device=device)


def load_image(path: str, bands=(1, 2, 3), scale=None) -> np.ndarray:
    """An image file as uint8 ``(3, 256, 256)`` following the size rule above."""
    if not os.path.isfile(path):
        raise SearchError(f"query image {path} does not exist")
    try:
        if path.lower().endswith((".tif", ".tiff")):
            from pipeline.raster import RasterReader, read_header

            info = read_header(path)
            rgb = RasterReader(path, tuple(bands), scale, info.masked).read((0, info.height), (0, info.width))[:3]
        else:
            from PIL import Image

            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except SearchError:
        raise
    except Exception as e:
        raise SearchError(
            f"query image {path} cannot be read ({type(e).__name__}: {e}); pass a PNG, JPEG or GeoTIFF"
        ) from e
    return fit_to_window(rgb)


MAX_QUERY_PIXELS = 50_000_000  # an uploaded image larger than this is refused before decoding
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_image(data: bytes, what: str, bands=(1, 2, 3), scale=None, max_pixels: int = MAX_QUERY_PIXELS) -> np.ndarray:
    """Image bytes (PNG, JPEG, WebP, TIFF or GeoTIFF: an upload) as uint8 ``(3, 256, 256)``
    following the size rule above. Nothing touches the disk. Anything that does not decode as an
    image, or decodes to more than ``max_pixels``, is a :class:`SearchError` naming ``what``."""
    import io

    try:
        if data[:4] in TIFF_MAGIC:  # GeoTIFFs: the store's band selection and scaling
            from rasterio.io import MemoryFile

            from pipeline.raster import to_uint8

            with MemoryFile(data) as mem, mem.open() as src:
                _check_pixels(src.width * src.height, max_pixels, what)
                if src.count < max(bands):
                    raise SearchError(f"{what} has {src.count} band(s) but the store reads bands {tuple(bands)}")
                rgb = to_uint8(src.read(list(bands)), scale, what)[:3]
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                _check_pixels(im.width * im.height, max_pixels, what)
                rgb = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except SearchError:
        raise
    except Exception as e:
        raise SearchError(f"{what} is not a readable image ({type(e).__name__}); send a PNG, JPEG or GeoTIFF") from e
    if min(rgb.shape[1:]) < 1:
        raise SearchError(f"{what} has no pixels")
    return fit_to_window(rgb)


def _check_pixels(n: int, max_pixels: int, what: str) -> None:
    if n > max_pixels:
        raise SearchError(f"{what} has {n:,} pixels, more than the {max_pixels:,} a query image may have")


def fingerprint_pixels(pixels: np.ndarray, prov: dict[str, Any], weights: str | None = None, device: str = "auto"):
    """Fingerprints ``(m, dim)`` of uint8 windows ``(m, 3, 256, 256)`` by the store's model."""
    return embed_batch(pixels, spec_from_provenance(prov, weights, device))


def fingerprint_images(
    paths: list[str], prov: dict[str, Any], weights: str | None = None, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Fingerprints ``(m, dim)`` and the 256 x 256 pixels ``(m, 3, 256, 256)`` of query images."""
    pre = prov.get("preprocessing", {})
    spec = spec_from_provenance(prov, weights, device)
    pixels = np.stack([load_image(p, pre.get("bands", (1, 2, 3)), pre.get("scale")) for p in paths])
    return embed_batch(pixels, spec), pixels
