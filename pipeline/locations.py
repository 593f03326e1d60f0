"""Where stores live: local folders or object-storage URLs, the hidden sibling a new store is
built in, swapping a finished store into place, and sizes. No Zarr here (:mod:`pipeline.store`
reads and writes); the lock, staging and upkeep use these too."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pipeline.errors import StoreError


def is_remote(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def filesystem(url: str):
    """fsspec filesystem and root for an object-storage URL (s3://, gs://, ...)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise StoreError(f"store {url} needs an fsspec driver: pip install 'aerial-search[cloud]' ({e})") from e


def is_store(path: Path | str) -> bool:
    """Whether ``path`` holds a Zarr group (``zarr.json``)."""
    if is_remote(path):
        fs, root = filesystem(str(path))
        return fs.exists(f"{root.rstrip('/')}/zarr.json")
    return (Path(path) / "zarr.json").is_file()


def exists(path: Path | str) -> bool:
    if is_remote(path):
        fs, root = filesystem(str(path))
        return fs.exists(root)
    return Path(path).exists()


def partial_path(final: Path | str) -> Path:
    """Where a new local store is built before it is swapped into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def check_writable(path: str | os.PathLike[str]) -> Path | str:
    """Normalize ``path`` and refuse early (before any work) if it cannot hold a store: an
    existing non-store folder, or a local parent that cannot be created or written."""
    if is_remote(path):
        url = str(path).rstrip("/")
        if exists(url) and not is_store(url):
            raise StoreError(f"{url} exists and is not a fingerprint store; choose another --store path")
        return url
    p = Path(path).expanduser().resolve()
    if p.exists() and not is_store(p):
        raise StoreError(f"{p} exists and is not a fingerprint store; choose another --store path")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create the folder {parent} for store {p} ({e}); choose a writable --store path"
        ) from e
    if not os.access(parent, os.W_OK):
        raise StoreError(f"cannot write in {parent} (permission denied); choose a writable --store path")
    return p


def swap_in(tmp: Path | str, final: Path | str) -> None:
    """Move a finished local store into place; an existing store is replaced only after that."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path | str) -> None:
    if is_remote(tmp):
        fs, root = filesystem(str(tmp))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    shutil.rmtree(tmp, ignore_errors=True)


def store_bytes(path: str | os.PathLike[str]) -> int:
    if is_remote(path):
        fs, root = filesystem(str(path))
        return int(fs.du(root))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
