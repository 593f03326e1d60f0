"""``aerial-search remove --store S IMAGE_OR_GLOB...``: take images out of every search."""

from __future__ import annotations

import argparse

from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("remove", help="take images out of every search (status 'removed'; compact reclaims the space)")
    p.add_argument("--store", required=True)
    p.add_argument(
        "images", nargs="+", metavar="IMAGE_OR_GLOB", help="an image path as stored, or a glob on paths or file names"
    )


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.upkeep import remove

    removed = remove(args.store, args.images)
    for path in removed:
        print(f"removed {path}")
    print(
        f"{len(removed)} image(s) removed from every search; `aerial-search compact --store {args.store}` reclaims their slots"
    )
    return 0
