"""``aerial-search changes --store S --before FROM/TO --after FROM/TO``: every window of an image
acquired in the after range paired with the before window over the same ground, the pairs ranked
by how far apart their fingerprints are (the most changed first)."""

from __future__ import annotations

import argparse

from pipeline.commands.common import add_cluster, add_common, float_list
from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("changes", help="what changed between flights: windows ranked by fingerprint distance to the "
                                       "same ground in an earlier image")  # fmt: skip
    p.add_argument("--store", required=True)
    p.add_argument("--before", required=True, metavar="FROM/TO", help="images acquired in this range are the 'before'")
    p.add_argument("--after", required=True, metavar="FROM/TO", help="images acquired in this range are the 'after'")
    p.add_argument("--bbox", type=float_list(4), help="W,S,E,N: only after windows centred in this lon/lat box")
    p.add_argument("-k", type=int, help="the k most changed windows (default 100)")
    p.add_argument("--min-distance", type=float, help="instead of -k: every pair at least this far apart")
    p.add_argument("--limit", type=int, default=10_000, help="--min-distance: at most this many (default 10,000)")
    p.add_argument("--score", choices=("distance", "robust"), default="distance",
                   help="rank by the distance (default), or by how far it stands out among the distances of its "
                        "image pair (robust: (d - median) / (1.4826 MAD); for flights that differ everywhere in "
                        "light or season)")  # fmt: skip
    p.add_argument("--json", dest="json_out", help="write the ranked pairs as JSON to this file")
    p.add_argument("--geojson", help="write the after windows' polygons (EPSG:4326) with their pair's fields")
    p.add_argument("--geoparquet", help="the same as GeoParquet (acquisition times as timestamps)")
    p.add_argument("--dissolve", action="store_true",
                   help="GeoJSON/GeoParquet: merge touching changed windows per image into areas (hits, "
                        "best_distance, area_m2)")  # fmt: skip
    p.add_argument("--heatmap", metavar="DIR", help="a change map per after image (float32 COG + PNG)")
    p.add_argument("--raw", action="store_true", help="ignore the store's post-processing")
    add_common(p)
    add_cluster(p)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline import export
    from pipeline.changes import change_maps, changes
    from pipeline.cluster import runtime
    from pipeline.commands.common import k_or_threshold
    from pipeline.dates import DateRange
    from pipeline.search import SearchIndex
    from pipeline.search.results import write_json

    k, threshold = k_or_threshold(args.k, args.min_distance, "--min-distance")
    if args.k is None and threshold is None:
        k = 100
    before, after = DateRange.parse(args.before, "--before"), DateRange.parse(args.after, "--after")
    with runtime(cfg.cluster) as rt:
        index = SearchIndex.open(args.store, rt)
        index.use_post = not args.raw
        res, pairing = changes(index, before, after, tuple(args.bbox) if args.bbox else None, k, threshold,
                               args.limit, args.score)  # fmt: skip
        print(f"{pairing.pairs} window pair(s): {len(pairing.after_ids)} after image(s) against "
              f"{len(pairing.before_ids)} before image(s)")  # fmt: skip
        print(res.table())
        if res.total is not None and res.total > len(res):
            print(f"{res.total} pairs passed --min-distance; --limit {len(res)} kept the most changed")
        if args.json_out:
            write_json([res], args.json_out)
        if args.geojson:
            export.write_geojson([res], args.geojson, dissolved=args.dissolve)
            print(f"GeoJSON written to {args.geojson}")
        if args.geoparquet:
            export.write_geoparquet([res], args.geoparquet, dissolved=args.dissolve)
            print(f"GeoParquet written to {args.geoparquet}")
        if args.heatmap:
            paths = change_maps(index, pairing, args.heatmap)
            print(f"{len(paths)} change map(s) written to {args.heatmap} (GeoTIFF + PNG each)")
    return 0
