"""``aerial-search ingest SOURCE... --store S``: fingerprint GeoTIFFs into a Zarr store."""

from __future__ import annotations

import argparse

from pipeline.commands.common import add_cluster, add_common, add_model, float_list, int_list
from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("ingest", help="fingerprint GeoTIFFs into a Zarr store")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="GeoTIFF, folder (recursive), .txt list of paths, or a STAC ItemCollection / catalogue "
                        "(.json, local or s3/https)")  # fmt: skip
    p.add_argument("--store", required=True, help="path of the Zarr store to create")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing store (only once the new one is complete)"
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable file (default: report it, go on)"
    )
    g = p.add_argument_group("acquisition times (image table `acquired`; a STAC item's datetime comes first)")
    g.add_argument("--dates", metavar="FILE", help="CSV with a header path,acquired (ISO 8601, UTC without an offset)")
    g.add_argument("--date-pattern", metavar="REGEX",
                   help="named groups over the file name (else the path): (?P<date>...) or (?P<year>...)(?P<month>...)(?P<day>...); "
                        "NAIP: '_(?P<date>\\d{8})\\.tif$'. Without these, EXIF DateTimeOriginal or the TIFF DateTime tag")  # fmt: skip
    g.add_argument("--asset", help="STAC sources: the items' asset to ingest (default: the first RGB GeoTIFF/COG)")
    add_common(p)
    add_model(p)
    g = p.add_argument_group("tiling and layout")
    g.add_argument("--bands", dest="tiling.bands", type=int_list, help="three 1-based bands as R,G,B (default 1,2,3)")
    g.add_argument("--scale", dest="tiling.scale", type=float_list(2), help="MIN,MAX -> 0..255 for non-uint8 imagery")
    g.add_argument(
        "--black-level", dest="tiling.black_level", type=int, help="pixels with all bands <= this are nodata"
    )
    g.add_argument("--mode", dest="model.mode", choices=["exact", "dense"],
                   help="exact (default): every window through the CNN on its own; dense: one pass per chunk, "
                        "windows pooled from the shared feature map (2.7x faster end to end on 2 CPU cores, "
                        "fingerprints close to but not equal to exact ones)")  # fmt: skip
    g.add_argument("--context-px", dest="model.context_px", type=int,
                   help="dense: pixels of surroundings read around each chunk (default 64)")  # fmt: skip
    g.add_argument("--decoder", dest="read.decoder", choices=["auto", "pillow", "gdal", "device"],
                   help="who decodes pixels: auto (default; device where the workers have a CUDA GPU and sources "
                        "decode there, else pillow) | pillow (Pillow for local RGB JPEG/PNG, GDAL the rest) | "
                        "gdal | device (JPEG GeoTIFF tiles and JPEG files on the GPU, the rest on the CPU)")  # fmt: skip
    g.add_argument("--chunk-px", dest="read.chunk_px", type=int, help="read chunk side in pixels (multiple of 128)")
    g.add_argument("--dtype", dest="store.dtype", choices=["float32", "float16"], help="fingerprint dtype in the store")
    g.add_argument("--chunk-tiles", dest="store.chunk_tiles", type=int, help="tiles per Zarr chunk")
    g.add_argument("--hash", dest="store.content_hash", action="store_true", default=None,
                   help="recognise unchanged images by content sha256 instead of size + modification time")  # fmt: skip
    g.add_argument("--compressor", dest="store.compressor", choices=["lz4", "zstd", "none"], help="fingerprint codec")
    add_cluster(p)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.dates import DateSources, compile_pattern
    from pipeline.ingest import ingest

    if args.date_pattern:
        compile_pattern(args.date_pattern)  # a bad pattern: said before anything is read
    dates = DateSources(csv_path=args.dates or "", pattern=args.date_pattern or "")
    report = ingest(args.sources, args.store, cfg, overwrite=args.overwrite, strict=args.strict, dates=dates,
                    asset=args.asset)  # fmt: skip
    print(report)
    return 1 if report.failed else 0
