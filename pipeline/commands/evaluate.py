"""``aerial-search evaluate DATASET``: retrieval quality (mAP, precision@k) on a folder-per-class
image set, through the search engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.common import add_index, add_model, index_device
from pipeline.config import Config

DEFAULT_OPTIONS = ("none",)


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="retrieval quality (mAP, precision@k) on a folder-per-class image set")
    p.add_argument("dataset", help="folder with one subfolder of images per class (UC Merced layout)")
    p.add_argument("--out", default="evaluation", help="folder for metrics.json and the pictures")
    p.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS), metavar="OPTIONS",
                   help="post-processing runs: none, l2, hellinger, pca:DIMS, with +dbaN, +qeN, +diffusionN, @ALPHA "
                        f"(default: {' '.join(DEFAULT_OPTIONS)})")  # fmt: skip
    p.add_argument("--tune", action="store_true",
                   help="also pick post/QE/DBA/diffusion settings on half the queries")  # fmt: skip
    p.add_argument("--diffusion-alpha", type=float, default=0.9, help="alpha of +diffusionN options (default 0.9)")
    p.add_argument("--n-examples", type=int, default=0, metavar="N",
                   help="also compare example sets of N positives + N negatives (centroid, nearest, classifier) "
                        "with single-example queries")  # fmt: skip
    add_model(p)
    add_index(p)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline import evaluate
    from pipeline.backbones import ModelSpec
    from pipeline.embed import describe_weights

    options = [evaluate.parse_options(text, args.diffusion_alpha) for text in args.options]  # defaults included
    spec = ModelSpec.from_config(
        cfg.model, describe_weights(cfg.model.arch, cfg.model.weights, cfg.model.seed)["weights_sha256"]
    )
    report = evaluate.evaluate(args.dataset, spec, options, Path(args.out), tune_grid=args.tune,
                               n_examples=args.n_examples, index_device=index_device(cfg),
                               index_dtype=cfg.search.dtype)  # fmt: skip
    print(evaluate.table(report))
    print(f"\nwritten {Path(args.out) / 'metrics.json'}, per_class_ap.png, best_worst.png")
    return 0
