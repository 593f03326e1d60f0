"""Driver of ``aerial-search search``: resolve queries, run one pass over the store, write outputs."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.search import Filters, Queries, SearchError, SearchIndex
from pipeline.store import fingerprint_signature


def check_same_model(store_prov: dict[str, Any], query_prov: dict[str, Any], what: str) -> None:
    a, b = fingerprint_signature(store_prov), fingerprint_signature(query_prov)
    diff = {k: (b[k], a[k]) for k in a if a[k] != b[k]}
    if diff:
        detail = "; ".join(f"{k}: {q!r} vs {s!r}" for k, (q, s) in diff.items())
        raise SearchError(
            f"{what} was fingerprinted differently from the store ({detail}); fingerprints of different models "
            f"or preprocessing are not comparable: query with tiles or images fingerprinted by the store's model"
        )


def _concat(parts: list[Queries]) -> Queries:
    return Queries(*(np.concatenate([getattr(p, f) for p in parts]) for f in Queries.__dataclass_fields__))


def resolve_queries(
    index: SearchIndex, args: argparse.Namespace, device: str
) -> tuple[Queries, list[dict], list[np.ndarray]]:
    """All queries of the command line, their labels and their 256 x 256 pixels (for sheets)."""
    from pipeline.render import read_tile

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
        check_same_model(index.provenance, source.provenance, f"--query-store {args.query_store}")
    for lon, lat in args.lonlat:
        uid, metres = index.nearest_uid(lon, lat)
        image_id = int(uid >> 40)
        reach = index.half_m[image_id] * math.sqrt(2)
        if not metres <= reach:
            raise SearchError(
                f"no tile covers lon {lon}, lat {lat}: the nearest tile centre is {metres:.0f} m away "
                f"(a tile reaches {reach:.0f} m from its centre); `aerial-search info` prints the store's lon/lat box"
            )
        q, lab = index.queries_from_uids([uid])
        lab[0].update(
            type="lonlat", lonlat=[lon, lat], metres_to_centre=round(metres, 2), label=f"{lon},{lat} -> uid {uid}"
        )
        parts.append(q)
        labels += lab
    if uid_ints:
        q, lab = source.queries_from_uids(uid_ints)
        if source is not index:  # tiles of another store: no same-image exclusion here
            q = Queries(q.fingerprints, np.full(len(q), -1), q.row, q.col, q.lon, q.lat, q.half_m)
        parts.append(q)
        labels += lab
    # Pixels for sheets, in the order of `labels` so far (uid-based queries).
    pixels = []
    pre = source.provenance.get("preprocessing", {})
    for lab in labels:
        pixels.append(
            read_tile(lab["image_path"], lab["row"], lab["col"], pre.get("bands", (1, 2, 3)), pre.get("scale"))
        )
    if args.image:
        from pipeline.query import fingerprint_images

        fps, px = fingerprint_images(args.image, index.provenance, args.query_weights, device)
        parts.append(Queries.from_fingerprints(fps))
        labels += [{"type": "image", "image": str(Path(p).resolve()), "label": Path(p).name} for p in args.image]
        pixels += list(px)
    if not parts:
        raise SearchError("no query given: pass --uid UID, --uids-file FILE, --image FILE or --lonlat LON,LAT")
    return _concat(parts), labels, pixels


def run_search(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.cluster import runtime
    from pipeline.render import result_sheet

    with runtime(cfg.cluster) as rt:
        index = SearchIndex.open(args.store, rt, split_every=args.split_every)
        index.use_post = not args.raw
        if args.k <= 0:
            raise SearchError(f"-k must be a positive number of results, got {args.k}")
        filters = Filters(
            include_overlapping=args.include_overlapping,
            bbox=tuple(args.bbox) if args.bbox else None,
            image_ids=index.image_ids_matching(args.images) if args.images else None,
        )
        queries, labels, pixels = resolve_queries(index, args, cfg.model.device)
        expand = (args.qe, args.alpha) if args.qe else None
        results = index.search(queries, args.k, filters, diverse=args.diverse, labels=labels, expand=expand)
    for res in results:
        print(res.table())
        print()
    if args.json_out:
        docs = [r.to_json() for r in results]
        Path(args.json_out).write_text(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, allow_nan=False))
    if args.sheet:
        out = Path(args.sheet)
        for i, (res, px) in enumerate(zip(results, pixels)):
            path = out if len(results) == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix or '.png'}")
            result_sheet(res, px, index.provenance, str(path))
            print(f"sheet written to {path}")
    return 0
