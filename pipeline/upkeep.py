"""Archive upkeep: remove images, follow a moved archive, compact a store, migrate its schema.
The decisions live here; the Zarr reads, writes and copies they need are :mod:`pipeline.store`'s.

Each operation takes the store's lock (so it refuses while an ingest runs, and an ingest
refuses while it runs), refuses object-storage stores (no lock there), and leaves a consistent
store if killed: status and path changes are single array writes, and a compaction builds a new
store beside the old one and swaps it in only when complete.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import locations, schema, store
from pipeline.digest import sha256_file
from pipeline.errors import StoreError
from pipeline.lock import StoreLock

LIVE = ("pending", "done", "empty", "failed")  # statuses of images still part of the archive


def _local(path: str | os.PathLike[str], what: str) -> Path:
    if locations.is_remote(path):
        raise StoreError(
            f"{what} works on local stores only: object storage offers no lock here to keep an ingest out "
            f"while it rewrites {path}; run it on a local copy, or stop every ingest and copy the result back"
        )
    p = Path(path).expanduser().resolve()
    if not locations.exists(p):
        raise StoreError(f"store {p} does not exist; create it with `aerial-search ingest SOURCE --store {p}`")
    if not locations.is_store(p):
        raise StoreError(f"{p} is not a fingerprint store (no zarr.json); pass the --store path given to ingest")
    return p


def match_images(paths: Sequence[str], patterns: Sequence[str]) -> list[int]:
    """Ids of the images whose path equals a pattern (after resolving it as a local path), or
    whose path or file name matches it as a glob."""
    ids = []
    for pattern in patterns:
        exact = str(Path(pattern).expanduser().resolve()) if "://" not in pattern else pattern
        hit = [
            i
            for i, p in enumerate(paths)
            if p in (pattern, exact) or fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern)
        ]
        if not hit:
            raise StoreError(
                f"{pattern!r} matches none of the store's {len(paths)} image paths; `aerial-search info` lists them"
            )
        ids += hit
    return sorted(set(ids))


def remove(path: str | os.PathLike[str], patterns: Sequence[str]) -> list[str]:
    """Give the matching images status ``removed``: their tiles leave every search (the slots stay
    until :func:`compact`). Returns the paths removed."""
    p = _local(path, "remove")
    with StoreLock(p, what="remove"):
        store.check_version(p)
        table = store.read_table(p)
        paths = [str(x) for x in table["image_path"]]
        ids = [i for i in match_images(paths, patterns) if table["status"][i] in LIVE]
        if not ids:
            raise StoreError(f"the images matching {list(patterns)} are already removed or replaced")
        store.set_status(p, ids, "removed")
        store.set_attrs(p, last_upkeep={"removed": len(ids), "finished": schema.now()})
    return [paths[i] for i in ids]


@dataclass
class Relocation:
    moved: list[tuple[str, str]]  # (old path, new path)
    problems: list[str]


def relocate(path: str | os.PathLike[str], old_prefix: str, new_prefix: str, check_only: bool = False) -> Relocation:
    """The archive moved: image paths starting with ``old_prefix`` now start with ``new_prefix``.

    Every moved image's new file must exist and have the recorded size (and sha256, where the
    store recorded one); otherwise nothing changes and the problems are listed. The new files'
    modification times are recorded, so the next ingest from the new place skips them.
    """
    p = _local(path, "relocate")
    with StoreLock(p, what="relocate"):
        store.check_version(p)
        table = store.read_table(p)
        moves, problems, mtimes = [], [], []
        for i, (old, status) in enumerate(zip(table["image_path"], table["status"])):
            old = str(old)
            if not old.startswith(old_prefix) or status not in LIVE:
                continue
            new = new_prefix + old[len(old_prefix) :]
            if not os.path.isfile(new):
                problems.append(f"{new} does not exist")
                continue
            size = os.path.getsize(new)
            if int(table["size"][i]) >= 0 and size != int(table["size"][i]):
                problems.append(f"{new} has {size} bytes, {old} had {int(table['size'][i])}")
                continue
            if table["sha256"][i] and sha256_file(new) != table["sha256"][i]:
                problems.append(f"{new} has another sha256 than {old}")
                continue
            moves.append((i, old, new))
            mtimes.append(os.stat(new).st_mtime)
        if not moves and not problems:
            raise StoreError(f"no image path of the store starts with {old_prefix!r}; `aerial-search info` lists them")
        if problems:
            raise StoreError(
                f"relocate changed nothing: {len(problems)} of {len(problems) + len(moves)} images do not match "
                f"their new place ({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''})"
            )
        if not check_only:
            ids = np.array([i for i, _, _ in moves])
            order = np.argsort(ids)
            store.write_rows(p, ids[order], {
                "image_path": np.array([new for _, _, new in moves], dtype=object)[order],
                "mtime": np.array(mtimes, dtype=np.float64)[order],
            })  # fmt: skip
            store.set_attrs(p, last_upkeep={"relocated": len(moves), "from": old_prefix, "to": new_prefix,
                                            "finished": schema.now()})  # fmt: skip
    return Relocation([(old, new) for _, old, new in moves], problems)


def compact(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, block: int = 0) -> dict:
    """Rewrite the store without the slots of removed and replaced images and the padding
    between batches; uids, image ids and the slot order within images stay the same.

    Without ``out`` the new store is built beside (``.NAME.compact``) and swapped into place
    when complete; with ``out`` (a new path) the source is left as it is.
    """
    src = _local(path, "compact")
    with StoreLock(src, what="compact"):
        store.check_version(src)
        if out is not None:
            dst = Path(out).expanduser().resolve()
            if dst.exists():
                raise StoreError(f"{dst} exists; compact --out needs a new path")
        else:
            dst = src.with_name(f".{src.name}.compact")
            locations.discard(dst)  # a compaction killed earlier
        summary = copy_compacted(src, dst, LIVE, block)
        if out is None:
            locations.swap_in(dst, src)
        return {**summary, "store": str(out or src)}


def copy_compacted(src: Path | str, dst: Path | str, live: Sequence[str], block: int = 0) -> dict[str, int]:
    """Write a copy of store ``src`` at ``dst`` that keeps only the slots of images whose status
    is in ``live``, packed from slot 0 in image-id order (one batch: it starts on a chunk
    boundary), with ``tile_start``/``tile_count`` rewritten. Every image row stays, so image ids
    and uids do not change; images dropped keep their row with ``tile_count`` 0. Tile arrays are
    copied ``block`` slots at a time (default 16 Zarr chunks), so memory stays bounded. Derived
    arrays that are current come along; stale ones are left out (rerun ``postprocess``).
    """
    table = store.read_table(src)
    attrs = store.read_attrs(src)
    z, dim, dtype, slots_before = store.array_layout(src)
    status = table["status"].astype(str)
    keep = np.isin(status, list(live))
    count = np.where(keep, table["tile_count"], 0).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    total = int(count.sum())
    compressor = (attrs.get("config", {}).get("store", {}) or {}).get("compressor", "lz4")
    attrs = {**attrs, "schema_version": schema.SCHEMA_VERSION,
             "compacted": {"from_slots": slots_before, "to_slots": total, "finished": schema.now()}}  # fmt: skip
    store.create_store(dst, attrs, dim, dtype, z, compressor)
    store.grow(dst, total, len(status))
    rows = {name: table[name] for name in schema.IMG_VARS}
    rows["tile_start"], rows["tile_count"] = start, count
    store.write_rows(dst, np.arange(len(status)), rows)
    present = set(store.read_array_names(src))
    derived = [n for n in schema.DERIVED_TILE_VARS if n in present and not schema.derived_meta(attrs, n).get("stale")]
    fitted = [n for n in (*schema.POST_VARS, *(schema.CODE_VARS if "codes" in derived else ()),
                          *(schema.KNN_VARS if "knn_cell" in derived else ())) if n in present]  # fmt: skip
    store.create_like(src, dst, [*fitted, *derived], n_tiles=total)
    dropped = [n for n in schema.DERIVED_TILE_VARS if n in present and n not in derived]
    if dropped:  # a stale derived array is not carried over: rerun postprocess
        meta = dict(attrs.get("postprocess") or {})
        for name in dropped:
            meta.pop(schema.VAR[name].record, None)
        store.set_attrs(dst, postprocess=meta)
    store.copy_whole(src, dst, fitted)
    kept = np.flatnonzero(count > 0)
    block = block or z * schema.META_CHUNK_FACTOR
    for a in range(0, total, block):
        slots = np.arange(a, min(total, a + block))
        owner = kept[np.searchsorted(start[kept], slots, side="right") - 1]
        store.copy_slots(src, dst, [*schema.TILE_VARS, *derived], a, table["tile_start"][owner] + (slots - start[owner]))
    store.consolidate(dst)
    return {"slots_before": slots_before, "slots_after": total, "images": len(status),
            "images_dropped": int((~keep & (table["tile_count"] > 0)).sum())}  # fmt: skip


def migrate(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Upgrade a store of an older schema version in place; returns ``(old, new)`` versions.

    1 -> 2: version 2 adds the status ``removed`` (nothing to rewrite) and reads the group's
    consolidated metadata, which :func:`pipeline.store.set_attrs` writes. 2 -> 3: version 3 adds
    ``acquired`` (NaT: unknown; a later ingest with ``--dates``/``--date-pattern`` fills it) and
    ``item_id`` (empty) to the image table. The arrays are created first and the version written
    last, so a killed migration is simply run again.
    """
    p = _local(path, "migrate")
    with StoreLock(p, what="migrate"):
        new = schema.SCHEMA_VERSION
        old = int(store.read_attrs(p).get("schema_version", 0))
        if old == new:
            return old, old
        if old not in (1, 2):
            raise StoreError(f"{p} has schema version {old}; this aerial-search migrates versions 1 and 2 to {new}")
        added = store.add_missing_image_vars(p)
        store.set_attrs(p, schema_version=new, migrated={"from": old, "added": added, "finished": schema.now()})
        return old, new
