"""``aerial-search classify --store S --examples FILE [-k K | --min-score P]``: fit a light
classifier on example tiles and score every tile of the store with it."""

from __future__ import annotations

import argparse

from pipeline.commands.common import (
    add_cluster,
    add_common,
    add_examples,
    add_filters,
    add_index,
    add_outputs,
    example_pixels,
    example_refs,
    filters_of,
    k_or_threshold,
    use_index,
    write_outputs,
)
from pipeline.config import Config
from pipeline.errors import SearchError


def add_parser(sub) -> None:
    p = sub.add_parser("classify", help="fit a classifier on example tiles and score every tile with it")
    p.add_argument("--store", required=True)
    p.add_argument("-k", type=int, help="the k tiles most likely positive (default 10)")
    p.add_argument("--min-score", type=float, help="instead of -k: every tile with probability at least this")
    add_examples(p, " (the training set; or --load a saved model)")
    g = p.add_argument_group("model")
    g.add_argument("--background", type=int, default=200,
                   help="random tiles of the store added as negatives (default 200; they overlap no example)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of the background draw and the folds")
    g.add_argument("--save", metavar="MODEL.json", help="save the fitted model")
    g.add_argument(
        "--load", metavar="MODEL.json", help="score with a saved model (fitted on this store's fingerprints)"
    )
    g.add_argument("--raw", action="store_true", help="fit on raw fingerprints, ignoring the store's post-processing")
    add_filters(p)
    add_outputs(p, "--min-score")
    add_index(p)
    add_common(p)
    add_cluster(p)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.classify import Classifier, fit
    from pipeline.cluster import runtime
    from pipeline.examples import example_set
    from pipeline.search import SearchIndex

    k, threshold = k_or_threshold(args.k, args.min_score, "--min-score")
    pos, neg = example_refs(args)
    if args.load and (pos or neg):
        raise SearchError(
            "--load scores with a saved model; --positive/--negative/--examples fit a new one: choose one"
        )
    if not args.load and not pos:
        raise SearchError(
            "classify needs positive examples (--positive, --examples with label 'positive') or --load MODEL"
        )
    with runtime(cfg.cluster) as rt:
        index = use_index(SearchIndex.open(args.store, rt), cfg)
        index.use_post = not args.raw
        filters = filters_of(args, index)
        if args.load:
            model = Classifier.load(args.load)
            model.check(index.scoring_signature(), f"--load {args.load}")
            from pipeline.search.kernels import Exclusions

            exclude = Exclusions.none()
            query = {"type": "classifier", "model": str(args.load), "label": f"classifier {args.load}"}
        else:
            es, query = example_set(index, pos, neg)
            model = fit(index, es, args.background, args.seed)
            exclude = index.example_scorer([es])[1]
            ap = model.info["cv_average_precision"]
            print(f"fitted on {model.info['positives']} positive(s), {model.info['negatives']} negative(s) and "
                  f"{model.info['background']} background tiles; cross-validated AP "
                  f"{'n/a (too few examples)' if ap is None else f'{ap:.3f}'} ({model.info['cv_folds']} folds)")  # fmt: skip
            query = model.query_of(query)
            if args.save:
                model.save(args.save)
                print(f"model saved to {args.save}")
        scorer = model.scorer()
        max_score = None if threshold is None else scorer.internal(threshold)
        results = index.run(scorer, exclude, k, max_score, args.limit, filters, args.diverse, [query])
        pixels = [example_pixels(index, pos[0])] if args.sheet and pos else []
        if args.sheet and not pos:
            raise SearchError("--sheet shows the first positive example as the query: give --positive with --load")
        write_outputs(results, args, index, pixels)
    return 0
