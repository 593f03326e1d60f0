"""Argument types and flag groups shared by several commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None


def float_list(n: int) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            vals = ()
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return vals

    return parse


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML settings file (default: built-in defaults = configs/default.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def add_model(p: argparse.ArgumentParser) -> None:
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


def add_cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduler")
    g.add_argument(
        "--scheduler",
        dest="cluster.scheduler",
        help="threads (default) | sync | local | local-cuda | kubernetes | slurm | pbs | tcp://host:8786",
    )
    g.add_argument("--workers", dest="cluster.n_workers", type=int, help="local: worker processes")
    g.add_argument("--threads", dest="cluster.threads", type=int, help="dask threads (per worker for local)")
    g.add_argument("--no-progress", dest="cluster.progress", action="store_false", default=None)


def add_index(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index: where the scan runs")
    g.add_argument("--index-device", dest="search.device",
                   help="auto (default: a CUDA GPU when one is visible, else the NumPy engine; on a local-cuda "
                        "cluster its GPU workers) | numpy | cpu (torch on the CPU) | cuda | cuda:N")  # fmt: skip
    g.add_argument("--index-dtype", dest="search.dtype", choices=["float32", "float16"],
                   help="the search space's dtype in memory (default the store's): float16 halves a float32 store, "
                        "scores still accumulate in float32; named in the JSON query")  # fmt: skip


def index_device(cfg) -> str:
    """The torch device searches run on for ``search.device`` (``""``: the NumPy engine). ``auto``
    takes a GPU only where one is visible (no torch import on a machine without one), and a
    local-cuda cluster's GPU workers; other clusters keep the NumPy engine unless told ``cuda``."""
    device = cfg.search.device
    if device == "numpy":
        return ""
    if device != "auto":
        return device
    if cfg.cluster.scheduler == "local-cuda":
        return "cuda"
    if cfg.cluster.scheduler not in ("threads", "sync"):
        return ""
    from pipeline.cluster import visible_gpus

    if not visible_gpus():
        return ""
    from pipeline.search import device as device_mod

    return device_mod.resolve("auto").replace("cpu", "")


def use_index(index, cfg):
    """Set the index's device and dtype from the ``search`` settings (``--index-device``,
    ``--index-dtype``); returns the index."""
    index.device, index.dtype = index_device(cfg), cfg.search.dtype
    return index


def add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters")
    g.add_argument("--include-overlapping", action="store_true", help="keep the query tiles and tiles overlapping them")
    g.add_argument("--diverse", action="store_true", help="skip results overlapping a better result")
    g.add_argument("--bbox", type=float_list(4), help="W,S,E,N: only tiles centred in this lon/lat box")
    g.add_argument("--images", help="glob: only tiles of source images whose path (or file name) matches")
    add_date(g)


def add_date(g) -> None:
    g.add_argument("--date", metavar="FROM/TO",
                   help="only images acquired from FROM to TO (ISO dates, both ends inclusive; FROM/ or /TO leave an "
                        "end open; 2019 or 2019-11 alone: that year or month). Images without a date are left out, "
                        "and the output says how many")  # fmt: skip


def date_ids(args: argparse.Namespace, index, within=None):
    """``(image ids, note)`` of ``--date`` (``(within, None)`` without it); the note (the range and
    how many images it kept, left outside, left out undated) goes into every result's query."""
    if not getattr(args, "date", None):
        return within, None
    from pipeline.dates import DateRange

    ids, note = index.image_ids_acquired(DateRange.parse(args.date), within)
    if note["outside"] or note["undated"]:
        print(f"--date {args.date}: {note['kept']} image(s) acquired in range; left out {note['outside']} acquired "
              f"outside it and {note['undated']} without a date")  # fmt: skip
    return ids, note


def add_examples(p: argparse.ArgumentParser, required_help: str = "") -> None:
    g = p.add_argument_group(f"example sets: one query made of several examples{required_help}")
    g.add_argument("--positive", action="append", default=[], metavar="REF",
                   help="an example of what to find: a tile uid, lonlat:LON,LAT or an image file (repeatable)")  # fmt: skip
    g.add_argument("--negative", action="append", default=[], metavar="REF",
                   help="an example of what not to find (repeatable)")  # fmt: skip
    g.add_argument("--examples", metavar="FILE",
                   help="CSV (uid or lon,lat, and label positive/negative) or GeoJSON points with a label property")  # fmt: skip


