"""``aerial-search info --store S [--images]``: what a store holds, how it was made, what is stale,
and (``--images``) each image with a tile to start searching from."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="summarize a store")
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--images", action="store_true",
                   help="one line per image: status, tiles, date, and the uid of its centre tile to search from")  # fmt: skip


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.summary import images, summarize

    summary = summarize(args.store)
    if args.images:
        summary["image_list"] = images(args.store)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
        if args.images:
            print_images(summary["image_list"])
    return 0


def print_images(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'id':>5}  {'status':<8} {'tiles':>7}  {'acquired':<10}  {'centre uid':>15}  {'lon':>12}  {'lat':>11}  path")
    for r in rows:
        lon = f"{r['lon']:12.6f}" if r["lon"] is not None else f"{'-':>12}"
        lat = f"{r['lat']:11.6f}" if r["lat"] is not None else f"{'-':>11}"
        print(f"{r['id']:>5}  {r['status']:<8} {r['tiles']:>7}  {(r['acquired'] or '-')[:10]:<10}  "
              f"{r['uid'] or '-':>15}  {lon}  {lat}  {r['path']}")  # fmt: skip


def print_summary(summary: dict[str, Any]) -> None:
    model = summary["model"]
    print(f"store         {summary['store']}")
    print(f"created       {summary['created']} by {summary['software']}")
    print(f"images        {summary['images']} {summary['images_by_status']}")
    print(f"tiles         {summary['tiles']} valid of {summary['slots']} slots ({summary['dropped']} dropped)")
    print(
        f"fingerprints  {summary['feature_dim']}-d {summary['fingerprint_dtype']}, {summary['chunk_tiles']} tiles per chunk"
    )
    print(f"model         {model.get('arch')} weights {model.get('weights_id')}")
    for path, why in summary.get("failed", []):
        print(f"failed        {path}: {why}")
    if summary.get("postprocess"):
        print(f"postprocess   {summary['postprocess']}")
    for name, state in summary.get("derived", {}).items():
        print(f"derived       {name}: {state}")
    print(f"on disk       {summary['bytes_on_disk'] / 1e6:.2f} MB")
    dev = summary["index_device_bytes"]
    extra = "".join(f", {k.replace('_', ' ')} {v / 1e6:.2f} MB" for k, v in dev.items() if k not in ("tiles", "dims", "float32", "float16"))
    print(f"device index  float32 {dev['float32'] / 1e6:.2f} MB, float16 {dev['float16'] / 1e6:.2f} MB{extra} "
          f"(search --index-device)")  # fmt: skip
    when = summary["acquired"]
    years = ", ".join(f"{y}: {n}" for y, n in when["per_year"].items())
    if when["from"]:
        print(f"acquired      {when['from']} to {when['to']} (done images per year: {years})")
    elif when["per_year"]:
        print("acquired      unknown for every image (date them: ingest --dates, --date-pattern, or STAC)")
    if summary["lonlat_bounds"]:
        w, s, e, n = summary["lonlat_bounds"]
        print(f"lon/lat box   W {w:.5f} S {s:.5f} E {e:.5f} N {n:.5f}")
