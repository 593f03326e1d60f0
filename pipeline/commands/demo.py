"""``aerial-search demo``: real sample imagery -> ingest -> search -> result sheet."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fetch sample imagery, ingest it, search it, write a result sheet")
    p.add_argument("--out", default="demo", help="output folder (default ./demo)")
    p.add_argument("--model", default="resnet18")
    p.add_argument(
        "--weights",
        help="imagenet | random | FILE (default: ImageNet weights of --model if available, else ImageNet SqueezeNet 1.1 from the package index)",
    )
    p.add_argument("-k", type=int, default=8)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.demo import run

    return run(Path(args.out), args.weights, args.model, args.k)
