"""``aerial-search postprocess --store S --method M [--dba N]``: fit a post-processing into a
store (search applies it) and build the derived arrays that depend on it."""

from __future__ import annotations

import argparse

from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("postprocess", help="fit a fingerprint post-processing into a store (applied by search)")
    p.add_argument("--store", required=True)
    p.add_argument("--method", required=True, choices=["none", "l2", "hellinger", "pca"])
    p.add_argument("--dims", type=int, default=128, help="pca: output dimensions")
    p.add_argument("--sample", type=int, default=200_000, help="pca: fit on at most this many tiles")
    p.add_argument("--dba", type=int, default=0, help="also write database-side augmentation with this many neighbours")
    p.add_argument("--alpha", type=float, default=1.0, help="DBA weight exponent")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.derived import augment_store, fit_store

    t = fit_store(args.store, args.method, args.dims, args.sample)
    dims = "" if t.dims is None else f" ({t.dims} dims)"
    print(f"{args.store}: post-processing {t.method}{dims} saved; search applies it")
    if args.dba:
        n = augment_store(args.store, args.dba, args.alpha)
        print(
            f"{args.store}: fingerprint_dba written for {n} tiles ({args.dba} neighbours); "
            f"adding images marks it stale until this command is run again"
        )
    return 0
