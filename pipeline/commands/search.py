"""``aerial-search search --store S (-k K | --max-distance D) (QUERIES | EXAMPLES)``: resolve the
queries (one per --uid/--image/--lonlat, or one example set from --positive/--negative/
--examples), answer them in one pass over the store, print tables, write JSON, GIS files and
sheets."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

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
    float_list,
    k_or_threshold,
    use_index,
    write_outputs,
)
from pipeline.config import Config
from pipeline.errors import SearchError


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="find the tiles most similar to a query, or to a set of examples")
    p.add_argument("--store", required=True, help="the Zarr store to search")
    p.add_argument("-k", type=int, help="number of results per query (default 10)")
    p.add_argument("--max-distance", type=float, help="instead of -k: every tile within this distance (or score)")
    g = p.add_argument_group("queries (repeat or combine; each is one query, all answered in one pass over the store)")
    g.add_argument("--uid", action="append", default=[], help="a tile uid of the store (or of --query-store)")
    g.add_argument("--uids-file", help="text file with one uid per line")
    g.add_argument("--image", action="append", default=[], help="PNG/JPEG/TIFF fingerprinted with the store's model")
    g.add_argument(
        "--lonlat", action="append", default=[], type=float_list(2), help="LON,LAT: the tile centred nearest"
    )
    g.add_argument("--query-store", help="take --uid fingerprints from this store (same model required)")
    add_examples(p)
    g = p.add_argument_group("example-set scoring")
    g.add_argument("--score", choices=["centroid", "nearest"], default="centroid",
                   help="centroid: distance to mP + w (mP - mN); nearest: to the closest positive minus w x to the "
                        "closest negative (default centroid)")  # fmt: skip
    g.add_argument("--negative-weight", type=float, help="w (default 0.5 with negatives)")
    add_filters(p)
    add_outputs(p, "--max-distance")
    g = p.add_argument_group("search")
    g.add_argument("--split-every", type=int, default=8, help="fan-in of the reduction tree")
    g.add_argument("--raw", action="store_true", help="ignore the store's post-processing (raw fingerprints)")
    g.add_argument("--codes", action="store_true",
                   help="scan the store's binary codes (postprocess --codes binary), then re-rank exactly")  # fmt: skip
    g.add_argument(
        "--rerank", type=int, help="--codes: candidates per query re-ranked exactly (default max(10 k, 100))"
    )
    g.add_argument("--qe", type=int, default=0, help="alpha query expansion with this many top results (0: off)")
    g.add_argument("--alpha", type=float, default=None,
                   help="query expansion weight exponent (default 3); with --diffusion, its alpha (default 0.9)")  # fmt: skip
    g.add_argument("--diffusion", action="store_true",
                   help="rank by diffusion over the store's whole k-NN graph (postprocess --knn): a tile of the "
                        "archive diffuses from its own node, an image joins its k nearest tiles")  # fmt: skip
    g.add_argument("--diffusion-k", type=int, help="--diffusion: neighbours per tile used (default: all stored)")
    g.add_argument("--diffusion-seeds", type=int,
                   help="--diffusion: truncate to each query's exact top N tiles, re-ranked among themselves "
                        "(a query's cost then bounded by N; default: the whole graph)")  # fmt: skip
    g.add_argument("--weights", dest="query_weights", help="local copy of the store's weights file (checked by sha256)")
    g.add_argument("--device", dest="model.device", help="auto | cpu | cuda for --image queries")
    add_index(p)
    add_common(p)
    add_cluster(p)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.cluster import runtime
    from pipeline.search import SearchIndex

    k, threshold = k_or_threshold(args.k, args.max_distance, "--max-distance")
    pos, neg = example_refs(args)
    singles = args.uid or args.uids_file or args.image or args.lonlat
    if (pos or neg) and singles:
        raise SearchError(
            "--positive/--negative/--examples make one query of several examples and --uid/--uids-file/--image/"
            "--lonlat make one query each: use one kind per search"
        )
    if args.diffusion and (pos or neg):
        raise SearchError("--diffusion re-ranks single queries (--uid, --image, --lonlat); not example sets")
    with runtime(cfg.cluster) as rt:
        index = use_index(SearchIndex.open(args.store, rt, split_every=args.split_every), cfg)
        index.use_post = not args.raw
        index.codes, index.rerank = args.codes, args.rerank
        if args.rerank is not None and not args.codes:
            raise SearchError("--rerank applies to --codes searches only")
        if (args.diffusion_k is not None or args.diffusion_seeds is not None) and not args.diffusion:
            raise SearchError("--diffusion-k and --diffusion-seeds apply to --diffusion searches only")
        filters = filters_of(args, index)
        if pos or neg:
            from pipeline.examples import answer, example_set

            es, query = example_set(index, pos, neg, args.score, args.negative_weight, args.query_weights,
                                    cfg.model.device)  # fmt: skip
            results = answer(index, es, query, k, threshold, args.limit, filters, args.diverse)
            pixels = [example_pixels(index, pos[0])] if args.sheet else []
        else:
            queries, labels, pixels = resolve_queries(index, args, cfg.model.device, pixels=bool(args.sheet))
            if args.diffusion:
                if threshold is not None or args.diverse or args.qe or args.codes:
                    raise SearchError("--diffusion ranks the k best by diffusion score: use it with -k, without "
                                      "--max-distance, --diverse, --qe or --codes")  # fmt: skip
                results = index.search_diffusion(queries, k, filters, labels=labels,
                                                 alpha=0.9 if args.alpha is None else args.alpha,
                                                 graph_k=args.diffusion_k, seeds=args.diffusion_seeds)  # fmt: skip
            else:
                expand = (args.qe, 3.0 if args.alpha is None else args.alpha) if args.qe else None
                results = index.search(queries, k, filters, diverse=args.diverse, labels=labels, expand=expand,
                                       max_distance=threshold, limit=args.limit)  # fmt: skip
        write_outputs(results, args, index, pixels)
    return 0


def resolve_queries(index, args: argparse.Namespace, device: str, pixels: bool = False):
    """All queries of the command line, their labels, and (``pixels``: for sheets only) their
    256 x 256 pixels. Without ``pixels`` no source image is opened: a store whose imagery has
    moved or is offline can still be searched by uid or place."""
    from pipeline.render import read_tile
    from pipeline.search import Queries, SearchIndex

    parts: list[Queries] = []
    labels: list[dict] = []
    uids = [u.strip() for u in args.uid]
    if args.uids_file:
        path = Path(args.uids_file)
        if not path.is_file():
            raise SearchError(f"--uids-file {path} does not exist")
        uids += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    try:
        uid_ints = [int(u) for u in uids]
    except ValueError as e:
        raise SearchError(f"uids must be integers as printed by search or stored in the 'uid' variable ({e})") from None
    source = index
    if args.query_store:
        source = SearchIndex.open(args.query_store, index.runtime)
        index.check_comparable(source.provenance, f"--query-store {args.query_store}")
    if args.lonlat:
        q, lab = index.queries_from_lonlats(args.lonlat)
        parts.append(q)
        labels += lab
    if uid_ints:
        q, lab = source.queries_from_uids(uid_ints)
        if source is not index:  # tiles of another store: no same-image exclusion here
            q = Queries(q.fingerprints, np.full(len(q), -1), q.row, q.col, q.lon, q.lat, q.half_m)
        parts.append(q)
        labels += lab
    tiles = []  # for sheets, in the order of `labels` so far (uid-based queries)
    if pixels:
        pre = source.provenance.get("preprocessing", {})
        for lab in labels:
            tiles.append(
                read_tile(lab["image_path"], lab["row"], lab["col"], pre.get("bands", (1, 2, 3)), pre.get("scale"))
            )
    if args.image:
        from pipeline.query import fingerprint_images

        fps, px = fingerprint_images(args.image, index.provenance, args.query_weights, device)
        parts.append(Queries.from_fingerprints(fps))
        labels += [{"type": "image", "image": str(Path(p).resolve()), "label": Path(p).name} for p in args.image]
        tiles += list(px)
    if not parts:
        raise SearchError("no query given: pass --uid UID, --uids-file FILE, --image FILE or --lonlat LON,LAT")
    return Queries.concat(parts), labels, tiles
