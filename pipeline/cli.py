"""Command line: ``aerial-search ingest | search | info``.

Settings come from ``configs/default.yaml`` semantics (``--config FILE`` picks another file);
every flag given on the command line overrides the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.config import Config, ConfigError, load_config


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None


def _float_list(n: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            vals = ()
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return vals

    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML settings file (default: built-in defaults = configs/default.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="model.arch", help="backbone (default resnet18)")
    g.add_argument(
        "--weights",
        dest="model.weights",
        help="imagenet (torchvision cache/download), random (tests only) or a state_dict file path",
    )
    g.add_argument("--device", dest="model.device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch-size", dest="model.batch_size", type=int, help="windows per forward pass")
    g.add_argument("--amp", dest="model.amp", choices=["none", "bf16", "fp16"], help="autocast on CUDA")
    g.add_argument("--torch-threads", dest="model.torch_threads", type=int, help="0 = cores / dask threads")


def _add_cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduler")
    g.add_argument(
        "--scheduler",
        dest="cluster.scheduler",
        help="threads (default) | sync | local | local-cuda | kubernetes | slurm | pbs | tcp://host:8786",
    )
    g.add_argument("--workers", dest="cluster.n_workers", type=int, help="local: worker processes")
    g.add_argument("--threads", dest="cluster.threads", type=int, help="dask threads (per worker for local)")
    g.add_argument("--no-progress", dest="cluster.progress", action="store_false", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aerial-search",
        description="Visual search over aerial imagery with CNN fingerprints, on Dask.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="fingerprint GeoTIFFs into a Zarr store")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="GeoTIFF, folder (recursive) or .txt list of paths")
    p.add_argument("--store", required=True, help="path of the Zarr store to create")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing store (only once the new one is complete)"
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable file (default: report it, go on)"
    )
    _add_common(p)
    _add_model(p)
    g = p.add_argument_group("tiling and layout")
    g.add_argument("--bands", dest="tiling.bands", type=_int_list, help="three 1-based bands as R,G,B (default 1,2,3)")
    g.add_argument("--scale", dest="tiling.scale", type=_float_list(2), help="MIN,MAX -> 0..255 for non-uint8 imagery")
    g.add_argument(
        "--black-level", dest="tiling.black_level", type=int, help="pixels with all bands <= this are nodata"
    )
    g.add_argument("--chunk-px", dest="read.chunk_px", type=int, help="read chunk side in pixels (multiple of 128)")
    g.add_argument("--dtype", dest="store.dtype", choices=["float32", "float16"], help="fingerprint dtype in the store")
    g.add_argument("--chunk-tiles", dest="store.chunk_tiles", type=int, help="tiles per Zarr chunk")
    g.add_argument("--hash", dest="store.content_hash", action="store_true", default=None,
                   help="recognise unchanged images by content sha256 instead of size + modification time")  # fmt: skip
    g.add_argument("--compressor", dest="store.compressor", choices=["lz4", "zstd", "none"], help="fingerprint codec")
    _add_cluster(p)

    p = sub.add_parser("search", help="find the k tiles most similar to a query")
    p.add_argument("--store", required=True, help="the Zarr store to search")
    p.add_argument("-k", type=int, default=10, help="number of results per query (default 10)")
    g = p.add_argument_group("queries (repeat or combine; all are answered in one pass over the store)")
    g.add_argument("--uid", action="append", default=[], help="a tile uid of the store (or of --query-store)")
    g.add_argument("--uids-file", help="text file with one uid per line")
    g.add_argument("--image", action="append", default=[], help="PNG/JPEG/TIFF fingerprinted with the store's model")
    g.add_argument(
        "--lonlat", action="append", default=[], type=_float_list(2), help="LON,LAT: the tile centred nearest"
    )
    g.add_argument("--query-store", help="take --uid fingerprints from this store (same model required)")
    g = p.add_argument_group("filters")
    g.add_argument("--include-overlapping", action="store_true", help="keep the query tile and tiles overlapping it")
    g.add_argument("--diverse", action="store_true", help="skip results overlapping a better result")
    g.add_argument("--bbox", type=_float_list(4), help="W,S,E,N: only tiles centred in this lon/lat box")
    g.add_argument("--images", help="glob: only tiles of source images whose path (or file name) matches")
    g = p.add_argument_group("output")
    g.add_argument("--json", dest="json_out", help="write results as JSON to this file")
    g.add_argument("--sheet", help="write a PNG of the query and its results (several queries: NAME-1.png, ...)")
    g.add_argument("--split-every", type=int, default=8, help="fan-in of the top-k tree reduction")
    g.add_argument("--raw", action="store_true", help="ignore the store's post-processing (raw fingerprints)")
    g.add_argument("--qe", type=int, default=0, help="alpha query expansion with this many top results (0: off)")
    g.add_argument("--alpha", type=float, default=3.0, help="query expansion weight exponent")
    g.add_argument("--weights", dest="query_weights", help="local copy of the store's weights file (checked by sha256)")
    g.add_argument("--device", dest="model.device", help="auto | cpu | cuda for --image queries")
    _add_common(p)
    _add_cluster(p)

    from pipeline import demo, evaluate, weights

    evaluate.add_parser(sub, _add_model)
    demo.add_parser(sub)
    weights.add_parser(sub)

    p = sub.add_parser("postprocess", help="fit a fingerprint post-processing into a store (applied by search)")
    p.add_argument("--store", required=True)
    p.add_argument("--method", required=True, choices=["none", "l2", "hellinger", "pca"])
    p.add_argument("--dims", type=int, default=128, help="pca: output dimensions")
    p.add_argument("--sample", type=int, default=200_000, help="pca: fit on at most this many tiles")
    p.add_argument("--dba", type=int, default=0, help="also write database-side augmentation with this many neighbours")
    p.add_argument("--alpha", type=float, default=1.0, help="DBA weight exponent")

    p = sub.add_parser("info", help="summarize a store")
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")

    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_config(getattr(args, "config", None))
    dotted = {k: v for k, v in vars(args).items() if "." in k}
    return cfg.override(**dotted)


def _print_info(summary: dict[str, Any]) -> None:
    model = summary["model"]
    print(f"store         {summary['store']}")
    print(f"created       {summary['created']} by {summary['software']}")
    print(f"images        {summary['images']} {summary['images_by_status']}")
    print(f"tiles         {summary['tiles']} valid of {summary['slots']} slots ({summary['dropped']} dropped)")
    print(
        f"fingerprints  {summary['feature_dim']}-d {summary['fingerprint_dtype']}, {summary['chunk_tiles']} tiles per chunk"
    )
    print(f"model         {model.get('arch')} weights {model.get('weights_id')}")
    for path, why in summary.get("failed", []):
        print(f"failed        {path}: {why}")
    if summary.get("postprocess"):
        print(f"postprocess   {summary['postprocess']}")
    print(f"on disk       {summary['bytes_on_disk'] / 1e6:.2f} MB")
    if summary["lonlat_bounds"]:
        w, s, e, n = summary["lonlat_bounds"]
        print(f"lon/lat box   W {w:.5f} S {s:.5f} E {e:.5f} N {n:.5f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(message)s"
    )
    from pipeline.embed import WeightsError
    from pipeline.raster import RasterError
    from pipeline.search import SearchError
    from pipeline.store import StoreError

    try:
        if args.command == "ingest":
            from pipeline.ingest import ingest

            cfg = config_from_args(args)
            report = ingest(args.sources, args.store, cfg, overwrite=args.overwrite, strict=args.strict)
            print(report)
            if report.failed:
                return 1
        elif args.command == "search":
            from pipeline.search_cmd import run_search

            return run_search(args, config_from_args(args))
        elif args.command == "postprocess":
            from pipeline.post import fit_store

            t = fit_store(args.store, args.method, args.dims, args.sample)
            print(
                f"{args.store}: post-processing {t.method}{'' if t.dims is None else f' ({t.dims} dims)'} saved; search applies it"
            )
            if args.dba:
                from pipeline.post import augment_store

                n = augment_store(args.store, args.dba, args.alpha)
                print(
                    f"{args.store}: fingerprint_dba written for {n} tiles ({args.dba} neighbours); rebuild it after adding images"
                )
        elif args.command == "evaluate":
            from pipeline import evaluate

            return evaluate.main(args, config_from_args(args))
        elif args.command == "weights":
            from pipeline import weights

            return weights.main(args)
        elif args.command == "demo":
            from pipeline import demo

            return demo.main(args)
        elif args.command == "info":
            from pipeline.store import summarize

            summary = summarize(args.store)
            if args.json:
                print(json.dumps(summary, indent=2))
            else:
                _print_info(summary)
    except (ConfigError, RasterError, StoreError, WeightsError, SearchError, FileNotFoundError) as e:
        print(f"aerial-search {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
