"""``aerial-search relocate --store S OLD_PREFIX NEW_PREFIX``: the archive moved."""

from __future__ import annotations

import argparse

from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("relocate", help="the imagery moved: rewrite image paths (checked by size and sha256)")
    p.add_argument("--store", required=True)
    p.add_argument("old_prefix", metavar="OLD_PREFIX", help="the start of the image paths as the store has them")
    p.add_argument("new_prefix", metavar="NEW_PREFIX", help="what replaces it")
    p.add_argument("--dry-run", action="store_true", help="check the new paths, change nothing")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.upkeep import relocate

    r = relocate(args.store, args.old_prefix, args.new_prefix, check_only=args.dry_run)
    verb = "would move" if args.dry_run else "moved"
    for old, new in r.moved[:10]:
        print(f"{verb} {old} -> {new}")
    if len(r.moved) > 10:
        print(f"... and {len(r.moved) - 10} more")
    print(f"{len(r.moved)} image path(s) {'checked' if args.dry_run else 'relocated'}")
    return 0
