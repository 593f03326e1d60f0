"""Staging (resume inside an image): each ingest unit's fingerprint rows are saved as soon as they
are computed, in a hidden sibling folder of the store (``.NAME.staging/START-COUNT.npy``), and a
long unit's first windows every few seconds while it runs (``START-COUNT.part-FIRST-N.npy``). A
rerun after a crash loads them instead of recomputing; a batch's files are deleted once it is
committed. Written through fsspec (a local folder, or a prefix beside an object-storage store),
never through Zarr: staged rows are not part of the store until their batch writes them there.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import numpy as np

from pipeline import locations
from pipeline.errors import StoreError


def staging_path(path: Path | str) -> Path | str:
    """The sibling folder (or prefix) where an ingest stages its computed units."""
    if locations.is_remote(path):
        return f"{str(path).rstrip('/')}.staging"
    path = Path(path)
    return path.with_name(f".{path.name}.staging")


def _staging_fs(path: Path | str):
    import fsspec

    root = staging_path(path)
    if locations.is_remote(root):
        return locations.filesystem(str(root))
    return fsspec.filesystem("file"), str(root)


def stage_rows(path: Path | str, start: int, rows: np.ndarray) -> None:
    """Keep a unit's computed rows (slots ``[start, start + len(rows))``) until its batch commits;
    written under a temporary name and renamed, so a staged file is always complete. The unit's
    partial files (:func:`stage_part`) are then deleted."""
    _save_npy(path, f"{start}-{len(rows)}.npy", rows)
    prefix = f"{start}-{len(rows)}.part-"
    fs, root = _staging_fs(path)
    for base in _staged_names(path):
        if base.startswith(prefix):
            fs.rm_file(f"{root}/{base}")


def _staged_names(path: Path | str) -> list[str]:
    fs, root = _staging_fs(path)
    try:
        return [str(n).rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def staged(path: Path | str) -> set[tuple[int, int]]:
    """``(start, count)`` of every completely staged unit."""
    out = set()
    for base in _staged_names(path):
        if base.endswith(".npy") and base.count("-") == 1:
            a, b = base[:-4].split("-")
            if a.isdigit() and b.isdigit():
                out.add((int(a), int(b)))
    return out


def stage_part(path: Path | str, start: int, count: int, first: int, rows: np.ndarray) -> None:
    """Keep the fingerprints of kept windows ``first .. first + len(rows) - 1`` of a unit still
    being computed (``START-COUNT.part-FIRST-N.npy``), so a crash inside a large unit loses at
    most the last few seconds of it."""
    _save_npy(path, f"{start}-{count}.part-{first}-{len(rows)}.npy", rows)


def load_partial(path: Path | str, start: int, count: int) -> np.ndarray | None:
    """The fingerprints of the first kept windows of a unit staged by :func:`stage_part`
    (the contiguous run from window 0), or None."""
    prefix = f"{start}-{count}.part-"
    parts = []
    for base in _staged_names(path):
        if base.startswith(prefix) and base.endswith(".npy"):
            first, n = (int(v) for v in base[len(prefix) : -4].split("-"))
            parts.append((first, n, base))
    fs, root = _staging_fs(path)
    rows, at = [], 0
    for first, n, base in sorted(parts):
        if first != at:
            break
        rows.append(np.load(io.BytesIO(fs.cat_file(f"{root}/{base}")), allow_pickle=False))
        at += n
    return np.concatenate(rows) if rows else None


def _save_npy(path: Path | str, base: str, rows: np.ndarray) -> None:
    fs, root = _staging_fs(path)
    fs.makedirs(root, exist_ok=True)
    name = f"{root}/{base}"
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    if locations.is_remote(path):
        fs.pipe_file(name, buf.getvalue())  # one PUT: atomic on object storage
        return
    tmp = f"{name}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
    os.replace(tmp, name)


def load_staged(path: Path | str, start: int, count: int) -> np.ndarray:
    """The rows :func:`stage_rows` kept for slots ``[start, start + count)``."""
    fs, root = _staging_fs(path)
    rows = np.load(io.BytesIO(fs.cat_file(f"{root}/{start}-{count}.npy")), allow_pickle=False)
    if len(rows) != count:
        raise StoreError(f"staged unit {start}-{count} of {path} holds {len(rows)} rows; delete {root} and rerun")
    return rows


def drop_staged(path: Path | str, lo: int, hi: int) -> None:
    """Delete the staged units (and partial units) that start in slots ``[lo, hi)``: their batch
    is committed."""
    fs, root = _staging_fs(path)
    for base in _staged_names(path):
        head = base.split("-", 1)[0]
        if head.isdigit() and lo <= int(head) < hi:
            fs.rm_file(f"{root}/{base}")


def clear_staging(path: Path | str) -> None:
    """Remove the staging folder once nothing is staged in it."""
    fs, root = _staging_fs(path)
    if fs.exists(root) and not _staged_names(path):
        fs.rm(root, recursive=True)