def add_outputs(p: argparse.ArgumentParser, threshold_help: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--limit", type=int, default=10_000, help=f"{threshold_help}: at most this many results (default 10,000)"
    )
    g.add_argument("--json", dest="json_out", help="write results as JSON to this file")
    g.add_argument("--geojson", help="write the hits' window polygons (EPSG:4326) as GeoJSON")
    g.add_argument("--geoparquet", help="write the hits' window polygons as GeoParquet")
    g.add_argument("--dissolve", action="store_true",
                   help="GeoJSON/GeoParquet: merge touching hits per image (hits, best value, area_m2)")  # fmt: skip
    g.add_argument("--pixel-coords", action="store_true",
                   help="GeoJSON/GeoParquet: write hits of images without a CRS in pixel coordinates")  # fmt: skip
    g.add_argument("--sheet", help="write a PNG of the query and its results (several queries: NAME-1.png, ...)")


def k_or_threshold(k: int | None, threshold: float | None, flag: str) -> tuple[int | None, float | None]:
    """``-k`` or a threshold, never both; neither: ``-k 10``."""
    from pipeline.errors import SearchError

    if k is not None and threshold is not None:
        raise SearchError(
            f"-k and {flag} both given: choose one, -k for the k best tiles or {flag} for every tile past it"
        )
    return (10 if k is None and threshold is None else k), threshold


def example_refs(args: argparse.Namespace) -> tuple[list, list]:
    """The positive and negative references of ``--positive``, ``--negative`` and ``--examples``."""
    from pipeline.examples import parse_ref, read_examples

    pos = [parse_ref(r) for r in args.positive]
    neg = [parse_ref(r) for r in args.negative]
    if args.examples:
        for ref, label in read_examples(args.examples):
            (pos if label == "positive" else neg).append(ref)
    return pos, neg


def filters_of(args: argparse.Namespace, index):
    """The ``Filters`` of the filter flags; ``--date``'s note is kept as ``args.date_note`` for
    :func:`write_outputs`."""
    from pipeline.search import Filters

    ids, args.date_note = date_ids(args, index, index.image_ids_matching(args.images) if args.images else None)
    return Filters(
        include_overlapping=args.include_overlapping,
        bbox=tuple(args.bbox) if args.bbox else None,
        image_ids=ids,
    )


def example_pixels(index, ref):
    """The 256 x 256 pixels a sheet shows for an example."""
    from pipeline.query import load_image
    from pipeline.render import read_tile

    if ref.kind == "image":
        pre = index.provenance.get("preprocessing", {})
        return load_image(ref.value, pre.get("bands", (1, 2, 3)), pre.get("scale"))
    uid = ref.value if ref.kind == "uid" else index.uid_at(*ref.value)[0]
    _, labels = index.queries_from_uids([uid])
    pre = index.provenance.get("preprocessing", {})
    lab = labels[0]
    return read_tile(lab["image_path"], lab["row"], lab["col"], pre.get("bands", (1, 2, 3)), pre.get("scale"))


def write_outputs(results, args: argparse.Namespace, index, pixels) -> None:
    """Tables on stdout, then the files the flags ask for."""
    from pipeline import export
    from pipeline.render import write_sheets
    from pipeline.search.results import write_json

    note = getattr(args, "date_note", None)
    for res in results:
        if note is not None:
            res.query["date"] = note
        print(res.table())
        if res.total is not None and res.total > len(res):
            print(f"{res.total} tiles passed the threshold; --limit {len(res)} kept the best of them")
        print()
    if args.json_out:
        write_json(results, args.json_out)
    if args.geojson:
        export.write_geojson(results, args.geojson, args.pixel_coords, args.dissolve)
        print(f"GeoJSON written to {args.geojson}")
    if args.geoparquet:
        export.write_geoparquet(results, args.geoparquet, args.pixel_coords, args.dissolve)
        print(f"GeoParquet written to {args.geoparquet}")
    if args.sheet:
        for path in write_sheets(results, pixels, index.provenance, args.sheet):
            print(f"sheet written to {path}")
