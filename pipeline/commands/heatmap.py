"""``aerial-search heatmap --store S (QUERY | EXAMPLES | --load MODEL) --out DIR``: a score map per
image, as Cloud-Optimized GeoTIFFs with PNG overviews."""

from __future__ import annotations

import argparse

from pipeline.commands.common import (
    add_cluster,
    add_common,
    add_date,
    add_examples,
    add_index,
    date_ids,
    example_refs,
    float_list,
    use_index,
)
from pipeline.config import Config
from pipeline.errors import SearchError


def add_parser(sub) -> None:
    p = sub.add_parser("heatmap", help="a score map per image (float32 COG + PNG): distance, score or probability")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="folder for NAME.tif and NAME.png, one per image")
    g = p.add_argument_group("the query: one of")
    g.add_argument("--uid", help="a tile uid of the store")
    g.add_argument("--image", help="an image file, fingerprinted with the store's model")
    g.add_argument("--lonlat", type=float_list(2), help="LON,LAT: the tile centred nearest")
    g.add_argument("--load", metavar="MODEL.json", help="a classifier saved by `classify --save`: its probability")
    add_examples(p)
    g.add_argument("--score", choices=["centroid", "nearest"], default="centroid", help="example-set scoring")
    g.add_argument("--negative-weight", type=float, help="w (default 0.5 with negatives)")
    g.add_argument("--raw", action="store_true", help="ignore the store's post-processing")
    g.add_argument("--weights", dest="query_weights", help="local copy of the store's weights file (--image)")
    add_date(p.add_argument_group("filters"))
    add_index(p)
    add_common(p)
    add_cluster(p)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.cluster import runtime
    from pipeline.heatmap import write_heatmaps
    from pipeline.search import SearchIndex
    from pipeline.search.scorers import L2Scorer

    pos, neg = example_refs(args)
    given = [bool(args.uid), bool(args.image), args.lonlat is not None, bool(args.load), bool(pos or neg)]
    if sum(given) != 1:
        raise SearchError("give one query: --uid, --image, --lonlat, --load MODEL, or --positive/--negative/--examples")
    with runtime(cfg.cluster) as rt:
        index = use_index(SearchIndex.open(args.store, rt), cfg)
        index.use_post = not args.raw
        if args.load:
            from pipeline.classify import Classifier

            model = Classifier.load(args.load)
            model.check(index.scoring_signature(), f"--load {args.load}")
            scorer, title = model.scorer(), f"probability, classifier {args.load}"
        elif pos or neg:
            from pipeline.examples import example_set

            es, query = example_set(index, pos, neg, args.score, args.negative_weight, args.query_weights)
            scorer, title = index.example_scorer([es])[0], f"score, {query['label']}"
        else:
            if args.image:
                from pipeline.query import fingerprint_images
                from pipeline.search import Queries

                q = Queries.from_fingerprints(fingerprint_images([args.image], index.provenance, args.query_weights)[0])
                title = f"distance to {args.image}"
            else:
                uid = int(args.uid) if args.uid else index.uid_at(*args.lonlat)[0]
                q, _ = index.queries_from_uids([uid])
                title = f"distance to uid {uid}"
            scorer = L2Scorer(index.postprocess.apply(q.fingerprints))
        ids, _ = date_ids(args, index)
        paths = write_heatmaps(index, scorer, args.out, title, image_ids=ids)
    print(f"{len(paths)} score map(s) written to {args.out} (GeoTIFF + PNG each)")
    return 0
