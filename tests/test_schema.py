"""The schema is one table: the README's section is generated from it, and the arrays a store
really holds (read back with zarr itself) have the table's dims, dtypes, chunks and fills."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_store

from pipeline import schema
from pipeline.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_schema_section_is_the_table():
    text = README.read_text()
    start, end = text.index(schema.README_BEGIN), text.index(schema.README_END) + len(schema.README_END)
    assert text[start:end] == schema.markdown(), "README's schema section is stale: `python -m pipeline.schema`"
    for var in schema.VARIABLES:  # every variable, once
        assert text[start:end].count(f"| `{var.name}`") == 1, var.name


def _check(group, names, chunk_tiles):
    for name in names:
        var, a = schema.VAR[name], group[name]
        assert tuple(a.metadata.dimension_names) == var.dims, name
        if var.dtype == "str":
            assert a.dtype.kind in "TUO" or str(a.dtype).startswith("<U") or "str" in str(a.dtype).lower(), (name, a.dtype)
        elif name != "fingerprint":
            assert np.dtype(a.dtype) == np.dtype(var.dtype), (name, a.dtype)
        if var.chunks != "whole":
            assert a.chunks[0] == schema.chunk_rows(var, chunk_tiles, a.shape[0]), name
            assert tuple(a.chunks[1:]) == tuple(a.shape[1:]), name  # other dims never split
        if var.fill is not None:
            fill = a.metadata.fill_value
            if var.fill == schema.NAT:
                assert np.isnat(fill), (name, fill)
                continue
            assert (math.isnan(fill) and math.isnan(var.fill)) if isinstance(var.fill, float) and var.fill != var.fill \
                else fill == var.fill, (name, fill)  # fmt: skip


def test_stores_hold_the_tables_arrays(flights, ingest_store, tmp_path):
    import zarr

    path = copy_store(ingest_store(flights, dtype="float16"), tmp_path / "s.zarr")
    g = zarr.open_group(str(path), mode="r")
    core = [v.name for v in schema.VARIABLES if v.role in ("tile", "img")]
    assert sorted(g.array_keys()) == sorted(core)  # a new store: every variable of every store, nothing else
    assert g["fingerprint"].dtype == np.float16
    _check(g, core, 8)
    for step in (["--method", "pca", "--dims", "64", "--dba", "2"], ["--codes", "binary", "--bits", "64"],
                 ["--knn", "3"]):  # fmt: skip
        assert main(["postprocess", "--store", str(path), *step]) == 0
    assert main(["postprocess", "--store", str(path), "--codes", "pq", "--m", "4"]) == 0  # replaces the binary codes
    g = zarr.open_group(str(path), mode="r")
    present = set(g.array_keys())
    assert {"post_mean", "post_projection", "fingerprint_dba", "codes", "codes_centroids", "knn_uid", "knn_sim"} <= present
    assert not {"codes_mean", "codes_projection"} & present  # the old encoder went with the old codes
    _check(g, sorted(present), 8)
    assert set(present) <= set(schema.VAR), set(present) - set(schema.VAR)


@pytest.mark.parametrize("role", ["tile", "img", "fit", "derived"])
def test_every_role_has_variables_and_derived_ones_a_record(role):
    names = [v for v in schema.VARIABLES if v.role == role]
    assert names
    for v in names:
        assert bool(v.record) == (role == "derived"), v.name
        assert v.dims[0] == {"tile": "tile", "img": "img", "derived": "tile"}.get(role, v.dims[0])
