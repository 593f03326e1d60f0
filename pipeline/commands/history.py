"""``aerial-search history --store S (--lonlat=LON,LAT | --uid UID)``: the window over a place in
every image that covers it, oldest first, with how far each moved since the previous flight."""

from __future__ import annotations

import argparse

from pipeline.commands.common import add_cluster, add_common, float_list
from pipeline.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("history", help="a place through time: its window in every image that covers it, with the "
                                       "change since the previous flight")  # fmt: skip
    p.add_argument("--store", required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--lonlat", type=float_list(2), help="LON,LAT: the place")
    where.add_argument("--uid", help="a tile of the store: its centre is the place")
    p.add_argument("--date", metavar="FROM/TO", help="only images acquired in this range")
    p.add_argument("--json", dest="json_out", help="write the windows as JSON to this file")
    p.add_argument("--geojson", help="write the windows' polygons (EPSG:4326) as GeoJSON")
    p.add_argument("--sheet", help="a PNG of the windows side by side, oldest first")
    p.add_argument("--raw", action="store_true", help="ignore the store's post-processing")
    add_common(p)
    add_cluster(p)


def main(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline import export
    from pipeline.cluster import runtime
    from pipeline.dates import DateRange
    from pipeline.history import history, history_sheet, place_of
    from pipeline.search import SearchIndex
    from pipeline.search.results import write_json

    date = DateRange.parse(args.date, "--date") if args.date else None
    with runtime(cfg.cluster) as rt:
        index = SearchIndex.open(args.store, rt)
        index.use_post = not args.raw
        lon, lat = place_of(index, args.uid) if args.uid is not None else args.lonlat
        res = history(index, lon, lat, date)
        print(res.table())
        if args.json_out:
            write_json([res], args.json_out)
        if args.geojson:
            export.write_geojson([res], args.geojson)
            print(f"GeoJSON written to {args.geojson}")
        if args.sheet:
            print(f"sheet written to {history_sheet(res, index.provenance, args.sheet)}")
    return 0
