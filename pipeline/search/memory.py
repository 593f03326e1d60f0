"""Fingerprints that never touched a disk as a searchable dataset: the store's search schema over
in-memory arrays, one image per row (:func:`memory_dataset`). What ``evaluate`` searches, and
what kernel tests run the whole engine on without a store."""

from __future__ import annotations

import numpy as np

from pipeline import grid


def memory_dataset(x: np.ndarray, chunk: int = 512):
    """An in-memory dataset with the store's search schema, one image per row of ``x`` (n, d):
    what :class:`~pipeline.search.SearchIndex` searches when fingerprints never touched a disk."""
    import dask.array as da
    import xarray as xr

    n = len(x)
    nan = np.full(n, np.nan)
    uid = grid.pack_uid(np.arange(n), 0, 0)
    return xr.Dataset(
        {
            "fingerprint": (("tile", "feature"), da.from_array(np.asarray(x, np.float32), chunks=(chunk, -1))),
            "valid": ("tile", da.ones(n, bool, chunks=chunk)),
            "uid": ("tile", da.from_array(uid, chunks=chunk)),
            "lon": ("tile", da.from_array(nan, chunks=chunk)),
            "lat": ("tile", da.from_array(nan.copy(), chunks=chunk)),
            "image_path": ("img", np.array([str(i) for i in range(n)], dtype=object)),
            "crs": ("img", np.array([""] * n, dtype=object)),
            "transform": (("img", "affine"), np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1))),
        }
    )
