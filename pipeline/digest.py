"""File digests: a leaf module (no package imports), shared by ingest (``--hash``), upkeep
(``relocate``), weights files and queries."""

from __future__ import annotations

import hashlib


def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
