"""``aerial-search postprocess --store S [--method M] [--dba N] [--codes binary [--bits B] | pq [--m M]]``: fit a
post-processing into a store (search applies it) and build the derived arrays that depend on it."""

from __future__ import annotations

import argparse

from pipeline.commands.common import add_index, index_device
from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("postprocess", help="fit a fingerprint post-processing into a store (applied by search)")
    p.add_argument("--store", required=True)
    p.add_argument("--method", choices=["none", "l2", "hellinger", "pca"],
                   help="post-processing to fit (refits drop derived arrays); omit to keep the store's own")  # fmt: skip
    p.add_argument("--dims", type=int, default=128, help="pca: output dimensions")
    p.add_argument("--sample", type=int, default=200_000, help="pca: fit on at most this many tiles")
    p.add_argument("--dba", type=int, default=0, help="also write database-side augmentation with this many neighbours")
    p.add_argument("--alpha", type=float, default=1.0, help="DBA weight exponent")
    p.add_argument("--codes", choices=["binary", "pq"],
                   help="also write compressed codes of the search space (search --codes scans them): binary "
                        "(ITQ rotation, Hamming scan) or pq (product quantization, table look-ups)")  # fmt: skip
    p.add_argument("--bits", type=int, default=None, help="binary codes: bits per tile (default min(512, dims))")
    p.add_argument("--m", type=int, default=None,
                   help="pq codes: subspaces = bytes per tile, dividing the dimensions (default 64)")  # fmt: skip
    p.add_argument("--codes-sample", type=int, default=100_000, help="codes: fit on at most this many tiles")
    p.add_argument("--knn", type=int, default=0,
                   help="also write the k-NN graph (knn_uid / knn_sim) with this many neighbours (search --diffusion)")  # fmt: skip
    add_index(p)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.derived import augment_store, build_knn, encode_store, fit_store
    from pipeline.errors import ConfigError

    if (args.bits is not None or args.m is not None) and not args.codes:
        raise ConfigError("--bits and --m describe codes: add --codes binary (with --bits) or --codes pq (with --m)")
    if args.method is None and not (args.dba or args.codes or args.knn):
        raise ConfigError("nothing to do: pass --method (a post-processing), --dba N, --codes binary|pq and/or --knn K")
    if args.method is not None:
        t = fit_store(args.store, args.method, args.dims, args.sample)
        dims = "" if t.dims is None else f" ({t.dims} dims)"
        print(f"{args.store}: post-processing {t.method}{dims} saved; search applies it")
    if args.dba:
        n = augment_store(args.store, args.dba, args.alpha, device=index_device(cfg), dtype=cfg.search.dtype)
        print(
            f"{args.store}: fingerprint_dba written for {n} tiles ({args.dba} neighbours); "
            f"adding images marks it stale until this command is run again"
        )
    if args.codes:
        info = encode_store(args.store, args.codes, args.bits, args.codes_sample, m=args.m)
        size = f"{info['m']}-byte pq" if args.codes == "pq" else f"{info['bits']}-bit {info['kind']}"
        print(
            f"{args.store}: {size} codes written for {info['tiles']} tiles "
            f"({info['bits'] // 8} bytes each, fitted on {info['fitted_on_tiles']}); search --codes scans them"
        )
    if args.knn:
        device = index_device(cfg)
        info = build_knn(args.store, args.knn, batch=4096 if device.startswith("cuda") else 512, device=device,
                         dtype=cfg.search.dtype)  # fmt: skip
        n, sec = info["tiles"], info["seconds"]
        if info.get("method") == "ivf":
            how = (f"grown by {info['grown_by']} new tiles" if info.get("grown_by") else
                   f"inverted lists: {info['cells']} cells, {info['nprobe']} probed per tile, {info['dims']} dims, "
                   f"refined exactly")  # fmt: skip
        else:
            how = f"the search engine, {info['index_dtype']} on {info['index_device']}, every pair"
        print(
            f"{args.store}: k-NN graph written ({args.knn} neighbours of {n} tiles) in {sec:.1f} s, {n / max(sec, 1e-9):.0f} "
            f"tiles/s ({how}); search --diffusion uses it; adding images marks it stale and the same command grows it"
        )
    return 0
