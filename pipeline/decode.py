"""Decoding on the device (``read.decoder: device``): compressed source tiles read as bytes on the
CPU, decoded in batches on the worker's GPU, and assembled there into the chunk + halo that
:mod:`pipeline.tiles` cuts windows from. A GPU node has one card and a few cores; decoding JPEG
on those cores, not the model, set the end-to-end rate (RESULTS.md, "GPU").

**What decodes on the device** (:func:`support` says why anything else does not):

- JPEG-compressed GeoTIFFs (TIFF compression 7), tiled or striped, chunky 8-bit, 3 samples,
  photometric YCbCr (4:2:0 / 4:2:2 / 4:4:4) or RGB: :class:`TileLayout` reads the image file
  directory with tifffile (tile or strip offsets and byte counts, the shared ``JPEGTables``),
  :meth:`TileLayout.streams` reads only the tiles a chunk needs (``os.pread`` locally, ranged
  reads through fsspec for object storage) and makes each a complete JPEG (the tables merged
  after its start-of-image marker), and :func:`decode_jpegs` decodes them all in one call
  (``torchvision.io.decode_jpeg``: nvJPEG on CUDA, batched; libjpeg-turbo on the CPU).
- Plain JPEG files (scene chips, drone frames): the whole file is the stream; the chips of a
  unit (:mod:`pipeline.ingest.graph` groups small images) decode in one batch.

**What stays on the CPU**, with the reason (:func:`support`; the ingest logs one line per reason
with a count of files): deflate, LZW, zstd and other codecs (nvCOMP and nvImageCodec are not
carried: see RESULTS.md), PNG (no GPU decoder), files with a nodata value, mask or alpha band
(the CPU path's mask model), other bands, scaled or non-8-bit pixels, separate planes.
Those files are read exactly as ``read.decoder: pillow`` reads them.

The decode device is the worker's CUDA GPU (``cuda``: each worker of the ``local-cuda`` runtime
sees its own). ``$AERIAL_SEARCH_DECODE_DEVICE=cpu`` runs the very same path on the CPU
(torchvision's libjpeg-turbo decoder): what CI tests; no ingest chooses it otherwise.

torch, torchvision and tifffile are imported inside the functions.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import RasterError

DEVICE_ENV = "AERIAL_SEARCH_DECODE_DEVICE"
JPEG = 7  # TIFF compression: JPEG ("new-style", with JPEGTables)
PHOTOMETRIC = {2: "RGB", 6: "YCbCr"}
JPEG_SUFFIXES = (".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
CODEC_NAMES = {1: "uncompressed", 5: "LZW", 8: "deflate", 32946: "deflate", 34887: "LERC", 50000: "zstd",
               50001: "WebP", 34925: "LZMA", 32773: "PackBits", 6: "old-style JPEG", 34712: "JPEG 2000"}  # fmt: skip


def decode_device() -> str:
    """Where device decoding runs in this process: ``$AERIAL_SEARCH_DECODE_DEVICE`` when set, else ``cuda``."""
    return os.environ.get(DEVICE_ENV) or "cuda"


def available() -> bool:
    """Whether this process can decode on its device: a CUDA GPU torch sees (or the CPU override)."""
    if os.environ.get(DEVICE_ENV) == "cpu":
        return True
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------------------------
# Which files, and why not


def support(path: str, bands: Sequence[int], scale: Any, masked: bool, count: int, dtype: str) -> str | None:
    """None when ``path`` decodes on the device, else the reason it is read on the CPU (one
    phrase, the same for every file it applies to: the ingest counts files per reason)."""
    if tuple(bands) != (1, 2, 3) or scale is not None or dtype != "uint8" or count != 3:
        return "bands other than an 8-bit RGB image's 1, 2, 3 (or --scale): the CPU path selects and scales them"
    if masked:
        return "a nodata value, mask or alpha band: the CPU path reads the mask"
    lower = path.lower()
    if lower.endswith(JPEG_SUFFIXES):
        return None
    if lower.endswith(".png"):
        return "PNG: no GPU decoder (decoded by Pillow on the CPU)"
    if not lower.endswith(TIFF_SUFFIXES):
        return "neither a TIFF nor a JPEG file"
    layout = layout_of(path)
    return layout if isinstance(layout, str) else None


# --------------------------------------------------------------------------------------------
# The compressed tiles of a TIFF


@dataclass(frozen=True)
class TileLayout:
    """Where the JPEG-compressed blocks (tiles, or strips as blocks of full width) of an image's
    first page lie in its file."""

    path: str
    width: int
    height: int
    block_w: int
    block_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes  # JPEGTables: SOI, the shared quantization and Huffman tables, EOI (b"" if none)
    photometric: str

    @property
    def across(self) -> int:
        return -(-self.width // self.block_w)

    def blocks_for(self, rows: tuple[int, int], cols: tuple[int, int]) -> list[tuple[int, int, int]]:
        """``(index, y0, x0)`` of the blocks meeting pixels ``rows x cols``, row-major."""
        by = range(max(rows[0], 0) // self.block_h, (min(rows[1], self.height) - 1) // self.block_h + 1)
        bx = range(max(cols[0], 0) // self.block_w, (min(cols[1], self.width) - 1) // self.block_w + 1)
        return [(y * self.across + x, y * self.block_h, x * self.block_w) for y in by for x in bx]

    def raw(self, indices: Sequence[int]) -> list[bytes]:
        """The compressed bytes of blocks ``indices``, as stored (ranged reads, nothing decoded)."""
        spans = [(self.offsets[i], self.counts[i]) for i in indices]
        if "://" in self.path:
            import fsspec

            with fsspec.open(self.path, "rb") as f:
                out = []
                for off, n in spans:
                    f.seek(off)
                    out.append(f.read(n))
                return out
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return [os.pread(fd, n, off) for off, n in spans]
        finally:
            os.close(fd)

    def streams(self, indices: Sequence[int]) -> list[bytes]:
        """Blocks ``indices`` as complete JPEG streams (:func:`with_tables`)."""
        return [with_tables(self.tables, b) for b in self.raw(indices)]


def with_tables(tables: bytes, block: bytes) -> bytes:
    """A TIFF's abbreviated JPEG block made whole: the shared tables inserted after the block's
    start-of-image marker (the tables' own SOI and EOI dropped), as libtiff feeds libjpeg."""
    if not tables:
        return block
    if tables[:2] != b"\xff\xd8" or tables[-2:] != b"\xff\xd9" or block[:2] != b"\xff\xd8":
        raise ValueError("JPEGTables or a tile are not JPEG streams (no start/end-of-image marker)")
    return b"\xff\xd8" + tables[2:-2] + block[2:]


@functools.lru_cache(maxsize=512)
def _layout(path: str, stamp: tuple) -> TileLayout | str:
    import tifffile

    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f, tifffile.TiffFile(f) as tif:
                return _layout_of_page(path, tif.pages[0])
        with tifffile.TiffFile(path) as tif:
            return _layout_of_page(path, tif.pages[0])
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as e:
        return f"a TIFF tifffile cannot parse ({type(e).__name__}): GDAL reads it"


def layout_of(path: str) -> TileLayout | str:
    """The :class:`TileLayout` of a TIFF, or why its blocks are not decoded on the device
    (cached per path, size and modification time)."""
    stamp: tuple = ()
    if "://" not in path:
        try:
            st = os.stat(path)
        except OSError as e:
            return f"cannot be opened ({e.strerror})"
        stamp = (st.st_size, st.st_mtime_ns)
    return _layout(path, stamp)


def _layout_of_page(path: str, page: Any) -> TileLayout | str:
    comp = int(page.compression)
    if comp != JPEG:
        name = CODEC_NAMES.get(comp, f"TIFF compression {comp}")
        if comp in (5, 8, 32946, 50000):
            return f"{name} compression: no GPU decoder here (nvCOMP is not a dependency), decoded on the CPU"
        return f"{name} compression: decoded on the CPU"
    photometric = PHOTOMETRIC.get(int(page.photometric))
    if photometric is None or int(page.planarconfig) != 1 or int(page.samplesperpixel) != 3 or int(page.bitspersample) != 8:
        return "a JPEG TIFF other than 8-bit chunky RGB/YCbCr: decoded on the CPU"
    if page.is_tiled:
        bw, bh = int(page.tilewidth), int(page.tilelength)
    else:
        bw, bh = int(page.imagewidth), int(min(page.rowsperstrip, page.imagelength))
    return TileLayout(path, int(page.imagewidth), int(page.imagelength), bw, bh, tuple(int(o) for o in page.dataoffsets),
                      tuple(int(c) for c in page.databytecounts), bytes(page.jpegtables or b""), photometric)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Decoding and assembling


_DECODE_LOCK = threading.Lock()


def decode_jpegs(streams: Sequence[bytes], device: str) -> list[Any]:
    """uint8 ``(3, h, w)`` RGB tensors on ``device``, one per JPEG stream, decoded in one call."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return []
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 marks its decoders deprecated (torchcodec)
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out)


@dataclass(frozen=True)
class Request:
    """One region to read: pixels ``rows x cols`` of ``path`` (a JPEG-compressed TIFF or a JPEG file)."""

    path: str
    rows: tuple[int, int]
    cols: tuple[int, int]


def read_regions(requests: Sequence[Request], device: str | None = None) -> list[Any]:
    """uint8 ``(4, h, w)`` tensors on the device (R, G, B and the validity mask, 255: the device
    path takes unmasked files only), one per request; every JPEG stream the requests need is
    decoded in one batch. Raises :class:`RasterError` naming the file on a corrupt stream."""
    import torch

    device = device or decode_device()
    plans: list[tuple[Request, list[tuple[int, int, int]], int]] = []  # request, its blocks (y0, x0, stream #)
    streams: list[bytes] = []
    for r in requests:
        try:
            if r.path.lower().endswith(JPEG_SUFFIXES):
                blocks = [(0, 0, len(streams))]
                streams.append(_read_file(r.path))
            else:
                layout = layout_of(r.path)
                if isinstance(layout, str):
                    raise RasterError(f"{r.path}: cannot be decoded on the device ({layout})")
                found = layout.blocks_for(r.rows, r.cols)
                blocks = [(y0, x0, len(streams) + k) for k, (_, y0, x0) in enumerate(found)]
                streams += layout.streams([i for i, _, _ in found])
        except FileNotFoundError as e:
            raise RasterError(f"{r.path}: does not exist (moved, deleted or offline)") from e
        except (OSError, IndexError, ValueError) as e:
            raise RasterError(f"{r.path}: reading its compressed tiles failed ({e}); the file may be truncated or "
                              f"corrupt: re-copy it or remove it from the sources") from e  # fmt: skip
        plans.append((r, blocks, len(streams)))
    try:
        decoded = decode_jpegs(streams, device)
    except RuntimeError as e:
        names = sorted({r.path for r in requests})
        raise RasterError(f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}: a JPEG stream failed to "
                          f"decode on {device} ({e}); the file may be truncated or corrupt: re-copy it or "
                          f"remove it from the sources") from e  # fmt: skip
    out = []
    for r, blocks, _ in plans:
        (r0, r1), (c0, c1) = r.rows, r.cols
        region = torch.zeros((4, r1 - r0, c1 - c0), dtype=torch.uint8, device=device)
        region[3] = 255
        for y0, x0, k in blocks:
            img = decoded[k]
            h, w = img.shape[1:]
            ya, yb = max(r0, y0), min(r1, y0 + h)
            xa, xb = max(c0, x0), min(c1, x0 + w)
            if ya < yb and xa < xb:
                region[:3, ya - r0 : yb - r0, xa - c0 : xb - c0] = img[:, ya - y0 : yb - y0, xa - x0 : xb - x0]
        out.append(region)
    if str(device).startswith("cuda"):  # decoded and assembled on this thread's stream: ready for the model's
        torch.cuda.current_stream(torch.device(device)).synchronize()
    return out


def _read_file(path: str) -> bytes:
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def as_numpy(block: Any) -> np.ndarray:
    """A block (NumPy, or a tensor from :func:`read_regions`) as a NumPy array on the host."""
    return block if isinstance(block, np.ndarray) else block.cpu().numpy()
