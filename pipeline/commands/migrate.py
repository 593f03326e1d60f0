"""``aerial-search migrate --store S``: upgrade a store written by an older release."""

from __future__ import annotations

import argparse

from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("migrate", help="upgrade a store of an older schema version in place")
    p.add_argument("--store", required=True)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.upkeep import migrate

    old, new = migrate(args.store)
    print(
        f"{args.store}: schema version {old} -> {new}" if old != new else f"{args.store}: already schema version {new}"
    )
    return 0
