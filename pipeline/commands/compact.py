"""``aerial-search compact --store S [--out S2]``: drop the slots of removed and replaced images."""

from __future__ import annotations

import argparse

from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("compact", help="rewrite a store without removed/replaced images and padding (uids unchanged)")
    p.add_argument("--store", required=True)
    p.add_argument("--out", help="write the compacted store here instead of replacing --store")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.upkeep import compact

    s = compact(args.store, args.out)
    print(
        f"{s['store']}: {s['slots_before']} slots -> {s['slots_after']} ({s['images_dropped']} image(s) dropped); uids unchanged"
    )
    return 0
